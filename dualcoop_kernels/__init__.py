"""Fused kernels for the DualCoOp++ multi-label head and its asymmetric loss.

Public API: :func:`dualcoop_head` and :class:`DualCoOpHead` (the head), :func:`asymmetric_loss` and
:class:`AsymmetricLoss` (the loss), :func:`split_signed_labels` (label encoding), and
:func:`available_backends`, :func:`extension_status` and :func:`build_extension` for the optional
C++/CUDA loss extension, and :class:`DualCoOpPlusPlus`, the whole model on a frozen open_clip CLIP
(needs the ``clip`` extra). The math is in docs/math.md; ``reference`` holds the pure PyTorch versions,
``options`` the modes and default hyper-parameters.

``import dualcoop_kernels`` loads the kernels' layer alone (the head, the loss, their backends);
``DualCoOpPlusPlus`` brings in the model wing on first use.
"""

from __future__ import annotations

from .dispatch import available_backends
from .extension import build_extension, extension_status
from .head import DualCoOpHead, dualcoop_head
from .loss import AsymmetricLoss, asymmetric_loss, split_signed_labels
from .version import __version__

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


def __getattr__(name: str):
    if name == "DualCoOpPlusPlus":  # the model wing (model/), loaded on first use
        from .model import DualCoOpPlusPlus

        return DualCoOpPlusPlus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
