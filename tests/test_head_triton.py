"""The Triton head against the reference: outputs and every gradient, on fresh random inputs.

On a CPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), which computes dots
in plain float32 or float64, so float64 is compared tightly and low precisions by the rules of
dualcoop_kernels.testing over several draws.
"""

from dataclasses import replace
from unittest import mock

import pytest
import torch

from utils import head_inputs, low_precision_head_inputs, needs_triton

import dualcoop_kernels as dk
from dualcoop_kernels.options import WTA_MODES, WTA_WEIGHTS
from dualcoop_kernels.reference import dualcoop_head_reference
from dualcoop_kernels.reference import head as reference_head
from dualcoop_kernels.testing import (
    DRAWS,
    FLOAT64_ATOL,
    FLOAT64_RTOL,
    accuracy_failures,
    assert_accurate,
    head_draw,
)
from dualcoop_kernels.triton import head as triton_head
from dualcoop_kernels.triton import head_kernels
from dualcoop_kernels.triton.head import LaunchConfig, dualcoop_head_triton
from dualcoop_kernels.triton.precision import dot_precision

# most tests here compare in float64, which Triton's dots take from 3.5 on
pytestmark = needs_triton(torch.float64)

NAMES = ["logits", "d features", "d text_evidence", "d text_pos", "d text_neg", "d log_spatial_temp"]
SMALL_TILES = LaunchConfig(block_n=16, block_c=16, block_d=16, block_d_grad=16, splits=2)
# one class tile holds all 21 classes of the small shape (no statistics or sums sweeps), the rest as small as they go
ROW_TILES = LaunchConfig(
    block_n=16, block_c=32, block_d=16, block_d_grad=16, splits=3, gemm_block_m=16, gemm_block_k=16
)
# the same with the similarities saved by the forward for the backward, as the library does up to 256 classes
SAVED_ROW_TILES = replace(ROW_TILES, save_similarities=1)
PATHS, PATH_IDS = [SMALL_TILES, ROW_TILES, SAVED_ROW_TILES], ["tiled", "rows", "rows-saved"]

# (B, N, D, C, tiles, gamma): odd sizes; several region, class and D tiles; N = C = 1; splits that do
# not divide the region tiles; None means the tiles the library picks for the shape. The interpreter
# is slow: the larger shapes are marked slow, out of the quick run (pytest -m "not slow").
SHAPES = [
    pytest.param(2, 37, 24, 21, SMALL_TILES, 5.0, id="multi-tile"),
    pytest.param(2, 37, 24, 21, ROW_TILES, 5.0, id="row-tiles"),
    pytest.param(1, 1, 5, 1, None, 200.0, id="one-region-one-class"),
    pytest.param(3, 70, 40, 130, None, 5.0, id="default-tiles", marks=pytest.mark.slow),
    pytest.param(
        2, 19, 33, 67, LaunchConfig(16, 32, 16, 32, splits=3), 200.0, id="uneven-splits", marks=pytest.mark.slow
    ),
    # gamma 200 with C = 101: pos_softmax's small softmax weights once lost precision as (1 + sigma) - 1
    pytest.param(3, 37, 64, 101, None, 200.0, id="sharp-wta-many-classes", marks=pytest.mark.slow),
    pytest.param(2, 37, 24, 21, SAVED_ROW_TILES, 5.0, id="row-tiles-saved"),
    pytest.param(2, 37, 24, 21, replace(SMALL_TILES, save_similarities=1), 5.0, id="multi-tile-saved"),
]


def run_head(head, inputs, grad_output, **options):
    """Output and the gradients of every input that requires grad."""
    out = head(*inputs, **options)
    wanted = [t for t in inputs if t.requires_grad]
    return [out, *torch.autograd.grad(out, wanted, grad_output)]


@pytest.mark.parametrize("wta", WTA_MODES)
@pytest.mark.parametrize("B, N, D, C, tiles, gamma", SHAPES)
def test_float64_matches_reference(wta, B, N, D, C, tiles, gamma):
    inputs = head_inputs(B, N, D, C)
    grad_output = torch.randn(B, 2, C, dtype=torch.float64)
    options = dict(wta=wta, wta_gamma=gamma)
    expected = run_head(dualcoop_head_reference, inputs, grad_output, **options)
    got = run_head(dualcoop_head_triton, inputs, grad_output, launch=tiles, **options)
    for name, ours, theirs in zip(NAMES, got, expected):
        torch.testing.assert_close(
            ours, theirs, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL, msg=lambda m, name=name: f"{name}: {m}"
        )


