"""Fused kernels for the DualCoOp++ multi-label head and its asymmetric loss.

Public API: :func:`dualcoop_head` and :class:`DualCoOpHead` (the head), :func:`asymmetric_loss` and
:class:`AsymmetricLoss` (the loss), :func:`split_signed_labels` (label encoding), and
:func:`available_backends`, :func:`extension_status` and :func:`build_extension` for the optional
C++/CUDA loss extension, and :class:`DualCoOpPlusPlus`, the whole model on a frozen open_clip CLIP
(needs the ``clip`` extra). The math is in docs/math.md; ``reference`` holds the pure PyTorch versions,
``options`` the modes and default hyper-parameters.
"""

from __future__ import annotations

from .dispatch import available_backends
from .extension import build_extension, extension_status
from .head import DualCoOpHead, dualcoop_head
from .loss import AsymmetricLoss, asymmetric_loss, split_signed_labels
from .model import DualCoOpPlusPlus

__version__ = "0.1.0"


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
