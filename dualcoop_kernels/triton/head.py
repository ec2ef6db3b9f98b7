"""Fused Triton head, the host side: launch settings, the launches, and the torch.library operators with
their autograd; the kernels are in head_kernels.py.

The decomposition is docs/math.md's "How the Triton head splits the work". Nothing is normalised in memory: the
kernels fold the inverse row norms of the features (B x N) and of the prompts (3 x C) into every
similarity tile, and the backward applies the normalisation's own gradient. The launches, where a
class tile holds up to ``MAX_CLASS_TILE`` classes; those marked "several class tiles" run only when
one tile cannot hold every class (winner-take-all then needs per-region statistics over all tiles):

forward
  region stats               grid (B, region tiles), sweeping all class tiles (several class tiles,
                             WTA modes): M = max_m s+ and m = min_m s+ with their arg-maxima, and per
                             side (u = gamma M s+ for the positive logits, gamma m s+ for the negative
                             ones) max u, s+ at its arg-max and, for the softmax kinds,
                             1 / sum_m exp(u - max u) (a second sweep: u needs M and m first)
  forward                    grid (B, region tiles, class tiles): the three similarity tiles in one
                             sweep over D, the WTA weights (from the statistics, or from the tile
                             itself when it holds every class, which then stores the statistics),
                             the tile's region-softmax parts
  combine regions            grid (B, class tiles): merges the parts into P-, P+ and the log-sum-exp
backward
  region sums                grid (B, region tiles), sweeping all class tiles (several class tiles,
                             WTA modes): per weighted side, the per-region sums over classes of the
                             WTA backward
  similarity grad            grid (B, region tiles, class tiles of a chunk): dS, the tile's
                             dL/dtheta term; for the prompts dS (class-major, f's norms folded in)
                             and <t, G> parts; for the features (one class tile) dL/dF, D swept in
                             registers
  text grad GEMM             grid (prompt-row tiles, D chunks, splits): G = dS^T F over a split of
                             the B*N rows; with the similarity grad, once per chunk of classes
  text finish                grid (class tiles, D chunks, 3): sums the splits, the normalisation
  feature grads              grid (B, region tiles), several class tiles and learning features:
                             dS tiles fed into dF = dS t, then the normalisation step

Saved for the backward: the inputs, the logits in the compute dtype, O(B*C + B*N) statistics and, up
to ``SAVED_CLASSES`` classes, the three similarity matrices (the forward writes them when a backward
will follow, ``LaunchConfig.save_similarities``; the similarity grad then reads them instead of
recomputing its GEMM); the backward writes dS for at most ``GRAD_SIM_BYTES`` of classes at a time (a
chunk), never all of a large C. Arithmetic is float32 for fp16, bf16 and fp32 inputs, with
float32-accurate dots (WTA amplifies TF32 error: docs/math.md, "Numerics"; which products on which
GPU: precision.py), and float64 for float64 inputs. The scalars gamma and k are kernel arguments typed
float64, converted to the compute dtype on entry: untyped, a Python float reaches a GPU kernel as
fp32, which would round them for a float64 head. Every launch runs under the tensors' CUDA device (and
so its current stream), whatever the current device is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import torch
import triton
import triton.language as tl

from ..options import DEFAULT_LOGIT_SCALE, DEFAULT_WTA_GAMMA, WTA_WEIGHT_CODES, WTA_WEIGHTS
from .head_kernels import (
    INDICES,
    PARTIALS,
    STATS,
    SUMS,
    _combine_regions_kernel,
    _feature_grad_kernel,
    _forward_kernel,
    _region_stats_kernel,
    _region_sums_kernel,
    _similarity_grad_kernel,
    _text_grad_finish_kernel,
    _text_grad_gemm_kernel,
)
from .precision import dot_precision, similarity_dtype

NORM_EPS = 1e-12  # as F.normalize
PARTIALS_BYTES = 32 * 2**20  # most memory the text gradient's per-split partial sums may take
GRAD_SIM_BYTES = 256 * 2**20  # most memory dS of one chunk of classes may take (3 x chunk x B*N, float32)
MAX_CLASS_TILE = 128  # most classes of a tile: 32 regions by 128 classes keep the kernels free of spills
SAVED_CLASSES = 256  # most classes whose similarities the forward saves for the backward (3 x B x N x C)
# most splits, then classes and D, of a text-finish program's loads: small, for enough programs to read the partials
FINISH_TILE = (16, 16, 32)


@dataclass(frozen=True)
class LaunchConfig:
    """How the kernels are launched: tile sizes (regions, classes, the D step of the similarity GEMM,
    the D chunk of the gradient GEMMs, held in registers), how many partial sums the text gradient
    GEMM splits its rows into, the region tile of the similarity gradient (at most 16 when the
    features learn in it: dF's loop needs the registers), the GEMM's tile of prompt rows and step
    over feature rows, and the class tile of the kernels that sweep every class for a region tile
    (the statistics, the WTA sums, the features' gradient of several class tiles); then Triton's
    launch options: ``num_stages`` for the kernels whose loop is a GEMM alone (two stages pipeline
    its loads with async copies), ``grad_stages`` for the gradient kernels that also compute dS; and
    whether the forward saves the three similarity matrices for the backward (``save_similarities``,
    0 or 1), which then reads them instead of recomputing them. A class tile that holds every class
    (``block_c >= C``) needs no statistics or sums sweep: the tile computes them."""

    block_n: int
    block_c: int
    block_d: int
    block_d_grad: int
    splits: int = 1
    num_warps: int = 8
    num_stages: int = 2
    grad_stages: int = 1
    grad_block_n: int = 16
    gemm_block_m: int = 64
    gemm_block_k: int = 32
    sweep_block_c: int = 64
    save_similarities: int = 0

    def as_list(self) -> list[int]:
        # as the operators take it; not astuple, whose deepcopy torch.compile <= 2.9 cannot trace
        return [getattr(self, field.name) for field in fields(self)]


def _pow2_between(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(value)))


def choose_launch_config(B: int, N: int, C: int, D: int, device: torch.device) -> LaunchConfig:
    """Tile sizes for a shape, and enough text-gradient GEMM splits to fill the multiprocessors, as far
    as ``PARTIALS_BYTES`` allows; tl.dot needs every side >= 16. Compiled as launched
    (``benchmarks/kernel_resources.py``), these sizes are what keeps the kernels free of spills: 32
    regions by up to 128 classes (larger tiles spill), the larger GEMM and sweep tiles on sm_90 only."""
    hopper = device.type == "cuda" and _capability(device) == (9, 0)
    launch = LaunchConfig(
        block_n=_pow2_between(N, 16, 32),
        block_c=_pow2_between(C, 16, MAX_CLASS_TILE),
        block_d=16,
        block_d_grad=_pow2_between(D, 16, 128 if hopper else 64),
        grad_block_n=_pow2_between(N, 16, 32 if hopper else 16),
        gemm_block_m=128 if hopper else 64,
        grad_stages=2,
        sweep_block_c=128 if hopper else 64,  # 128 spills the statistics' IEEE loop on sm_86 and sm_89
        save_similarities=int(C <= SAVED_CLASSES),
    )
    if device.type != "cuda":
        return launch
    # one wave of GEMM programs: more splits only add partials to read
    gemm_tiles = triton.cdiv(3 * C, launch.gemm_block_m) * triton.cdiv(D, launch.block_d_grad)
    by_parallelism = _multiprocessors(device) // gemm_tiles
    by_memory = PARTIALS_BYTES // (3 * C * D * 4)  # each split keeps a float32 partial of the prompts
    return replace(launch, splits=max(1, min(by_parallelism, by_memory)))


@torch.compiler.assume_constant_result
def _multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessor count; torch.compile reads it once, while tracing, as a constant."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _kernel_output(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A buffer the kernels fill completely; the tests poison it to prove they do."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device's current stream: make that the tensors' device, on
    which PyTorch queues their work (a no-op on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.compiler.assume_constant_result
def _capability(device: torch.device) -> tuple[int, int] | None:
    """The GPU's compute capability, None off the GPU (the interpreter); torch.compile reads it once."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _kernel_constants(dtype: torch.dtype, launch: LaunchConfig, wta: str, device: torch.device) -> dict:
    """The kernels' constexpr arguments for inputs of ``dtype`` on ``device``."""
    compute = _compute_dtype(dtype)
    return dict(
        WTA_POS=WTA_WEIGHT_CODES[WTA_WEIGHTS[wta][0]],
        WTA_NEG=WTA_WEIGHT_CODES[WTA_WEIGHTS[wta][1]],
        BLOCK_N=launch.block_n,
        BLOCK_C=launch.block_c,
        BLOCK_D=launch.block_d,
        ACC=tl.float64 if compute == torch.float64 else tl.float32,
        PRECISION=dot_precision(compute, _capability(device)),
        SIM_DTYPE=similarity_dtype(dtype, _capability(device)),
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )


def _sweep_constants(constants: dict, launch: LaunchConfig, **more) -> dict:
    """The constants of a kernel that sweeps every class tile for its region tile."""
    return dict(constants, BLOCK_C=min(launch.block_c, launch.sweep_block_c), **more)


def _inverse_norms(rows: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """1 / max(|row|, eps) along the last dim, as F.normalize divides."""
    return torch.linalg.vector_norm(rows, dim=-1, dtype=compute).clamp_min(NORM_EPS).reciprocal()


def _common_args(features, text, text_inv_norm, inv_norm):
    """The arguments every kernel starts with: features and strides, the (3, C, D) prompts, both
    inverse norms."""
    return (features, *features.stride(), text, text_inv_norm, inv_norm)


# Explicit schemas: torch < 2.7 cannot infer one from string annotations or from list[int].
@torch.library.custom_op(
    "dualcoop_kernels::dualcoop_head_forward",
    mutates_args=(),
    schema="(Tensor features, Tensor text_evidence, Tensor text_pos, Tensor text_neg, Tensor log_spatial_temp, "
    "str wta, float wta_gamma, float logit_scale, int[] launch_config) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def dualcoop_head_forward(
    features: torch.Tensor,
    text_evidence: torch.Tensor,
    text_pos: torch.Tensor,
    text_neg: torch.Tensor,
    log_spatial_temp: torch.Tensor,
    wta: str,
    wta_gamma: float,
    logit_scale: float,
    launch_config: list[int],
) -> tuple[torch.Tensor, ...]:
    """Fused forward; the prompt sets are C x D, of any strides (the kernels read them stacked, a copy).

    Returns the B x 2 x C logits in the compute dtype and, for the backward, the (B, C) log-sum-exp of
    the region softmax, the (B, N) and (3, C) inverse norms, the (STATS, B, N) region statistics, the
    (INDICES, B, N) arg-maxima and the (3, B*N, C) similarities when the launch saves them (empty
    otherwise).
    """
    B, N, D = features.shape
    C = text_pos.shape[0]
    texts = (text_evidence, text_pos, text_neg)
    compute = _compute_dtype(features.dtype)
    launch = LaunchConfig(*launch_config)
    device = features.device
    logits = _kernel_output(B, 2, C, device=device, dtype=compute)
    lse = _kernel_output(B, C, device=device, dtype=compute)
    # without WTA no kernel writes the statistics: zeros, since an operator's outputs must be defined
    buffer = torch.zeros if wta == "none" else _kernel_output
    stats = buffer(STATS, B, N, device=device, dtype=compute)
    index = buffer(INDICES, B, N, device=device, dtype=torch.int32)
    inv_norm = _inverse_norms(features, compute)
    text_inv_norm = torch.stack([_inverse_norms(text, compute) for text in texts])  # (3, C)
    sims = _kernel_output(*_saved_shape(B, N, C, launch), device=device, dtype=compute)
    if B == 0:
        return logits, lse, inv_norm, text_inv_norm, stats, index, sims
    constants = _kernel_constants(features.dtype, launch, wta, device)
    common = _common_args(features, torch.stack(texts), text_inv_norm, inv_norm)
    region_tiles, class_tiles = triton.cdiv(N, launch.block_n), triton.cdiv(C, launch.block_c)
    partials = _kernel_output(PARTIALS, B * region_tiles * C, device=device, dtype=compute)
    with _on_device(device):
        if class_tiles > 1 and wta != "none":
            _region_stats_kernel[(B, region_tiles)](
                *common, stats, index, B * N, N, C, D, wta_gamma, **_sweep_constants(constants, launch)
            )
        _forward_kernel[(B, region_tiles, class_tiles)](
            *common, stats, index, B * N, log_spatial_temp, partials, partials.stride(0), sims, sims.stride(0),
            N, C, D, wta_gamma, ALL_CLASSES=class_tiles == 1, SAVE_SIMILARITIES=bool(launch.save_similarities),
            **constants,
        )  # fmt: skip
        _combine_regions_kernel[(B, class_tiles)](
            partials, partials.stride(0), logits, lse, C, region_tiles, logit_scale,
            BLOCK_C=launch.block_c, ACC=constants["ACC"], num_warps=4,
        )  # fmt: skip
    return logits, lse, inv_norm, text_inv_norm, stats, index, sims


def _saved_shape(B: int, N: int, C: int, launch: LaunchConfig) -> tuple[int, ...]:
    """The saved similarities' shape: (3, B*N, C), or empty when the launch does not save them."""
    return (3, B * N, C) if launch.save_similarities else (0,)


@dualcoop_head_forward.register_fake
def _(features, text_evidence, text_pos, text_neg, log_spatial_temp, wta, wta_gamma, logit_scale, launch_config):
    B, N, _ = features.shape
    C = text_pos.shape[0]
    compute = _compute_dtype(features.dtype)

    def new(*shape, dtype=compute):
        return features.new_empty(shape, dtype=dtype)

    return (
        *(new(B, 2, C), new(B, C), new(B, N), new(3, C), new(STATS, B, N), new(INDICES, B, N, dtype=torch.int32)),
        new(*_saved_shape(B, N, C, LaunchConfig(*launch_config))),
    )


@torch.library.custom_op(
    "dualcoop_kernels::dualcoop_head_backward",
    mutates_args=(),
    schema="(Tensor grad_logits, Tensor features, Tensor text_evidence, Tensor text_pos, Tensor text_neg, "
    "Tensor log_spatial_temp, Tensor logits, Tensor lse, Tensor inv_norm, Tensor text_inv_norm, Tensor stats, "
    "Tensor index, Tensor similarities, str wta, float wta_gamma, float logit_scale, int[] launch_config, "
    "bool want_features, bool want_texts, bool want_temp) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def dualcoop_head_backward(
    grad_logits: torch.Tensor,
    features: torch.Tensor,
    text_evidence: torch.Tensor,
    text_pos: torch.Tensor,
    text_neg: torch.Tensor,
    log_spatial_temp: torch.Tensor,
    logits: torch.Tensor,
    lse: torch.Tensor,
    inv_norm: torch.Tensor,
    text_inv_norm: torch.Tensor,
    stats: torch.Tensor,
    index: torch.Tensor,
    similarities: torch.Tensor,
    wta: str,
    wta_gamma: float,
    logit_scale: float,
    launch_config: list[int],
    want_features: bool,
    want_texts: bool,
    want_temp: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: gradients to ``features``, to the three prompt sets and to ``log_spatial_temp``,
    each in its input's dtype; an empty tensor for each one not wanted, which costs nothing."""
    B, N, D = features.shape
    C = text_pos.shape[0]
    texts = (text_evidence, text_pos, text_neg)
    compute = logits.dtype
    launch = LaunchConfig(*launch_config)
    device = features.device

    def nothing():  # a fresh one each time: a custom op's outputs must not alias each other
        return features.new_empty(0)

    grad_texts = [_kernel_output(C, D, device=device, dtype=t.dtype) if want_texts else nothing() for t in texts]
    if B == 0:
        return (
            torch.zeros_like(features) if want_features else nothing(),
            *[g.zero_() for g in grad_texts],
            torch.zeros_like(log_spatial_temp) if want_temp else nothing(),
        )
    with _on_device(device):
        grad_logits = grad_logits.to(compute).contiguous()
        constants = _kernel_constants(features.dtype, launch, wta, device)
        text = torch.stack(texts)
        common = _common_args(features, text, text_inv_norm, inv_norm)
        state = (stats, index, B * N, log_spatial_temp, lse, logits, grad_logits)
        grad_features = _kernel_output(B, N, D, device=device, dtype=features.dtype) if want_features else nothing()
        wants = (want_features, want_texts, want_temp)
        parts = _backward_launches(
            common, state, similarities, grad_features, (B, N, C, D), launch, constants, wta_gamma, logit_scale, wants
        )
        grad_temp = nothing()
        if want_texts:
            grad_text_parts, projection = parts["grad_text"], parts["projection"]
            most_splits, block_c, block_d = FINISH_TILE
            block_splits = _pow2_between(grad_text_parts.shape[0], 1, most_splits)
            _text_grad_finish_kernel[(triton.cdiv(C, block_c), triton.cdiv(D, block_d), 3)](
                text, text_inv_norm, grad_text_parts, projection, *grad_texts, C, D, C * D,
                grad_text_parts.shape[0], BLOCK_SPLITS=block_splits, BLOCK_C=block_c, BLOCK_DT=block_d,
                ACC=constants["ACC"], num_warps=8,  # 4 spill the loaded partials on sm_90
            )  # fmt: skip
        if want_temp:
            grad_temp = parts["grad_temp"].sum().to(log_spatial_temp.dtype)
        return grad_features, *grad_texts, grad_temp


def _backward_launches(
    common, state, similarities, grad_features, shape, launch, constants, gamma, logit_scale, wants
) -> dict:
    """The backward's launches. Returns what the host finishes: ``grad_temp``, partial sums of
    dL/dtheta, and when the prompts learn ``grad_text``, the per-split partials of G = dS^T f
    (splits, 3, C, D), and ``projection``, the (3, C) sums <t, G>."""
    B, N, C, D = shape
    want_features, want_texts, want_temp = wants
    all_classes = launch.block_c >= C
    weighted = constants["WTA_POS"] != WTA_WEIGHT_CODES["one"] or constants["WTA_NEG"] != WTA_WEIGHT_CODES["one"]
    stats, index, stat_stride, log_temp, lse, _, grad_logits = state
    sums = stats  # unread when a tile holds every class (it sums itself) or without WTA
    if weighted and not all_classes:
        sums = _kernel_output(SUMS, B, N, device=stats.device, dtype=stats.dtype)
        _region_sums_kernel[(B, triton.cdiv(N, launch.block_n))](
            *common, stats, index, stat_stride, log_temp, lse, grad_logits, sums, N, C, D, gamma, logit_scale,
            **_sweep_constants(constants, launch),
        )  # fmt: skip
    features_in_tile = want_features and all_classes
    parts = {}
    if want_texts or want_temp or features_in_tile:
        parts = _similarity_grads(
            common, state, sums, similarities, grad_features, shape, launch, constants, gamma, logit_scale,
            want_texts, features_in_tile,
        )  # fmt: skip
    if want_features and not all_classes:
        scratch = _kernel_output(B, N, D, device=stats.device, dtype=stats.dtype)
        _feature_grad_kernel[(B, triton.cdiv(N, launch.block_n))](
            *common, *state, sums, scratch, grad_features, N, C, D, gamma, logit_scale,
            BLOCK_DT=launch.block_d_grad, **_sweep_constants(constants, launch, num_stages=launch.grad_stages),
        )  # fmt: skip
    return parts


def _similarity_grads(
    common, state, sums, similarities, grad_features, shape, launch, constants, gamma, logit_scale, want_texts,
    want_features,
) -> dict:  # fmt: skip
    """dS tile by tile (with dL/dtheta's terms, and dL/dF when ``want_features``: one class tile), and
    for the prompts, chunk of classes by chunk, G = dS^T f as a split GEMM over the B*N rows
    (``_backward_launches`` says what comes back)."""
    B, N, C, D = shape
    features, device, compute = common[0], state[0].device, state[0].dtype
    block_n = min(launch.grad_block_n, 16) if want_features else launch.grad_block_n  # dF's loop: more registers
    region_tiles, class_tiles = triton.cdiv(N, block_n), triton.cdiv(C, launch.block_c)
    chunk = _chunk_classes(B * N, C, launch.block_c) if want_texts else C
    projection = _kernel_output(B * region_tiles if want_texts else 0, 3, C, device=device, dtype=compute)
    parts = dict(grad_temp=_kernel_output(B * region_tiles, class_tiles, device=device, dtype=compute))
    rows_per_split, splits = text_gemm_splits(B * N, launch)
    if want_texts:
        parts["grad_text"] = _kernel_output(splits, 3, C, D, device=device, dtype=compute)
    for class_start in range(0, C, chunk):
        chunk_classes = min(chunk, C - class_start)
        grad_sim = _kernel_output(3, chunk_classes if want_texts else 0, B * N, device=device, dtype=compute)
        _similarity_grad_kernel[(B, region_tiles, triton.cdiv(chunk_classes, launch.block_c))](
            *common, *state, sums, similarities, similarities.stride(0), grad_sim, grad_sim.stride(0), projection,
            parts["grad_temp"], grad_features, N, C, D, B * N, class_start, chunk_classes, gamma, logit_scale,
            ALL_CLASSES=class_tiles == 1, SAVED_SIMILARITIES=bool(launch.save_similarities),
            WANT_TEXT=want_texts, WANT_FEATURES=want_features,
            **dict(constants, BLOCK_N=block_n, num_stages=launch.grad_stages),
        )  # fmt: skip
        if want_texts:
            grid = (triton.cdiv(3 * chunk_classes, launch.gemm_block_m), triton.cdiv(D, launch.block_d_grad), splits)
            _text_grad_gemm_kernel[grid](
                grad_sim, features, *features.stride(), parts["grad_text"], C, class_start, chunk_classes, N, D,
                B * N, rows_per_split, BLOCK_M=launch.gemm_block_m, BLOCK_K=launch.gemm_block_k,
                BLOCK_DT=launch.block_d_grad, ACC=constants["ACC"], PRECISION=constants["PRECISION"],
                num_warps=launch.num_warps, num_stages=launch.num_stages,
            )  # fmt: skip
    if want_texts:
        parts["projection"] = projection.sum(0)
    return parts


def text_gemm_splits(rows: int, launch: LaunchConfig) -> tuple[int, int]:
    """The text-gradient GEMM's feature rows per split (whole K steps) and its number of splits."""
    per_split = triton.cdiv(triton.cdiv(rows, launch.splits), launch.gemm_block_k) * launch.gemm_block_k
    return per_split, triton.cdiv(rows, per_split)


def _chunk_classes(rows: int, C: int, block_c: int) -> int:
    """Classes per chunk of the backward: whole class tiles whose dS (3 x chunk x rows, float32) fits
    ``GRAD_SIM_BYTES``, at least one tile."""
    tiles = GRAD_SIM_BYTES // (3 * rows * 4 * block_c)
    return min(C, max(1, tiles) * block_c)


@dualcoop_head_backward.register_fake
def _(
    grad_logits,
    features,
    text_evidence,
    text_pos,
    text_neg,
    log_spatial_temp,
    logits,
    lse,
    inv_norm,
    text_inv_norm,
    stats,
    index,
    similarities,
    wta,
    wta_gamma,
    logit_scale,
    launch_config,
    want_features,
    want_texts,
    want_temp,
):
    def like(tensor, wanted):
        return tensor.new_empty(tensor.shape) if wanted else features.new_empty(0)

    return (
        like(features, want_features),
        *(like(t, want_texts) for t in (text_evidence, text_pos, text_neg)),
        like(log_spatial_temp, want_temp),
    )


def _setup_context(ctx, inputs, output):
    features, text_evidence, text_pos, text_neg, log_spatial_temp, wta, wta_gamma, logit_scale, launch_config = inputs
    logits, *saved = output
    ctx.save_for_backward(features, text_evidence, text_pos, text_neg, log_spatial_temp, logits, *saved)
    ctx.options = (wta, wta_gamma, logit_scale, launch_config)
    ctx.mark_non_differentiable(*saved)


def _backward(ctx, grad_logits, *_unused_grads):
    want_features = ctx.needs_input_grad[0]
    want_texts = any(ctx.needs_input_grad[1:4])
    want_temp = ctx.needs_input_grad[4]
    if not (want_features or want_texts or want_temp):
        return (None,) * 9
    grad_features, *grad_texts, grad_temp = dualcoop_head_backward(
        grad_logits, *ctx.saved_tensors, *ctx.options, want_features, want_texts, want_temp
    )
    grads = (grad_features, *grad_texts, grad_temp)
    return (*(g if wanted else None for g, wanted in zip(grads, ctx.needs_input_grad[:5])), None, None, None, None)


dualcoop_head_forward.register_autograd(_backward, setup_context=_setup_context)


def dualcoop_head_triton(
    features: torch.Tensor,
    text_evidence: torch.Tensor,
    text_pos: torch.Tensor,
    text_neg: torch.Tensor,
    log_spatial_temp: torch.Tensor,
    *,
    wta: str = "pos_norm",
    wta_gamma: float = DEFAULT_WTA_GAMMA,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    launch: LaunchConfig | None = None,
) -> torch.Tensor:
    """The head through the fused kernels; same contract as ``dualcoop_head_reference``.

    ``features`` and the prompt sets may have any strides.
    ``launch`` overrides the tile sizes and launch options (tests use it to force several tiles on small shapes).
    """
    B, N, D = features.shape
    C = text_pos.shape[0]
    launch = launch or choose_launch_config(B, N, C, D, features.device)
    inputs = (features, text_evidence, text_pos, text_neg, log_spatial_temp)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        launch = replace(launch, save_similarities=0)  # no backward to read them
    logits = dualcoop_head_forward(
        features,
        text_evidence,
        text_pos,
        text_neg,
        log_spatial_temp,
        wta,
        wta_gamma,
        logit_scale,
        launch.as_list(),
    )[0]
    return logits.to(features.dtype)