def assert_accurate_over_draws(B, N, D, C, tiles, gamma, wta, dtype):
    draws = []
    for _ in range(DRAWS[dtype]):
        inputs, grad_output = low_precision_head_inputs(B, N, D, C, dtype)
        draws.append(head_draw(dualcoop_head_triton, inputs, grad_output, wta=wta, wta_gamma=gamma, launch=tiles))
    assert_accurate(draws, NAMES, dtype, f"{dtype} {wta}")


@pytest.mark.parametrize("wta, dtype", [("pos_neg_softmax", torch.float32), ("pos_norm", torch.bfloat16)])
def test_low_precision_accuracy_over_draws(wta, dtype):
    assert_accurate_over_draws(*SHAPES[0].values, wta, dtype)


def reference_without_the_winners_gradient(*inputs, **options):
    """A float32 head with a term dropped: M and m detached, so dM and dm (docs/math.md) never reach s+."""
    real = reference_head.side_weights

    def detached(sim_pos, kind, coefficient, gamma):
        return real(sim_pos, kind, coefficient.detach(), gamma)

    with mock.patch.object(reference_head, "side_weights", detached):
        return dualcoop_head_reference(*inputs, **options)


def reference_with_bf16_similarities(features, *rest, **options):
    """A float32 head that computes in a lower precision: its features rounded to bfloat16."""
    return dualcoop_head_reference(features.bfloat16().float(), *rest, **options)


@pytest.mark.parametrize(
    "head, fails",
    [
        pytest.param(dualcoop_head_reference, False, id="eager float32 itself"),
        pytest.param(reference_without_the_winners_gradient, True, id="a dropped term"),
        pytest.param(reference_with_bf16_similarities, True, id="a lower precision"),
    ],
)
def test_the_accuracy_rules_fail_a_wrong_head_and_pass_eager(head, fails):
    draws = []
    for _ in range(DRAWS[torch.float32]):
        inputs, grad_output = low_precision_head_inputs(*SHAPES[0].values[:4], torch.float32)
        draws.append(head_draw(head, inputs, grad_output, wta="pos_neg_softmax", wta_gamma=5.0))
    failures = [accuracy_failures(list(column), torch.float32, name) for name, column in zip(NAMES, zip(*draws))]
    if not fails:
        assert not any(failures), failures
        return
    # the condition rule alone catches it, on every draw, and so does the median rule
    assert any(sum("condition bound" in f for f in found) == DRAWS[torch.float32] for found in failures), failures
    assert any("median" in f for found in failures for f in found), failures


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("emulation, passes", [("tf32x3", True), ("tf32", False), ("bf16", False)])
def test_the_gpus_dots_keep_the_accuracy_rule_where_plain_tf32_would_not(monkeypatch, emulation, passes, dtype):
    """DUALCOOP_EMULATE_DOTS rounds the interpreter's dot operands as a GPU would (precision.py): the
    3xTF32 products chosen for sm_80 and sm_90 pass the rule (IEEE, sm_86 and sm_89, is what the other
    tests run); plain TF32 or bfloat16 products, amplified by WTA, would fail it."""
    monkeypatch.setenv("DUALCOOP_EMULATE_DOTS", emulation)
    draws = []
    for _ in range(DRAWS[dtype]):
        inputs, grad_output = low_precision_head_inputs(*SHAPES[0].values[:4], dtype)
        draws.append(head_draw(dualcoop_head_triton, inputs, grad_output, wta="pos_neg_softmax", wta_gamma=5.0))
    failures = [accuracy_failures(list(column), dtype, name) for name, column in zip(NAMES, zip(*draws))]
    assert not any(failures) if passes else any(failures), failures


def test_dot_precision_is_decided_per_gpu_in_one_place(monkeypatch):
    assert dot_precision(torch.float32, (9, 0)) == dot_precision(torch.float32, (8, 0)) == "tf32x3"
    assert dot_precision(torch.float32, (8, 6)) == dot_precision(torch.float32, (8, 9)) == "ieee"
    assert dot_precision(torch.float64, (9, 0)) == dot_precision(torch.float64, None) == "ieee"
    assert dot_precision(torch.float32, None) == "ieee"  # the interpreter's exact dots
    monkeypatch.setenv("DUALCOOP_EMULATE_DOTS", "tf32x3")
    assert dot_precision(torch.float32, None) == "emulate-tf32x3"
    assert dot_precision(torch.float32, (9, 0)) == "tf32x3"  # a GPU never emulates
    monkeypatch.setenv("DUALCOOP_EMULATE_DOTS", "fp8")
    with pytest.raises(ValueError, match=r"DUALCOOP_EMULATE_DOTS must be one of \('tf32', 'tf32x3', 'bf16'\)"):
        dot_precision(torch.float32, None)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wta", WTA_MODES)
