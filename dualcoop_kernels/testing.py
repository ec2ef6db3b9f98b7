"""Accuracy rules shared by the tests and the benchmarks.

A fused kernel in a low precision is held to flash-attention's rule: its error against an exact
(float64) result is at most twice that of the eager reference run in the same precision, plus a small
allowance relative to the result's scale (``EXTRA_ERROR``). In float64 it matches the reference to
``FLOAT64_RTOL`` and ``FLOAT64_ATOL``.
"""

from __future__ import annotations

import math

import torch

# Error allowed beyond twice the eager reference's, relative to the result's scale, per input dtype.
EXTRA_ERROR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
FLOAT64_RTOL, FLOAT64_ATOL = 1e-9, 1e-10


def max_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest absolute difference, in float64; NaN when either holds a NaN."""
    return (got.double() - exact.double()).abs().max().item() if got.numel() else 0.0


def within_twice_reference_error(got, low_precision_reference, exact, extra: float) -> tuple[bool, float, float]:
    """Whether ``got`` meets the rule, with its error and the reference's. Where the eager reference
    breaks down (NaN: fp16 cannot hold some constants) any finite error passes; a NaN of ``got`` never
    does."""
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    ours, theirs = max_error(got, exact), max_error(low_precision_reference, exact)
    bound = (math.inf if math.isnan(theirs) else 2 * theirs) + extra * scale
    return ours <= bound, ours, theirs


def assert_within_twice_reference_error(got, low_precision_reference, exact, extra: float, what: str) -> None:
    passed, ours, theirs = within_twice_reference_error(got, low_precision_reference, exact, extra)
    assert passed, f"{what}: error {ours:.3g} > 2 x reference error {theirs:.3g} + {extra:.3g} of the scale"
