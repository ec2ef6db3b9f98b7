"""Input factories shared by the tests; the accuracy rules are in dualcoop_kernels.testing."""

import pytest
import torch

from dualcoop_kernels.head import HEAD_BACKENDS


def needs_triton(dtype=None):
    """Skips a test where the Triton head cannot run on this CPU (in ``dtype``, when given), with the
    package's own reason: an old Triton's interpreter, say, or one without float64 dots."""
    reason = HEAD_BACKENDS.unavailable(torch.device("cpu"), dtype).get("triton")
    return pytest.mark.skipif(reason is not None, reason=f"the Triton head cannot run here: {reason}")


def head_inputs(B, N, D, C, dtype=torch.float64, requires_grad=True, device="cpu"):
    """Random head inputs: features, the three text sets and the log temperature (about 3)."""
    features = torch.randn(B, N, D, dtype=dtype, device=device).requires_grad_(requires_grad)
    texts = [torch.randn(C, D, dtype=dtype, device=device).requires_grad_(requires_grad) for _ in range(3)]
    log_temp = (3.0 + 0.1 * torch.randn((), dtype=dtype, device=device)).requires_grad_(requires_grad)
    return features, *texts, log_temp


def low_precision_head_inputs(B, N, D, C, dtype, device="cpu"):
    """A draw of head inputs rounded to ``dtype`` and requiring grad (the log temperature float32, as
    DualCoOpHead keeps it), and an output gradient in ``dtype``."""
    exact = head_inputs(B, N, D, C, requires_grad=False, device=device)
    inputs = [t.to(dtype).requires_grad_() for t in exact[:4]] + [exact[4].float().requires_grad_()]
    return inputs, torch.randn(B, 2, C, dtype=torch.float64, device=device).to(dtype)


def asl_inputs(B, C, two_way, dtype=torch.float64, unknown_fraction=0.3, scale=2.0):
    """Random logits (requiring grad), 0/1 targets and a mask with about ``unknown_fraction`` unknown."""
    shape = (B, 2, C) if two_way else (B, C)
    logits = (scale * torch.randn(shape, dtype=dtype)).requires_grad_()
    targets = (torch.rand(B, C) < 0.4).to(dtype)
    mask = torch.rand(B, C) >= unknown_fraction
    return logits, targets, mask


def train_arguments_on(task, out, *extra, epochs=2):
    """``dualcoop train`` on a synthetic task (the conftest's ``small_task``) with the tiny random CLIP."""
    return [
        "train", "--dataset", "csv", "--root", str(task["train"]), "--test-root", str(task["test"]),
        "--clip", str(task["clip"]), "--pretrained", "none", "--image-size", "48", "--n-ctx", "4",
        "--epochs", str(epochs), "--batch-size", "16", "--val-fraction", "0.25", "--workers", "0", "--quiet",
        "--out", str(out), *extra,
    ]  # fmt: skip