@pytest.mark.parametrize("B, N, D, C, tiles, gamma", [SHAPES[0], SHAPES[3], SHAPES[4]])
def test_low_precision_accuracy_every_case(dtype, wta, B, N, D, C, tiles, gamma):
    assert_accurate_over_draws(B, N, D, C, tiles, gamma, wta, dtype)


def poisoned_output(*shape, device, dtype):
    fill = float("nan") if dtype.is_floating_point else 2**30
    return torch.full(shape, fill, device=device, dtype=dtype)


@pytest.mark.parametrize("tiles", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("wta", WTA_MODES)
def test_kernels_write_every_output_element(monkeypatch, wta, tiles):
    monkeypatch.setattr(triton_head, "_kernel_output", poisoned_output)
    inputs = head_inputs(2, 37, 24, 21)
    grad_output = torch.randn(2, 2, 21, dtype=torch.float64)
    expected = run_head(dualcoop_head_reference, inputs, grad_output, wta=wta)
    got = run_head(dualcoop_head_triton, inputs, grad_output, wta=wta, launch=tiles)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)


@pytest.mark.parametrize("tiles", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("side", ["positive", "negative"])
@pytest.mark.parametrize("wta", WTA_MODES)
def test_backward_reads_a_sides_statistics_where_that_side_is_weighted(wta, side, tiles):
    """One side's statistics (its c = M or m, max u, 1 / softmax sum and shift; the arg-max or arg-min of s+)
    poisoned between the forward and the backward: the gradients turn NaN where the mode weighs that
    side's logits (the negative side: pos_neg*), all but text_neg's for the positive side (dL/ds- =
    a k w- g- does not see the positive weights), and none changes where the side is not weighted."""
    features, te, tp, tn, log_temp = head_inputs(2, 37, 24, 21, requires_grad=False)
    options = [wta, 5.0, 20.0, tiles.as_list()]
    logits, lse, inv_norm, text_inv_norm, stats, index, sims = triton_head.dualcoop_head_forward(
        features, te, tp, tn, log_temp, *options
    )
    grad_logits = torch.randn(2, 2, 21, dtype=torch.float64)

    def backward(stats, index):
        return triton_head.dualcoop_head_backward(
            grad_logits, features, te, tp, tn, log_temp, logits, lse, inv_norm, text_inv_norm, stats, index,
            sims, *options, True, True, True,
        )  # fmt: skip

    offset = 0 if side == "positive" else 1
    poisoned_stats, poisoned_index = stats.clone(), index.clone()
    for row in (head_kernels.STAT_COEF, head_kernels.STAT_MAX_U, head_kernels.STAT_INV_TOTAL, head_kernels.STAT_SHIFT):
        poisoned_stats[row.value + offset] = float("nan")
    poisoned_index[head_kernels.INDEX_COEF.value + offset] = 2**30
    clean, got = backward(stats, index), backward(poisoned_stats, poisoned_index)
    weighted = WTA_WEIGHTS[wta][offset] != "one"
    names = ["features", "text_evidence", "text_pos", "text_neg", "log_spatial_temp"]
    for name, grad, expected in zip(names, got, clean):
        if weighted and not (side == "positive" and name == "text_neg"):
            assert torch.isnan(grad).any(), name
        else:
            assert torch.equal(grad, expected), name


class RefusesLaunch:
    def __getitem__(self, grid):
        raise AssertionError("this kernel should not run: nothing it computes is needed")


class RecordsLaunches:
    """Stands in for a kernel: runs it and keeps each launch's keyword arguments (its constexprs)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("wta", ["pos_norm", "pos_neg_softmax"])
def test_backward_in_chunks_of_classes_matches_reference(monkeypatch, wta):
    """dS of a large C is written a chunk of classes at a time: here chunks of one 16-class tile, the
    last one partial (21 = 16 + 5), each with its own text-gradient GEMM."""
    monkeypatch.setattr(triton_head, "GRAD_SIM_BYTES", 1)
    gemm = RecordsLaunches(triton_head._text_grad_gemm_kernel)
    monkeypatch.setattr(triton_head, "_text_grad_gemm_kernel", gemm)
    inputs = head_inputs(2, 37, 24, 21)
    grad_output = torch.randn(2, 2, 21, dtype=torch.float64)
    expected = run_head(dualcoop_head_reference, inputs, grad_output, wta=wta, wta_gamma=5.0)
    got = run_head(dualcoop_head_triton, inputs, grad_output, wta=wta, wta_gamma=5.0, launch=SMALL_TILES)
    assert len(gemm.launches) == 2
    for name, ours, theirs in zip(NAMES, got, expected):
        torch.testing.assert_close(
            ours, theirs, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize(
    "tiles, refused", [(SMALL_TILES, "_feature_grad_kernel"), (ROW_TILES, None)], ids=["tiled", "rows"]
)
def test_no_feature_gradient_work_for_frozen_features(monkeypatch, tiles, refused):
    if refused:
        monkeypatch.setattr(triton_head, refused, RefusesLaunch())
    rows = RecordsLaunches(triton_head._similarity_grad_kernel)
    monkeypatch.setattr(triton_head, "_similarity_grad_kernel", rows)
    features, *rest = head_inputs(2, 9, 16, 21)
    out = dualcoop_head_triton(features.detach(), *rest, launch=tiles)
    out.sum().backward()
    assert all(t.grad is not None for t in rest)
    assert not any(launch["WANT_FEATURES"] for launch in rows.launches)


@pytest.mark.parametrize("tiles", [SMALL_TILES, ROW_TILES], ids=["tiled", "rows"])
def test_no_text_gradient_work_when_only_features_learn(monkeypatch, tiles):
    monkeypatch.setattr(triton_head, "_text_grad_gemm_kernel", RefusesLaunch())
    rows = RecordsLaunches(triton_head._similarity_grad_kernel)
    monkeypatch.setattr(triton_head, "_similarity_grad_kernel", rows)
    features, *rest = head_inputs(2, 9, 16, 21)
    out = dualcoop_head_triton(features, *[t.detach() for t in rest], launch=tiles)
    (grad,) = torch.autograd.grad(out.sum(), features)
    expected = torch.autograd.grad(dualcoop_head_reference(features, *[t.detach() for t in rest]).sum(), features)[0]
    torch.testing.assert_close(grad, expected)
    assert not any(launch["WANT_TEXT"] for launch in rows.launches)
    assert len(rows.launches) == (tiles is ROW_TILES)


@pytest.mark.parametrize("grad", [True, False])
def test_the_forward_saves_similarities_only_for_a_backward(monkeypatch, grad):
    forward = RecordsLaunches(triton_head._forward_kernel)
    monkeypatch.setattr(triton_head, "_forward_kernel", forward)
    inputs = head_inputs(2, 9, 16, 21)
    with torch.set_grad_enabled(grad):
        dualcoop_head_triton(*inputs)
    assert [launch["SAVE_SIMILARITIES"] for launch in forward.launches] == [grad]


def test_non_contiguous_inputs():
    B, N, D, C = 2, 21, 18, 11
    base = torch.randn(B, D, N, dtype=torch.float64)
    features = base.transpose(1, 2).requires_grad_()  # strides (D*N, 1, N)
    texts = [torch.randn(D, C, dtype=torch.float64).T.requires_grad_() for _ in range(3)]
    log_temp = torch.tensor(2.7, dtype=torch.float64, requires_grad=True)
    assert not features.is_contiguous() and not texts[0].is_contiguous()
    inputs = [features, *texts, log_temp]
    grad_output = torch.randn(B, 2, C, dtype=torch.float64)
    expected = run_head(dualcoop_head_reference, inputs, grad_output)
    got = run_head(dualcoop_head_triton, inputs, grad_output, launch=SMALL_TILES)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)


def test_public_backend_and_empty_batch():
    assert "triton" in dk.available_backends("dualcoop_head", "cpu")  # through the interpreter
    features, te, tp, tn, log_temp = head_inputs(3, 9, 16, 5)
    module = dk.DualCoOpHead(backend="triton")
    torch.testing.assert_close(
        dk.dualcoop_head(features, te, tp, tn, log_temp, backend="triton"),
        dk.dualcoop_head(features, te, tp, tn, log_temp, backend="reference"),
    )
    assert module(features.float(), te.float(), tp.float(), tn.float()).shape == (3, 2, 5)
    empty = dk.dualcoop_head(features[:0], te, tp, tn, log_temp, backend="triton")
    assert empty.shape == (0, 2, 5)
    empty.sum().backward()
    assert torch.all(te.grad == 0) and log_temp.grad.item() == 0


def test_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager runs the custom operators' fake and
    autograd registrations without a C++ compiler."""
    head = dk.DualCoOpHead(wta="pos_softmax", backend="triton").double()
    features, te, tp, tn, _ = head_inputs(2, 9, 16, 5)
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    out = compiled(features, te, tp, tn)
    out.sum().backward()
    expected = dk.DualCoOpHead(wta="pos_softmax", backend="reference").double()(features, te, tp, tn)
    torch.testing.assert_close(out, expected)
    assert head.log_spatial_temp.grad is not None and te.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize("tiles", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("wta", WTA_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_operators_pass_torch_library_opcheck(wta, dtype, tiles):
    """PyTorch's own test of a custom operator: schema, fake (meta) implementation, autograd
    registration, and that outputs are the same from call to call (no unwritten memory)."""
    features, te, tp, tn, log_temp = head_inputs(2, 19, 24, 21, dtype=dtype)
    options = [wta, 5.0, 20.0, tiles.as_list()]
    torch.library.opcheck(
        torch.ops.dualcoop_kernels.dualcoop_head_forward.default,
        (features, te.detach(), tp.detach(), tn.detach(), log_temp, *options),
    )
    saved = triton_head.dualcoop_head_forward(
        features.detach(), te.detach(), tp.detach(), tn.detach(), log_temp.detach(), *options
    )
    grad_logits = torch.randn(2, 2, 21, dtype=dtype)
    torch.library.opcheck(
        torch.ops.dualcoop_kernels.dualcoop_head_backward.default,
        (
            grad_logits,
            features.detach(),
            te.detach(),
            tp.detach(),
            tn.detach(),
            log_temp.detach(),
            *saved,
            *options,
            True,
            True,
            True,
        ),
    )


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("poisoned", ["features", "text_evidence", "text_pos", "text_neg"])
@pytest.mark.parametrize("wta", WTA_MODES)
def test_nan_in_an_input_gives_nan_logits_where_eager_does(poisoned, wta):
    """tl.max drops a NaN that torch.max returns: a NaN prompt of one class must still reach every class
    through the WTA statistics, as in eager."""
    inputs = list(head_inputs(2, 7, 16, 5, dtype=torch.float32, requires_grad=False))
    index = ["features", "text_evidence", "text_pos", "text_neg"].index(poisoned)
    inputs[index].view(-1)[9] = float("nan")
    expected = dualcoop_head_reference(*inputs, wta=wta)
    got = dualcoop_head_triton(*inputs, wta=wta)
    assert expected.isnan().any()
    assert torch.equal(got.isnan(), expected.isnan())


def test_negative_wta_gamma_is_refused_by_every_backend():
    features, te, tp, tn, log_temp = head_inputs(2, 5, 16, 3)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match=r"wta_gamma must be >= 0"):
            dk.dualcoop_head(features, te, tp, tn, log_temp, wta_gamma=-1.0, backend=backend)
    with pytest.raises(ValueError, match=r"wta_gamma must be >= 0"):
        dk.DualCoOpHead(wta_gamma=-200.0)
    zero = dk.dualcoop_head(features, te, tp, tn, log_temp, wta_gamma=0.0, backend="triton")
    torch.testing.assert_close(zero, dk.dualcoop_head(features, te, tp, tn, log_temp, wta_gamma=0.0))


def test_launches_run_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: every launch must sit inside the device guard."""
    entered = []
    real_guard = triton_head._on_device

    def recording_guard(device):
        entered.append(device)
        return real_guard(device)

    class GuardedLaunch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            assert entered, "a kernel launched outside the device guard"
            return self.kernel[grid]

    monkeypatch.setattr(triton_head, "_on_device", recording_guard)
    for kernel in head_kernels.KERNELS:
        monkeypatch.setattr(triton_head, kernel.fn.__name__, GuardedLaunch(kernel))
    features, *rest = head_inputs(2, 9, 16, 5)
    dualcoop_head_triton(features, *rest).sum().backward()
    assert entered == [features.device, features.device]  # the forward's launches, the backward's


def test_cuda_launch_settings_are_traceable(monkeypatch):
    """On CUDA the tile choice reads the GPU's multiprocessor count and compute capability; torch.compile
    must trace that path (it takes both as constants) without a graph break."""

    class Properties:
        multi_processor_count = 132
        major, minor = 9, 0

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())

    def splits_times(x):
        return x * triton_head.choose_launch_config(64, 196, 80, 512, torch.device("cuda")).splits

    expected = triton_head.choose_launch_config(64, 196, 80, 512, torch.device("cuda")).splits
    assert expected > 1
    compiled = torch.compile(splits_times, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(torch.ones(3)), torch.full((3,), float(expected)))


def test_the_dot_precision_is_traceable(monkeypatch):
    """On CUDA the precision reads the GPU's capability; torch.compile takes it as a constant."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 6))

    def precision_length(x):
        return x * len(dot_precision(torch.float32, triton_head._capability(torch.device("cuda"))))

    compiled = torch.compile(precision_length, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(torch.ones(3)), torch.full((3,), float(len("ieee"))))
