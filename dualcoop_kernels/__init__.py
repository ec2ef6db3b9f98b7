"""Fused kernels for the DualCoOp++ multi-label head and its asymmetric loss.

Public API: :func:`dualcoop_head` and :class:`DualCoOpHead` (the head), :func:`asymmetric_loss` and
:class:`AsymmetricLoss` (the loss), :func:`split_signed_labels` (label encoding), and
:func:`available_backends`, :func:`extension_status` and :func:`build_extension` for the optional
C++/CUDA loss extension, and :class:`DualCoOpPlusPlus`, the whole model on a frozen open_clip CLIP
(needs the ``clip`` extra). The math is in SPEC.md; ``reference`` holds the pure PyTorch versions.
"""

from __future__ import annotations

import torch

from .asl_extension import build_extension, extension_status
from .head import HEAD_BACKENDS, DualCoOpHead, dualcoop_head
from .loss import ASL_BACKENDS, AsymmetricLoss, asymmetric_loss, split_signed_labels
from .model import DualCoOpPlusPlus

__version__ = "0.1.0"

_REGISTRIES = {"dualcoop_head": HEAD_BACKENDS, "asymmetric_loss": ASL_BACKENDS}


def available_backends(op: str = "dualcoop_head", device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends of ``op`` (``"dualcoop_head"`` or ``"asymmetric_loss"``) that run on
    ``device``, fastest first; ``backend="auto"`` picks the first."""
    if op not in _REGISTRIES:
        raise ValueError(f"op must be one of {tuple(_REGISTRIES)}, got {op!r}")
    return _REGISTRIES[op].available(torch.device(device))


__all__ = [
    "AsymmetricLoss",
    "DualCoOpHead",
    "DualCoOpPlusPlus",
    "__version__",
    "asymmetric_loss",
    "available_backends",
    "build_extension",
    "dualcoop_head",
    "extension_status",
    "split_signed_labels",
]
