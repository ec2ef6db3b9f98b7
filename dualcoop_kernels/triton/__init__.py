"""The Triton backend: the fused head (``head.py``: kernels, host functions, torch.library operators).

Like every backend it offers ``unavailable_reason(device)``, ``prepare(device)`` and its op functions
(here ``dualcoop_head``). Importing this package does not import triton: the first call does, so that
``TRITON_INTERPRET`` can still be set before it.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def unavailable_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton needs a CUDA device (or TRITON_INTERPRET=1 for its CPU interpreter)"
    return None


def prepare(device: torch.device) -> None:
    """Nothing to build ahead: Triton compiles each kernel variant on its first launch."""


def dualcoop_head(*args, **kwargs):
    from .head import dualcoop_head_triton

    return dualcoop_head_triton(*args, **kwargs)
