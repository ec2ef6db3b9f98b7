"""The Triton head and the loss extension on CUDA tensors, compiled for the GPU: outputs and every
gradient against the reference in every WTA mode (float64 tightly, fp32 and bf16 by the rules of
dualcoop_kernels.testing over several draws), odd sizes, class and region counts past one tile,
poisoned outputs and statistics, no device syncs, torch.library's own checks, and the tensors' device
rather than the current one. Runs in a process of its own (see conftest.py)."""

import math

import pytest
import torch

from utils import head_inputs, low_precision_head_inputs

import dualcoop_kernels as dk
from dualcoop_kernels.extension import build as extension_build
from dualcoop_kernels.options import WTA_MODES, WTA_WEIGHTS
from dualcoop_kernels.reference import asymmetric_loss_reference, dualcoop_head_reference
from dualcoop_kernels.testing import (
    DRAWS,
    FLOAT64_ATOL,
    FLOAT64_RTOL,
    assert_accurate,
    assert_within_twice_reference_error,
    head_draw,
)
from dualcoop_kernels.triton import head as triton_head
from dualcoop_kernels.triton import head_kernels
from dualcoop_kernels.triton.head import LaunchConfig, dualcoop_head_triton

CUDA = "cuda"
NAMES = ["logits", "d features", "d text_evidence", "d text_pos", "d text_neg", "d log_spatial_temp"]
# (B, N, D, C, tiles, gamma): odd sizes, N and C past one tile with the library's tiles and with small
# ones, one class tile (every class) and several; gamma 5 keeps the WTA terms large
# in the gradients, 200 is the papers' setting
SHAPES = [
    pytest.param(3, 70, 40, 130, None, 5.0, id="default-tiles"),
    pytest.param(
        2,
        37,
        24,
        21,
        LaunchConfig(block_n=16, block_c=16, block_d=16, block_d_grad=16, splits=2),
        5.0,
        id="small-tiles",
    ),
    pytest.param(
        2,
        37,
        24,
        21,
        LaunchConfig(block_n=16, block_c=32, block_d=16, block_d_grad=16, splits=3, gemm_block_m=16, gemm_block_k=16),
        5.0,
        id="row-tiles",
    ),
    pytest.param(2, 196, 512, 80, None, 200.0, id="coco-width"),
]


def run_head(head, inputs, grad_output, **options):
    out = head(*inputs, **options)
    return [out, *torch.autograd.grad(out, inputs, grad_output)]


@pytest.mark.parametrize("wta", WTA_MODES)
@pytest.mark.parametrize("B, N, D, C, tiles, gamma", SHAPES)
def test_float64(wta, B, N, D, C, tiles, gamma):
    inputs = head_inputs(B, N, D, C, device=CUDA)
    grad_output = torch.randn(B, 2, C, dtype=torch.float64, device=CUDA)
    expected = run_head(dualcoop_head_reference, inputs, grad_output, wta=wta, wta_gamma=gamma)
    got = run_head(dualcoop_head_triton, inputs, grad_output, wta=wta, wta_gamma=gamma, launch=tiles)
    for name, ours, theirs in zip(NAMES, got, expected):
        torch.testing.assert_close(
            ours, theirs, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp16 loads as bf16 does
@pytest.mark.parametrize("wta", WTA_MODES)
@pytest.mark.parametrize("B, N, D, C, tiles, gamma", SHAPES)
def test_low_precision_accuracy_over_draws(dtype, wta, B, N, D, C, tiles, gamma):
    draws = []
    for _ in range(DRAWS[dtype]):
        inputs, grad_output = low_precision_head_inputs(B, N, D, C, dtype, device=CUDA)
        draws.append(head_draw(dualcoop_head_triton, inputs, grad_output, wta=wta, wta_gamma=gamma, launch=tiles))
    assert_accurate(draws, NAMES, dtype, f"{dtype} {wta}")


def test_poisoned_outputs_are_all_written(monkeypatch):
    def poisoned(*shape, device, dtype):
        return torch.full(shape, float("nan") if dtype.is_floating_point else 2**30, device=device, dtype=dtype)

    monkeypatch.setattr(triton_head, "_kernel_output", poisoned)
    inputs = head_inputs(3, 70, 40, 130, device=CUDA)
    grad_output = torch.randn(3, 2, 130, dtype=torch.float64, device=CUDA)
    for wta in WTA_MODES:
        expected = run_head(dualcoop_head_reference, inputs, grad_output, wta=wta)
        got = run_head(dualcoop_head_triton, inputs, grad_output, wta=wta)
        for ours, theirs in zip(got, expected):
            torch.testing.assert_close(ours, theirs, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)


@pytest.mark.parametrize("wta", WTA_MODES)
def test_backward_reads_the_negative_statistics_where_that_side_is_weighted(wta):
    """The negative side's statistics poisoned between the forward and the backward (as in
    tests/test_head_triton.py): NaN gradients in the pos_neg modes, the same ones elsewhere."""
    features, te, tp, tn, log_temp = head_inputs(3, 70, 40, 130, requires_grad=False, device=CUDA)
    options = [wta, 5.0, 20.0, triton_head.choose_launch_config(3, 70, 130, 40, features.device).as_list()]
    logits, lse, inv_norm, text_inv_norm, stats, index, sims = triton_head.dualcoop_head_forward(
        features, te, tp, tn, log_temp, *options
    )
    grad_logits = torch.randn(3, 2, 130, dtype=torch.float64, device=CUDA)
    saved = (logits, lse, inv_norm, text_inv_norm)
    poisoned_stats, poisoned_index = stats.clone(), index.clone()
    for row in (head_kernels.STAT_COEF, head_kernels.STAT_MAX_U, head_kernels.STAT_INV_TOTAL, head_kernels.STAT_SHIFT):
        poisoned_stats[row.value + 1] = float("nan")
    poisoned_index[head_kernels.INDEX_COEF.value + 1] = 2**30
    clean, got = (
        triton_head.dualcoop_head_backward(
            grad_logits, features, te, tp, tn, log_temp, *saved, s, i, sims, *options, True, True, True
        )
        for s, i in ((stats, index), (poisoned_stats, poisoned_index))
    )
    for grad, expected in zip(got, clean):
        assert torch.isnan(grad).any() if WTA_WEIGHTS[wta][1] != "one" else torch.equal(grad, expected)


def test_no_device_sync_in_a_training_step():
    """A sync would stall the stream every step (the temperature check once did)."""
    features, te, tp, tn, log_temp = head_inputs(4, 49, 64, 20, dtype=torch.float32, device=CUDA)
    features = features.detach()
    dk.dualcoop_head(features, te, tp, tn, log_temp).sum().backward()  # compiles the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dk.dualcoop_head(features, te, tp, tn, log_temp).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_float64_scalars_are_not_rounded_to_float32():
    """A Python float reaches an untyped Triton argument as fp32 on a GPU: e^3 would lose 1.7e-9."""
    inputs = head_inputs(2, 9, 16, 5, device=CUDA, requires_grad=False)
    scale = math.exp(3.0) * (1 + 1e-12)
    got = dualcoop_head_triton(*inputs, logit_scale=scale, wta_gamma=200.0 / 3)
    expected = dualcoop_head_reference(*inputs, logit_scale=scale, wta_gamma=200.0 / 3)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_device_than_the_current_one():
    inputs = head_inputs(2, 37, 24, 21, device="cuda:1")
    grad_output = torch.randn(2, 2, 21, dtype=torch.float64, device="cuda:1")
    with torch.cuda.device(0):
        got = run_head(dualcoop_head_triton, inputs, grad_output)
    expected = run_head(dualcoop_head_reference, inputs, grad_output)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)


