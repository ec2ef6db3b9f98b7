"""Per-op timings with pytest-benchmark: the head and the loss, forward and backward, through every
backend available on the default device (the GPU when there is one), at the coco preset's shape.

    pytest benchmarks --benchmark-only                       # a table of timings
    pytest benchmarks --benchmark-only --benchmark-autosave  # also saved under .benchmarks/
    pytest benchmarks --benchmark-only --benchmark-compare   # against the last saved run

Not part of the default ``pytest`` run (its ``testpaths`` is tests/). On the CPU the Triton head would
run in its interpreter, which says nothing of speed, so it is left out there.
"""

import functools

import pytest
import torch

from harness import HEAD_PRESETS, synchronize

import dualcoop_kernels as dk

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEAD_BACKENDS = [b for b in dk.available_backends("dualcoop_head", DEVICE) if DEVICE.type == "cuda" or b != "triton"]
LOSS_BACKENDS = dk.available_backends("asymmetric_loss", DEVICE)


def timed(fn):
    """What the benchmark times: one call, finished on the device."""

    @functools.wraps(fn)
    def call():
        fn()
        synchronize(DEVICE)

    return call


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
def test_head_forward_backward(benchmark, backend):
    shape = HEAD_PRESETS["coco"]
    B, N, D, C = shape["B"], shape["N"], shape["D"], shape["C"]
    features = torch.randn(B, N, D, device=DEVICE)
    texts = [torch.randn(C, D, device=DEVICE, requires_grad=True) for _ in range(3)]
    head = dk.DualCoOpHead(backend=backend).to(DEVICE)
    grad_output = torch.randn(B, 2, C, device=DEVICE)

    def step():
        head(features, *texts).backward(grad_output)

    benchmark(timed(step))


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("B, C", [(64, 80), (192, 1006)])
def test_loss_forward_backward(benchmark, backend, B, C):
    logits = (3 * torch.randn(B, 2, C, device=DEVICE)).requires_grad_()
    targets = (torch.rand(B, C, device=DEVICE) < 0.1).float()
    mask = torch.rand(B, C, device=DEVICE) >= 0.3
    loss_fn = dk.AsymmetricLoss(gamma_neg=2.0, gamma_pos=1.0, clip=0.05, backend=backend)

    def step():
        loss_fn(logits, targets, mask).backward()

    benchmark(timed(step))
