"""Pure PyTorch references of the head and the loss: docs/math.md line by line, float64-capable, and
the bar every other backend is tested against. They take already-checked tensors; the public ops in
``dualcoop_kernels.head`` and ``dualcoop_kernels.loss`` check input."""

from .head import dualcoop_head_reference, wta_weights
from .loss import asymmetric_loss_reference

__all__ = ["asymmetric_loss_reference", "dualcoop_head_reference", "wta_weights"]