@pytest.mark.parametrize("wta", WTA_MODES)
def test_head_operators_pass_opcheck(wta):
    features, te, tp, tn, log_temp = head_inputs(2, 37, 24, 21, dtype=torch.float32, device=CUDA)
    options = [wta, 5.0, 20.0, triton_head.choose_launch_config(2, 37, 21, 24, features.device).as_list()]
    torch.library.opcheck(
        torch.ops.dualcoop_kernels.dualcoop_head_forward.default, (features, te, tp, tn, log_temp, *options)
    )


def test_compiled_head_in_a_training_step():
    head = dk.DualCoOpHead(backend="triton").cuda()
    features, te, tp, tn, _ = head_inputs(4, 49, 64, 20, dtype=torch.float32, device=CUDA)
    compiled = torch.compile(head, fullgraph=True)
    out = compiled(features.detach(), te, tp, tn)
    out.sum().backward()
    torch.testing.assert_close(
        out, dk.DualCoOpHead(backend="reference").cuda()(features, te, tp, tn), rtol=1e-5, atol=1e-5
    )


@pytest.fixture(scope="module")
def loss_extension():
    status = extension_build.build_extension()
    if not status.cuda_built:
        pytest.skip(f"the loss extension's CUDA part is not built: {status.why_not.get('cuda')}")


def loss_case(B, C, two_way, dtype):
    shape = (B, 2, C) if two_way else (B, C)
    logits = 3 * torch.randn(shape, dtype=torch.float64, device=CUDA)
    logits = torch.where(torch.rand(shape, device=CUDA) < 0.1, 50 * torch.sign(logits), logits)
    targets = (torch.rand(B, C, device=CUDA) < 0.4).to(dtype)
    mask = torch.rand(B, C, device=CUDA) >= 0.3
    return logits.to(dtype).requires_grad_(), targets, mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("two_way", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_loss_extension(loss_extension, dtype, two_way, reduction):
    logits, targets, mask = loss_case(33, 1006, two_way, dtype)
    grad_output = torch.randn(33, 1006, dtype=dtype, device=CUDA) if reduction == "none" else None
    options = dict(gamma_neg=2.0, gamma_pos=1.0, clip=0.05, reduction=reduction)

    def loss_and_grad(function, z, **extra):
        loss = function(z, targets.to(z.dtype), mask, **options, **extra)
        return loss, torch.autograd.grad(loss, z, grad_output.to(z.dtype) if grad_output is not None else None)[0]

    got = loss_and_grad(dk.asymmetric_loss, logits, backend="extension")
    if dtype == torch.float64:
        for ours, theirs in zip(got, loss_and_grad(asymmetric_loss_reference, logits)):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
        return
    exact = loss_and_grad(asymmetric_loss_reference, logits.detach().double().requires_grad_())
    eager = loss_and_grad(asymmetric_loss_reference, logits)
    for what, ours, theirs, truth in zip(("loss", "grad"), got, eager, exact):
        assert_within_twice_reference_error(ours, theirs, truth, 1e-6 if dtype == torch.float32 else 4e-3, what)


def test_loss_extension_nan_in_nan_out(loss_extension):
    logits, targets, mask = loss_case(5, 37, True, torch.float32)
    with torch.no_grad():
        logits.view(-1)[3], logits.view(-1)[40] = math.nan, math.inf
    loss = dk.asymmetric_loss(logits, targets, mask, backend="extension", reduction="none")
    expected = asymmetric_loss_reference(logits, targets, mask, reduction="none")
    torch.testing.assert_close(torch.isnan(loss), torch.isnan(expected))
    assert torch.isnan(loss).any()
