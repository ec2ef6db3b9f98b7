"""The Triton backend: the fused head (``head_kernels.py``: the kernels; ``head.py``: launches,
torch.library operators and their autograd).

Like every backend it offers ``unavailable_reason(device)``, ``prepare(device)`` and its op functions
(here ``dualcoop_head``), and ``unsupported_dtype(dtype)``. Importing this package does not import
triton: the first call does, so that ``TRITON_INTERPRET`` can still be set before it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re

import torch

FLOAT64_DOTS = (3, 5)  # the first Triton whose tl.dot takes float64 operands


def triton_version() -> str:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # installed under another name (pytorch-triton)
        import triton

        return triton.__version__


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def interpreter_limit() -> str | None:
    """Why this Triton's CPU interpreter cannot run the kernels, or None when it can. These are limits
    of the interpreter alone: the same Triton compiles the kernels for a GPU."""
    triton_at, numpy_at = triton_version(), importlib.metadata.version("numpy")
    if release(triton_at) < (3, 3):
        return (
            f"the CPU interpreter of triton {triton_at} writes masked-out lanes of some stores (memory "
            "corruption); TRITON_INTERPRET=1 needs triton 3.3 or newer"
        )
    if (3, 4) <= release(triton_at) < (3, 7) and release(numpy_at) >= (2, 4):
        return (
            f"the CPU interpreter of triton {triton_at} fails with numpy {numpy_at} (int() of a one-element "
            "array); TRITON_INTERPRET=1 needs numpy < 2.4 or triton 3.7 or newer"
        )
    return None


def unavailable_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton needs a CUDA device (or TRITON_INTERPRET=1 for its CPU interpreter)"
    return interpreter_limit()


def unsupported_dtype(dtype: torch.dtype) -> str | None:
    if dtype == torch.float64 and importlib.util.find_spec("triton") and release(triton_version()) < FLOAT64_DOTS:
        return f"triton {triton_version()} has no float64 dots (triton 3.5 or newer has)"
    return None


def prepare(device: torch.device) -> None:
    """Nothing to build ahead: Triton compiles each kernel variant on its first launch."""


def dualcoop_head(*args, **kwargs):
    from .head import dualcoop_head_triton

    return dualcoop_head_triton(*args, **kwargs)
