"""Input factories and comparisons shared by the tests."""

import math

import torch


def head_inputs(B, N, D, C, dtype=torch.float64, requires_grad=True, device="cpu"):
    """Random head inputs: features, the three text sets and the log temperature (about 3)."""
    features = torch.randn(B, N, D, dtype=dtype, device=device).requires_grad_(requires_grad)
    texts = [torch.randn(C, D, dtype=dtype, device=device).requires_grad_(requires_grad) for _ in range(3)]
    log_temp = (3.0 + 0.1 * torch.randn((), dtype=dtype, device=device)).requires_grad_(requires_grad)
    return features, *texts, log_temp


def asl_inputs(B, C, two_way, dtype=torch.float64, unknown_fraction=0.3, scale=2.0):
    """Random logits (requiring grad), 0/1 targets and a mask with about ``unknown_fraction`` unknown."""
    shape = (B, 2, C) if two_way else (B, C)
    logits = (scale * torch.randn(shape, dtype=dtype)).requires_grad_()
    targets = (torch.rand(B, C) < 0.4).to(dtype)
    mask = torch.rand(B, C) >= unknown_fraction
    return logits, targets, mask


def max_error(got, exact):
    return (got.double() - exact.double()).abs().max().item() if got.numel() else 0.0


def assert_within_twice_reference_error(got, low_precision_reference, exact, extra, what):
    """The flash-attention rule: a kernel's error against an exact (float64) result is at most twice
    that of the eager reference in the same low precision, plus ``extra`` times the result's scale.
    Where the eager reference breaks down (NaN: fp16 cannot hold eps = 1e-8) any finite error passes;
    a NaN of the kernel never does."""
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    ours, theirs = max_error(got, exact), max_error(low_precision_reference, exact)
    theirs = math.inf if math.isnan(theirs) else theirs
    assert ours <= 2 * theirs + extra * scale, f"{what}: error {ours:.3g} > 2 x reference error {theirs:.3g} + {extra * scale:.3g}"
