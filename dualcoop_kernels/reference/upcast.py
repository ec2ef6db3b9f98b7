"""The references' precision rule."""

from __future__ import annotations

import torch


def upcast_low_precision(tensors, upcast: bool):
    """With ``upcast``, compute a low-precision input in float32 (float64 stays float64); without, the
    references compute in the input's own precision, which is what the "twice the eager error" rule
    of ``dualcoop_kernels.testing`` compares with."""
    if not upcast:
        return tensors
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]
