"""Fused Triton head: kernels, host functions, and the torch.library operators with their autograd.

The decomposition is docs/math.md's "How the Triton head splits the work". Nothing is normalised in memory: the
kernels fold the inverse row norms of the features (B x N) and of the prompts (3 x C) into every
similarity tile, and the backward applies the normalisation's own gradient. Launches when one class
tile holds every class (``block_c >= C``: up to ROW_CLASSES classes), the row path:

forward
  rows forward               grid (B, region tiles): the three similarity tiles in one sweep over D,
                             the WTA statistics from them (stored), the tile's region-softmax parts
  rows combine               grid (B, class tiles): merges the parts into P-, P+ and the log-sum-exp
backward
  rows grad                  grid (B, region tiles): dS with the WTA sums from the tile itself, the
                             tile's dL/dtheta term; for the prompts dS (class-major, f's norms
                             folded in) and <t, G> parts; for the features dL/dF, D swept in registers
  text grad GEMM             grid (3C tiles, D chunks, splits): G = dS^T F over a split of the B*N rows
  text finish                grid (class tiles, D chunks, 3): sums the splits, the normalisation

and otherwise, the tiled path:

forward
  region stats  (WTA modes)  grid (B, region tiles), sweeping all class tiles: M = max_m s+ and
                             m = min_m s+ with their arg-maxima, and per side (u = gamma M s+ for the
                             positive logits, gamma m s+ for the negative ones) max u, s+ at its
                             arg-max and, for the softmax kinds, 1 / sum_m exp(u - max u) (a second
                             sweep: u needs M and m first)
  main                       grid (B, class tiles), sweeping region tiles: the three similarity tiles,
                             WTA weights, online softmax over regions; writes P-, P+ and the region
                             softmax's log-sum-exp per (image, class)
backward
  region sums   (WTA modes)  grid (B, region tiles): per weighted side, the per-region sums over
                             classes of the WTA backward
  text grads                 grid (class tiles, D chunks, splits): dS tiles fed into dT = dS^T f with
                             the D chunk in registers, one partial per split (no atomics), plus the
                             partial sums of dL/dtheta and of <t, dT> for the normalisation step
  text finish                grid (prompt rows, D chunks): sums the splits, applies the normalisation
  feature grads (if needed)  grid (B, region tiles, D chunks): dS tiles fed into dF = dS t, then the
                             normalisation step

The tiled path writes nothing of size B x N x C (the backward recomputes similarity tiles); the row
path writes dS (3 x C x B*N, compute dtype) during the backward only. Saved for the backward:
the inputs, the logits in the compute dtype, and O(B*C + B*N) statistics. Arithmetic is float32 for
fp16, bf16 and fp32 inputs, with float32-accurate dots (WTA amplifies TF32 error: docs/math.md,
"Numerics"; which products on which GPU: precision.py), and float64 for float64 inputs. The scalars
gamma and k are kernel arguments typed float64, converted to the compute dtype on entry: untyped, a
Python float reaches a GPU kernel as fp32, which would round them for a float64 head. Every launch
runs under the tensors' CUDA device (and so its current stream), whatever the current device is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import torch
import triton
import triton.language as tl

from ..options import DEFAULT_LOGIT_SCALE, DEFAULT_WTA_GAMMA, WTA_WEIGHT_CODES, WTA_WEIGHTS
from .precision import dot_precision, similarity_dtype

# The kernels' WTA_POS and WTA_NEG: how a mode weighs the positive and the negative logits (options.py).
WEIGHT_ONE, WEIGHT_NORM, WEIGHT_ONE_PLUS_SOFTMAX, WEIGHT_SOFTMAX = (
    tl.constexpr(WTA_WEIGHT_CODES[kind]) for kind in ("one", "norm", "one_plus_softmax", "softmax")
)
SIDE_POS, SIDE_NEG = tl.constexpr(0), tl.constexpr(1)  # added to a statistic's first row: that side's row
NORM_EPS = 1e-12  # as F.normalize
PARTIALS_BYTES = 32 * 2**20  # most memory the text gradient's per-split partial sums may take
ROW_CLASSES = 128  # most classes the row kernels hold in one tile
FINISH_TILE = (32, 64)  # classes and D of a text-finish program: small, for enough programs to read the partials

# Per-region float statistics, stacked along dim 0 of one (STATS, B, N) tensor, two rows each (a side's
# row: the first plus the side): STAT_COEF is c in u = gamma c s+ (M for the positive side, m for the
# negative one), STAT_MAX_U the largest u, STAT_INV_TOTAL 1 / sum_m exp(u - max u) (the softmax kinds;
# 1 otherwise), STAT_SHIFT s+ at the arg-max of u. Constexpr: kernels read them.
STAT_COEF, STAT_MAX_U, STAT_INV_TOTAL, STAT_SHIFT = (tl.constexpr(i) for i in (0, 2, 4, 6))
# Per-region indices, stacked along dim 0 of one (INDICES, B, N) int32 tensor: the arg-max and arg-min
# of s+ (where dM and dm go; first row plus the side), and the arg-max of the positive u (norm's winner).
INDEX_COEF, INDEX_WINNER = tl.constexpr(0), tl.constexpr(2)
# The row forward's per-(image, region tile, class) partial sums of the region softmax, rows of one tensor.
PARTIAL_MAX, PARTIAL_SUM, PARTIAL_POS, PARTIAL_NEG = (tl.constexpr(i) for i in range(4))
SUMS_PER_SIDE = tl.constexpr(3)  # per-region sums of the WTA backward, three per side: (SUMS, B, N)
STATS, INDICES, SUMS, PARTIALS = 8, 3, 6, 4  # the host's sizes of the four


# ----------------------------------------------------------------------------------------------------
# Tile helpers shared by the kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _round_tf32(x):
    """float32 to the nearest TF32 (10 fraction bits, ties away from zero), as cvt.rna.tf32 rounds."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _round_bf16(x):
    """float32 to the nearest bfloat16 (ties to even), kept in float32."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with the products ``precision.py`` chose; its "emulate-*" precisions (the interpreter only)
    round the operands as a GPU would and multiply exactly."""
    if PRECISION == "emulate-tf32":
        result = tl.dot(_round_tf32(a), _round_tf32(b), input_precision="ieee", out_dtype=ACC)
    elif PRECISION == "emulate-tf32x3":  # big and small TF32 parts, small x small dropped
        a_big, b_big = _round_tf32(a), _round_tf32(b)
        result = tl.dot(_round_tf32(a - a_big), b_big, input_precision="ieee", out_dtype=ACC)
        result += tl.dot(a_big, _round_tf32(b - b_big), input_precision="ieee", out_dtype=ACC)
        result += tl.dot(a_big, b_big, input_precision="ieee", out_dtype=ACC)
    elif PRECISION == "emulate-bf16":
        result = tl.dot(_round_bf16(a), _round_bf16(b), input_precision="ieee", out_dtype=ACC)
    else:
        result = tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)
    return result


@triton.jit
def _similarity_dot(
    f, t, ACC: tl.constexpr, PRECISION: tl.constexpr, SIM_DTYPE: tl.constexpr, CLASS_MAJOR: tl.constexpr
):
    """f @ t^T, or t @ f^T when ``CLASS_MAJOR``, for operands loaded in ``SIM_DTYPE``: bf16 and fp16
    multiply natively, as they are."""
    if CLASS_MAJOR:
        a, b = t, tl.trans(f)
    else:
        a, b = f, tl.trans(t)
    if SIM_DTYPE == ACC:
        return _dot(a, b, ACC, PRECISION)
    return tl.dot(a, b, out_dtype=ACC)


@triton.jit
def _prompt_product(
    f, text_ptr, prompt_set, C, D, classes, class_mask, dims, dim_mask,
    ACC: tl.constexpr, PRECISION: tl.constexpr, SIM_DTYPE: tl.constexpr, CLASS_MAJOR: tl.constexpr,
):  # fmt: skip
    """A D chunk of one prompt set's similarities with the features' chunk ``f`` (``_similarity_dot``)."""
    t = _load_text_chunk(text_ptr + prompt_set * C * D, classes, class_mask, dims, dim_mask, D, SIM_DTYPE)
    return _similarity_dot(f, t, ACC, PRECISION, SIM_DTYPE, CLASS_MAJOR)


@triton.jit
def _load_feature_chunk(f_ptr, stride_fn, stride_fd, regions, region_mask, dims, dim_mask, ACC: tl.constexpr):
    offsets = regions.to(tl.int64)[:, None] * stride_fn + dims.to(tl.int64)[None, :] * stride_fd
    return tl.load(f_ptr + offsets, mask=region_mask[:, None] & dim_mask[None, :], other=0.0).to(ACC)


@triton.jit
def _load_text_chunk(t_ptr, classes, class_mask, dims, dim_mask, D, ACC: tl.constexpr):
    offsets = classes.to(tl.int64)[:, None] * D + dims[None, :]
    return tl.load(t_ptr + offsets, mask=class_mask[:, None] & dim_mask[None, :], other=0.0).to(ACC)


@triton.jit
def _region_tile(f_ptr, stride_fb, inv_norm_ptr, N, BLOCK_N: tl.constexpr):
    """The (image, region tile) of a program on grid axes 0 and 1: the image, its regions and their
    mask, the image's features, the regions' offsets into (B, N) arrays and their inverse norms."""
    image = tl.program_id(0).to(tl.int64)
    regions = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    region_mask = regions < N
    offsets = image * N + regions
    inv_norm = tl.load(inv_norm_ptr + offsets, mask=region_mask, other=0.0)
    return image, regions, region_mask, f_ptr + image * stride_fb, offsets, inv_norm


@triton.jit
def _similarity_tiles(
    f_ptr,
    stride_fn,
    stride_fd,
    regions,
    region_mask,
    inv_norm,
    text_ptr,
    text_inv_norm_ptr,
    C,
    D,
    classes,
    class_mask,
    WANT_E: tl.constexpr,
    WANT_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    SIM_DTYPE: tl.constexpr,
):
    """Cosine similarities of a region tile with a class tile of each prompt set: (s^e, s^+, s^-).

    ``f_ptr`` points at the image's first region; ``inv_norm`` holds the tile's inverse feature norms.
    Unwanted sets come back as zeros; masked rows and columns are zero. The operands are multiplied in
    ``SIM_DTYPE``: bf16 and fp16 inputs as they are on a GPU (their products are exact in float32, which
    accumulates), the compute dtype otherwise (precision.py). The GEMM's M side is the larger tile
    (classes when ``BLOCK_C > BLOCK_N``, then transposed once): Hopper's wgmma needs M >= 64.
    """
    CLASS_MAJOR: tl.constexpr = BLOCK_C > BLOCK_N
    shape: tl.constexpr = (BLOCK_C, BLOCK_N) if CLASS_MAJOR else (BLOCK_N, BLOCK_C)
    sim_e = tl.zeros(shape, dtype=ACC)
    sim_p = tl.zeros(shape, dtype=ACC)
    sim_n = tl.zeros(shape, dtype=ACC)
    for d_start in range(0, D, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        dim_mask = dims < D
        f = _load_feature_chunk(f_ptr, stride_fn, stride_fd, regions, region_mask, dims, dim_mask, SIM_DTYPE)
        sim_p += _prompt_product(
            f, text_ptr, 1, C, D, classes, class_mask, dims, dim_mask, ACC, PRECISION, SIM_DTYPE, CLASS_MAJOR
        )
        if WANT_E:
            sim_e += _prompt_product(
                f, text_ptr, 0, C, D, classes, class_mask, dims, dim_mask, ACC, PRECISION, SIM_DTYPE, CLASS_MAJOR
            )
        if WANT_N:
            sim_n += _prompt_product(
                f, text_ptr, 2, C, D, classes, class_mask, dims, dim_mask, ACC, PRECISION, SIM_DTYPE, CLASS_MAJOR
            )
    if CLASS_MAJOR:
        sim_e, sim_p, sim_n = tl.trans(sim_e), tl.trans(sim_p), tl.trans(sim_n)
    text_scale_e = tl.load(text_inv_norm_ptr + classes, mask=class_mask, other=0.0)
    text_scale_p = tl.load(text_inv_norm_ptr + C + classes, mask=class_mask, other=0.0)
    text_scale_n = tl.load(text_inv_norm_ptr + 2 * C + classes, mask=class_mask, other=0.0)
    scale = inv_norm[:, None]
    return (
        sim_e * scale * text_scale_e[None, :],
        sim_p * scale * text_scale_p[None, :],
        sim_n * scale * text_scale_n[None, :],
    )


@triton.jit
def _weights(sim_p, coef, max_u, inv_total, gamma, KIND: tl.constexpr):
    """One side's WTA weights of a tile from its per-region statistics: (w, sigma).

    sigma = exp(u - max u), divided by its sum over classes for the softmax kinds (times the stored
    reciprocal: exp(u - log-sum-exp) would lose the rounding of a log-sum-exp of about gamma), with
    u = gamma c s+ and c = M (positive side) or m (negative side); w = sigma for ``KIND`` norm and
    softmax, 1 + sigma for one_plus_softmax (sigma comes back on its own because w - 1 would round
    small sigmas away), and w = sigma = 1 for a side that is not weighted.
    """
    if KIND == WEIGHT_ONE:
        weights = tl.full(sim_p.shape, 1.0, sim_p.dtype)
        sigma = weights
    else:
        sigma = tl.exp(gamma * coef[:, None] * sim_p - max_u[:, None])
        if KIND != WEIGHT_NORM:
            sigma *= inv_total[:, None]
        weights = 1.0 + sigma if KIND == WEIGHT_ONE_PLUS_SOFTMAX else sigma
    return weights, sigma


@triton.jit
def _side_weights(sim_p, stats_ptr, stat_stride, offsets, region_mask, gamma, SIDE: tl.constexpr, KIND: tl.constexpr):
    """``_weights`` with the side's statistics loaded for the tile's regions."""
    coef = tl.zeros(offsets.shape, sim_p.dtype)
    max_u = coef
    inv_total = coef
    if KIND != WEIGHT_ONE:
        coef = tl.load(stats_ptr + (STAT_COEF + SIDE) * stat_stride + offsets, mask=region_mask, other=0.0)
        max_u = tl.load(stats_ptr + (STAT_MAX_U + SIDE) * stat_stride + offsets, mask=region_mask, other=0.0)
        if KIND != WEIGHT_NORM:
            inv_total = tl.load(
                stats_ptr + (STAT_INV_TOTAL + SIDE) * stat_stride + offsets, mask=region_mask, other=0.0
            )
    return _weights(sim_p, coef, max_u, inv_total, gamma, KIND)


@triton.jit
def _tile_extrema(sim_p, class_mask, c_start):
    """Per region of a class tile: max and min of s+ over its valid classes, their first arg-max and
    arg-min (class indices), and whether any s+ is NaN (tl.max drops NaN where torch.max returns it)."""
    for_max = tl.where(class_mask[None, :], sim_p, float("-inf"))
    for_min = tl.where(class_mask[None, :], sim_p, float("inf"))
    has_nan = tl.max((sim_p != sim_p).to(tl.int32), axis=1)
    return (
        tl.max(for_max, axis=1),
        tl.min(for_min, axis=1),
        tl.argmax(for_max, axis=1) + c_start,
        tl.argmin(for_min, axis=1) + c_start,
        has_nan,
    )


@triton.jit
def _shifts(run_max, run_min, has_nan, gamma):
    """M and m (NaN where a region's s+ has one), and per side z = s+ at the arg-max of u and max u:
    u = gamma c s+ peaks where s+ does when c >= 0, and where s+ is smallest when c < 0."""
    run_max = tl.where(has_nan > 0, float("nan"), run_max)
    run_min = tl.where(has_nan > 0, float("nan"), run_min)
    shift_pos = tl.where(run_max >= 0, run_max, run_min)
    shift_neg = tl.where(run_min >= 0, run_max, run_min)
    return run_max, run_min, shift_pos, shift_neg, gamma * run_max * shift_pos, gamma * run_min * shift_neg


@triton.jit
def _softmax_total(sim_p, class_mask, coef, max_u, gamma):
    """A class tile's part of sum_m exp(u - max u) per region, u = gamma c s+."""
    terms = tl.exp(gamma * coef[:, None] * sim_p - max_u[:, None])
    return tl.sum(tl.where(class_mask[None, :], terms, 0.0), axis=1)


@triton.jit
def _store_statistics(
    stats_ptr, index_ptr, stat_stride, offsets, region_mask, run_max, run_min, arg_max, arg_min,
    shift_pos, shift_neg, max_u_pos, max_u_neg, total_pos, total_neg,
):  # fmt: skip
    stats = stats_ptr + offsets
    tl.store(stats + (STAT_COEF + SIDE_POS) * stat_stride, run_max, mask=region_mask)
    tl.store(stats + (STAT_COEF + SIDE_NEG) * stat_stride, run_min, mask=region_mask)
    tl.store(stats + (STAT_MAX_U + SIDE_POS) * stat_stride, max_u_pos, mask=region_mask)
    tl.store(stats + (STAT_MAX_U + SIDE_NEG) * stat_stride, max_u_neg, mask=region_mask)
    tl.store(stats + (STAT_INV_TOTAL + SIDE_POS) * stat_stride, 1.0 / total_pos, mask=region_mask)
    tl.store(stats + (STAT_INV_TOTAL + SIDE_NEG) * stat_stride, 1.0 / total_neg, mask=region_mask)
    tl.store(stats + (STAT_SHIFT + SIDE_POS) * stat_stride, shift_pos, mask=region_mask)
    tl.store(stats + (STAT_SHIFT + SIDE_NEG) * stat_stride, shift_neg, mask=region_mask)
    index = index_ptr + offsets
    tl.store(index + (INDEX_COEF + SIDE_POS) * stat_stride, arg_max, mask=region_mask)
    tl.store(index + (INDEX_COEF + SIDE_NEG) * stat_stride, arg_min, mask=region_mask)
    tl.store(index + INDEX_WINNER * stat_stride, tl.where(run_max >= 0, arg_max, arg_min), mask=region_mask)


# ----------------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _positive_tile(
    f_ptr,
    stride_fn,
    stride_fd,
    regions,
    region_mask,
    inv_norm,
    text_ptr,
    text_inv_norm_ptr,
    C,
    D,
    c_start,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    SIM_DTYPE: tl.constexpr,
):
    """The class tile starting at ``c_start``: its mask and s+ alone."""
    classes = c_start + tl.arange(0, BLOCK_C)
    class_mask = classes < C
    _, sim_p, _ = _similarity_tiles(
        f_ptr,
        stride_fn,
        stride_fd,
        regions,
        region_mask,
        inv_norm,
        text_ptr,
        text_inv_norm_ptr,
        C,
        D,
        classes,
        class_mask,
        False,
        False,
        BLOCK_N,
        BLOCK_C,
        BLOCK_D,
        ACC,
        PRECISION,
        SIM_DTYPE,
    )
    return class_mask, sim_p


@triton.jit
def _region_stats_kernel(
    f_ptr,
    stride_fb,
    stride_fn,
    stride_fd,
    text_ptr,
    text_inv_norm_ptr,
    inv_norm_ptr,
    stats_ptr,
    index_ptr,
    stat_stride,
    N,
    C,
    D,
    gamma: tl.float64,
    WTA_POS: tl.constexpr,
    WTA_NEG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    SIM_DTYPE: tl.constexpr,
):
    """Every row of the statistics (STAT_*, INDEX_*) for a region tile, sweeping the class tiles; a side
    that is not weighted gets defined values all the same, since an operator's outputs must be."""
    gamma = tl.full((), gamma, ACC)  # typed float64: module doc
    _image, regions, region_mask, f_ptr, offsets, inv_norm = _region_tile(f_ptr, stride_fb, inv_norm_ptr, N, BLOCK_N)
    run_max = tl.full((BLOCK_N,), float("-inf"), ACC)
    run_min = tl.full((BLOCK_N,), float("inf"), ACC)
    arg_max = tl.zeros((BLOCK_N,), tl.int32)
    arg_min = tl.zeros((BLOCK_N,), tl.int32)
    has_nan = tl.zeros((BLOCK_N,), tl.int32)
    for c_start in range(0, C, BLOCK_C):
        class_mask, sim_p = _positive_tile(
            f_ptr, stride_fn, stride_fd, regions, region_mask, inv_norm, text_ptr, text_inv_norm_ptr, C, D,
            c_start, BLOCK_N, BLOCK_C, BLOCK_D, ACC, PRECISION, SIM_DTYPE,
        )  # fmt: skip
        tile_max, tile_min, tile_arg_max, tile_arg_min, tile_nan = _tile_extrema(sim_p, class_mask, c_start)
        # strict comparisons keep the first arg-max across tiles, as tl.argmax does within one
        arg_max = tl.where(tile_max > run_max, tile_arg_max, arg_max)
        arg_min = tl.where(tile_min < run_min, tile_arg_min, arg_min)
        run_max = tl.maximum(run_max, tile_max)
        run_min = tl.minimum(run_min, tile_min)
        has_nan = tl.maximum(has_nan, tile_nan)
    run_max, run_min, shift_pos, shift_neg, max_u_pos, max_u_neg = _shifts(run_max, run_min, has_nan, gamma)

    total_pos = tl.full((BLOCK_N,), 1.0, ACC)  # what a side that is no softmax stores
    total_neg = tl.full((BLOCK_N,), 1.0, ACC)
    POS_SOFTMAX: tl.constexpr = (WTA_POS != WEIGHT_ONE) and (WTA_POS != WEIGHT_NORM)
    if POS_SOFTMAX or (WTA_NEG != WEIGHT_ONE):  # sum_m exp(u - max u) needs M and m first: a second sweep
        if POS_SOFTMAX:
            total_pos = tl.zeros((BLOCK_N,), ACC)
        if WTA_NEG != WEIGHT_ONE:
            total_neg = tl.zeros((BLOCK_N,), ACC)
        for c_start in range(0, C, BLOCK_C):
            class_mask, sim_p = _positive_tile(
                f_ptr, stride_fn, stride_fd, regions, region_mask, inv_norm, text_ptr, text_inv_norm_ptr,
                C, D, c_start, BLOCK_N, BLOCK_C, BLOCK_D, ACC, PRECISION, SIM_DTYPE,
            )  # fmt: skip
            if POS_SOFTMAX:
                total_pos += _softmax_total(sim_p, class_mask, run_max, max_u_pos, gamma)
            if WTA_NEG != WEIGHT_ONE:
                total_neg += _softmax_total(sim_p, class_mask, run_min, max_u_neg, gamma)
    _store_statistics(
        stats_ptr, index_ptr, stat_stride, offsets, region_mask, run_max, run_min, arg_max, arg_min,
        shift_pos, shift_neg, max_u_pos, max_u_neg, total_pos, total_neg,
    )  # fmt: skip


@triton.jit
def _head_forward_kernel(
    f_ptr,
    stride_fb,
    stride_fn,
    stride_fd,
    text_ptr,
    text_inv_norm_ptr,
    inv_norm_ptr,
    stats_ptr,
    stat_stride,
    log_temp_ptr,
    logits_ptr,
    lse_ptr,
    N,
    C,
    D,
    gamma: tl.float64,
    logit_scale: tl.float64,
    WTA_POS: tl.constexpr,
    WTA_NEG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    SIM_DTYPE: tl.constexpr,
):
    gamma, logit_scale = tl.full((), gamma, ACC), tl.full((), logit_scale, ACC)  # typed float64: module doc
    image = tl.program_id(0).to(tl.int64)
    classes = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    class_mask = classes < C
    f_ptr += image * stride_fb
    tau = tl.exp(tl.load(log_temp_ptr).to(ACC))

    run_max = tl.full((BLOCK_C,), float("-inf"), ACC)
    run_sum = tl.zeros((BLOCK_C,), ACC)
    acc_pos = tl.zeros((BLOCK_C,), ACC)
    acc_neg = tl.zeros((BLOCK_C,), ACC)
    for n_start in range(0, N, BLOCK_N):
        regions = n_start + tl.arange(0, BLOCK_N)
        region_mask = regions < N
        offsets = image * N + regions
        inv_norm = tl.load(inv_norm_ptr + offsets, mask=region_mask, other=0.0)
        sim_e, sim_p, sim_n = _similarity_tiles(
            f_ptr,
            stride_fn,
            stride_fd,
            regions,
            region_mask,
            inv_norm,
            text_ptr,
            text_inv_norm_ptr,
            C,
            D,
            classes,
            class_mask,
            True,
            True,
            BLOCK_N,
            BLOCK_C,
            BLOCK_D,
            ACC,
            PRECISION,
            SIM_DTYPE,
        )
        weights_pos, _ = _side_weights(sim_p, stats_ptr, stat_stride, offsets, region_mask, gamma, SIDE_POS, WTA_POS)
        weights_neg, _ = _side_weights(sim_p, stats_ptr, stat_stride, offsets, region_mask, gamma, SIDE_NEG, WTA_NEG)
        # online softmax over regions (as in flash attention): rescale the sums so far to the new max
        logits = tl.where(region_mask[:, None], tau * sim_e, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=0))
        rescale = tl.exp(run_max - new_max)
        p = tl.exp(logits - new_max[None, :])
        run_sum = run_sum * rescale + tl.sum(p, axis=0)
        acc_pos = acc_pos * rescale + tl.sum(p * sim_p * weights_pos, axis=0)
        acc_neg = acc_neg * rescale + tl.sum(p * sim_n * weights_neg, axis=0)
        run_max = new_max

    pair = logits_ptr + image * 2 * C + classes
    tl.store(pair, logit_scale * acc_neg / run_sum, mask=class_mask)
    tl.store(pair + C, logit_scale * acc_pos / run_sum, mask=class_mask)
    tl.store(lse_ptr + image * C + classes, run_max + tl.log(run_sum), mask=class_mask)


@triton.jit
def _rows_forward_kernel(
    f_ptr,
    stride_fb,
    stride_fn,
    stride_fd,
    text_ptr,
    text_inv_norm_ptr,
    inv_norm_ptr,
    stats_ptr,
    index_ptr,
    stat_stride,
    log_temp_ptr,
    partials_ptr,
    partial_stride,
    N,
    C,
    D,
    gamma: tl.float64,
    WTA_POS: tl.constexpr,
    WTA_NEG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    SIM_DTYPE: tl.constexpr,
):
    """The forward of a region tile when one class tile holds every class: the three similarity tiles
    in one sweep over D, the WTA statistics from them (stored for the backward) and this tile's part
    of the region softmax per class: its max of tau s^e, and sums of p = exp(tau s^e - max), p s+ w+
    and p s- w-, as rows PARTIAL_* of ``partials`` at (image, region tile), for ``_rows_combine_kernel``."""
    gamma = tl.full((), gamma, ACC)  # typed float64: module doc
    image, regions, region_mask, f_ptr, offsets, inv_norm = _region_tile(f_ptr, stride_fb, inv_norm_ptr, N, BLOCK_N)
    classes = tl.arange(0, BLOCK_C)
    class_mask = classes < C
    sim_e, sim_p, sim_n = _similarity_tiles(
        f_ptr, stride_fn, stride_fd, regions, region_mask, inv_norm, text_ptr, text_inv_norm_ptr,
        C, D, classes, class_mask, True, True, BLOCK_N, BLOCK_C, BLOCK_D, ACC, PRECISION, SIM_DTYPE,
    )  # fmt: skip
    weights_pos = tl.full(sim_p.shape, 1.0, ACC)
    weights_neg = weights_pos
    if (WTA_POS != WEIGHT_ONE) or (WTA_NEG != WEIGHT_ONE):
        run_max, run_min, arg_max, arg_min, has_nan = _tile_extrema(sim_p, class_mask, 0)
        run_max, run_min, shift_pos, shift_neg, max_u_pos, max_u_neg = _shifts(run_max, run_min, has_nan, gamma)
        total_pos = tl.full((BLOCK_N,), 1.0, ACC)  # what a side that is no softmax stores
        total_neg = tl.full((BLOCK_N,), 1.0, ACC)
        POS_SOFTMAX: tl.constexpr = (WTA_POS != WEIGHT_ONE) and (WTA_POS != WEIGHT_NORM)
        if POS_SOFTMAX:
            total_pos = _softmax_total(sim_p, class_mask, run_max, max_u_pos, gamma)
        if WTA_NEG != WEIGHT_ONE:
            total_neg = _softmax_total(sim_p, class_mask, run_min, max_u_neg, gamma)
        _store_statistics(
            stats_ptr, index_ptr, stat_stride, offsets, region_mask, run_max, run_min, arg_max, arg_min,
            shift_pos, shift_neg, max_u_pos, max_u_neg, total_pos, total_neg,
        )  # fmt: skip
        weights_pos, _ = _weights(sim_p, run_max, max_u_pos, 1.0 / total_pos, gamma, WTA_POS)
        weights_neg, _ = _weights(sim_p, run_min, max_u_neg, 1.0 / total_neg, gamma, WTA_NEG)
    tau = tl.exp(tl.load(log_temp_ptr).to(ACC))
    logits = tl.where(region_mask[:, None], tau * sim_e, float("-inf"))
    tile_max = tl.max(logits, axis=0)
    p = tl.exp(logits - tile_max[None, :])
    part = partials_ptr + (image * tl.num_programs(1) + tl.program_id(1)) * C + classes
    tl.store(part + PARTIAL_MAX * partial_stride, tile_max, mask=class_mask)
    tl.store(part + PARTIAL_SUM * partial_stride, tl.sum(p, axis=0), mask=class_mask)
    tl.store(part + PARTIAL_POS * partial_stride, tl.sum(p * sim_p * weights_pos, axis=0), mask=class_mask)
    tl.store(part + PARTIAL_NEG * partial_stride, tl.sum(p * sim_n * weights_neg, axis=0), mask=class_mask)


@triton.jit
def _rows_combine_kernel(
    partials_ptr,
    partial_stride,
    logits_ptr,
    lse_ptr,
    C,
    region_tiles,
    logit_scale: tl.float64,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """P-, P+ and the region softmax's log-sum-exp of an image's class tile from its region tiles'
    partials (``_rows_forward_kernel``), merged as an online softmax merges them."""
    logit_scale = tl.full((), logit_scale, ACC)  # typed float64: module doc
    image = tl.program_id(0).to(tl.int64)
    classes = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    class_mask = classes < C
    run_max = tl.full((BLOCK_C,), float("-inf"), ACC)
    run_sum = tl.zeros((BLOCK_C,), ACC)
    acc_pos = tl.zeros((BLOCK_C,), ACC)
    acc_neg = tl.zeros((BLOCK_C,), ACC)
    for tile in range(0, region_tiles):
        part = partials_ptr + (image * region_tiles + tile) * C + classes
        tile_max = tl.load(part + PARTIAL_MAX * partial_stride, mask=class_mask, other=0.0)
        new_max = tl.maximum(run_max, tile_max)
        rescale, tile_scale = tl.exp(run_max - new_max), tl.exp(tile_max - new_max)
        run_sum = run_sum * rescale + tile_scale * tl.load(
            part + PARTIAL_SUM * partial_stride, mask=class_mask, other=1.0
        )
        acc_pos = acc_pos * rescale + tile_scale * tl.load(
            part + PARTIAL_POS * partial_stride, mask=class_mask, other=0.0
        )
        acc_neg = acc_neg * rescale + tile_scale * tl.load(
            part + PARTIAL_NEG * partial_stride, mask=class_mask, other=0.0
        )
        run_max = new_max
    pair = logits_ptr + image * 2 * C + classes
    tl.store(pair, logit_scale * acc_neg / run_sum, mask=class_mask)
    tl.store(pair + C, logit_scale * acc_pos / run_sum, mask=class_mask)
    tl.store(lse_ptr + image * C + classes, run_max + tl.log(run_sum), mask=class_mask)


# ----------------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _attention_and_h(
    image,
    classes,
    class_mask,
    region_mask,
    sim_e,
    sim_p,
    sim_n,
    lse_ptr,
    grad_ptr,
    tau,
    logit_scale,
    C,
):
    """Region softmax a and its log (both zero outside the tile's valid part), g-, g+, and the
    gradients to both sides' WTA weights: h+ = dL/dw+ = a k s+ g+ and h- = dL/dw- = a k s- g-."""
    lse = tl.load(lse_ptr + image * C + classes, mask=class_mask, other=0.0)
    valid = region_mask[:, None] & class_mask[None, :]
    log_attention = tl.where(valid, tau * sim_e - lse[None, :], 0.0)
    attention = tl.where(valid, tl.exp(log_attention), 0.0)
    pair = image * 2 * C + classes
    grad_neg = tl.load(grad_ptr + pair, mask=class_mask, other=0.0)
    grad_pos = tl.load(grad_ptr + pair + C, mask=class_mask, other=0.0)
    h_pos = attention * logit_scale * sim_p * grad_pos[None, :]
    h_neg = attention * logit_scale * sim_n * grad_neg[None, :]
    return attention, log_attention, grad_neg, grad_pos, h_pos, h_neg


@triton.jit
def _side_sums(sim_p, weights, sigma, h, classes, class_mask, winner, shift, KIND: tl.constexpr):
    """A class tile's part of one side's per-region sums (``_region_sums_kernel``)."""
    shifted = sim_p - shift[:, None]
    if KIND == WEIGHT_NORM:
        weighted_h = weights * h  # zero outside the valid part, as h is
        sum_0 = tl.sum(tl.where(classes[None, :] == winner[:, None], 0.0, weighted_h), axis=1)
        sum_1 = tl.sum(shifted * weighted_h, axis=1)
        sum_2 = tl.zeros_like(sum_0)
    else:
        sigma = tl.where(class_mask[None, :], sigma, 0.0)
        sum_0 = tl.sum(sigma * h, axis=1)
        sum_1 = tl.sum(shifted * sigma * h, axis=1)
        sum_2 = tl.sum(shifted * sigma, axis=1)
    return sum_0, sum_1, sum_2


@triton.jit
def _region_sums_kernel(
    f_ptr,
    stride_fb,
    stride_fn,
    stride_fd,
    text_ptr,
    text_inv_norm_ptr,
    inv_norm_ptr,
    stats_ptr,
    index_ptr,
    stat_stride,
    log_temp_ptr,
    lse_ptr,
    grad_ptr,
    sums_ptr,
    N,
    C,
    D,
    gamma: tl.float64,
    logit_scale: tl.float64,
    WTA_POS: tl.constexpr,
    WTA_NEG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    SIM_DTYPE: tl.constexpr,
):
    """Per-region sums over all classes for the WTA backward (docs/math.md), three per weighted side,
    in forms where the winning class drops out exactly instead of cancelling (it dominates when gamma
    is large); z is s+ at the arg-max of the side's u (STAT_SHIFT):
    norm, a = argmax u:          sum_{m != a} w h  and  sum (s+ - z) w h
    the softmax kinds, sigma:    sum sigma h,  sum (s+ - z) sigma h  and  sum (s+ - z) sigma"""
    gamma, logit_scale = tl.full((), gamma, ACC), tl.full((), logit_scale, ACC)  # typed float64: module doc
    image, regions, region_mask, f_ptr, offsets, inv_norm = _region_tile(f_ptr, stride_fb, inv_norm_ptr, N, BLOCK_N)
    tau = tl.exp(tl.load(log_temp_ptr).to(ACC))
    winner = tl.load(index_ptr + INDEX_WINNER * stat_stride + offsets, mask=region_mask, other=-1)
    shift_pos = tl.load(stats_ptr + (STAT_SHIFT + SIDE_POS) * stat_stride + offsets, mask=region_mask, other=0.0)
    shift_neg = tl.load(stats_ptr + (STAT_SHIFT + SIDE_NEG) * stat_stride + offsets, mask=region_mask, other=0.0)

    pos_0 = tl.zeros((BLOCK_N,), ACC)
    pos_1 = tl.zeros((BLOCK_N,), ACC)
    pos_2 = tl.zeros((BLOCK_N,), ACC)
    neg_0 = tl.zeros((BLOCK_N,), ACC)
    neg_1 = tl.zeros((BLOCK_N,), ACC)
    neg_2 = tl.zeros((BLOCK_N,), ACC)
    for c_start in range(0, C, BLOCK_C):
        classes = c_start + tl.arange(0, BLOCK_C)
        class_mask = classes < C
        sim_e, sim_p, sim_n = _similarity_tiles(
            f_ptr,
            stride_fn,
            stride_fd,
            regions,
            region_mask,
            inv_norm,
            text_ptr,
            text_inv_norm_ptr,
            C,
            D,
            classes,
            class_mask,
            True,
            WTA_NEG != WEIGHT_ONE,
            BLOCK_N,
            BLOCK_C,
            BLOCK_D,
            ACC,
            PRECISION,
            SIM_DTYPE,
        )
        _, _, _, _, h_pos, h_neg = _attention_and_h(
            image, classes, class_mask, region_mask, sim_e, sim_p, sim_n, lse_ptr, grad_ptr, tau, logit_scale, C
        )
        if WTA_POS != WEIGHT_ONE:
            weights, sigma = _side_weights(
                sim_p, stats_ptr, stat_stride, offsets, region_mask, gamma, SIDE_POS, WTA_POS
            )
            sum_0, sum_1, sum_2 = _side_sums(
                sim_p, weights, sigma, h_pos, classes, class_mask, winner, shift_pos, WTA_POS
            )
            pos_0, pos_1, pos_2 = pos_0 + sum_0, pos_1 + sum_1, pos_2 + sum_2
        if WTA_NEG != WEIGHT_ONE:
            weights, sigma = _side_weights(
                sim_p, stats_ptr, stat_stride, offsets, region_mask, gamma, SIDE_NEG, WTA_NEG
            )
            sum_0, sum_1, sum_2 = _side_sums(
                sim_p, weights, sigma, h_neg, classes, class_mask, winner, shift_neg, WTA_NEG
            )
            neg_0, neg_1, neg_2 = neg_0 + sum_0, neg_1 + sum_1, neg_2 + sum_2
    if WTA_POS != WEIGHT_ONE:
        sums = sums_ptr + SIDE_POS * SUMS_PER_SIDE * stat_stride + offsets
        tl.store(sums, pos_0, mask=region_mask)
        tl.store(sums + stat_stride, pos_1, mask=region_mask)
        tl.store(sums + 2 * stat_stride, pos_2, mask=region_mask)
    if WTA_NEG != WEIGHT_ONE:
        sums = sums_ptr + SIDE_NEG * SUMS_PER_SIDE * stat_stride + offsets
        tl.store(sums, neg_0, mask=region_mask)
        tl.store(sums + stat_stride, neg_1, mask=region_mask)
        tl.store(sums + 2 * stat_stride, neg_2, mask=region_mask)


@triton.jit
def _side_grad(
    weights, sigma, h, sim_p, classes, region_mask, sums, stats_ptr, index_ptr, stat_stride, offsets, gamma,
    SIDE: tl.constexpr, KIND: tl.constexpr,
):  # fmt: skip
    """One side's WTA part of dL/ds+ on a tile (docs/math.md) from its per-region ``sums``
    (``_side_sums``): gamma c du, plus dc = gamma sum_m s+ du at the arg-max of s+ (c = M, positive
    side) or its arg-min (c = m, negative side)."""
    sum_0, sum_1, sum_2 = sums
    if KIND == WEIGHT_NORM:  # du = w h - onehot(a) sum(w h), which is -sum_{m != a} w h at a itself (w_a = 1)
        winner = tl.load(index_ptr + INDEX_WINNER * stat_stride + offsets, mask=region_mask, other=-1)
        grad_u = tl.where(classes[None, :] == winner[:, None], -sum_0[:, None], weights * h)
        grad_coef = gamma * sum_1
    else:  # du = sigma (h - sum(sigma h))
        grad_u = sigma * (h - sum_0[:, None])
        grad_coef = gamma * (sum_1 - sum_0 * sum_2)
    coef = tl.load(stats_ptr + (STAT_COEF + SIDE) * stat_stride + offsets, mask=region_mask, other=0.0)
    at = tl.load(index_ptr + (INDEX_COEF + SIDE) * stat_stride + offsets, mask=region_mask, other=-1)
    return gamma * coef[:, None] * grad_u + tl.where(classes[None, :] == at[:, None], grad_coef[:, None], 0.0)


@triton.jit
def _load_side_sums(sums_ptr, stat_stride, offsets, region_mask, SIDE: tl.constexpr):
    """A side's three per-region sums as ``_region_sums_kernel`` stored them."""
    sums = sums_ptr + SIDE * SUMS_PER_SIDE * stat_stride + offsets
    return (
        tl.load(sums, mask=region_mask, other=0.0),
        tl.load(sums + stat_stride, mask=region_mask, other=0.0),
        tl.load(sums + 2 * stat_stride, mask=region_mask, other=0.0),
    )


@triton.jit
def _tile_side_sums(
    sim_p, weights, sigma, h, classes, class_mask, region_mask, stats_ptr, index_ptr, stat_stride, offsets,
    SIDE: tl.constexpr, KIND: tl.constexpr,
):  # fmt: skip
    """A side's per-region sums from a tile that holds every class (the row kernels)."""
    winner = tl.load(index_ptr + INDEX_WINNER * stat_stride + offsets, mask=region_mask, other=-1)
    shift = tl.load(stats_ptr + (STAT_SHIFT + SIDE) * stat_stride + offsets, mask=region_mask, other=0.0)
    return _side_sums(sim_p, weights, sigma, h, classes, class_mask, winner, shift, KIND)


@triton.jit
def _grad_similarity_tiles(
    f_ptr,
    stride_fn,
    stride_fd,
    image,
    regions,
    region_mask,
    inv_norm,
    text_ptr,
    text_inv_norm_ptr,
    classes,
    class_mask,
    stats_ptr,
    index_ptr,
    stat_stride,
    log_temp_ptr,
    lse_ptr,
    logits_ptr,
    grad_ptr,
    sums_ptr,
    gamma,
    logit_scale,
    N,
    C,
    D,
    WTA_POS: tl.constexpr,
    WTA_NEG: tl.constexpr,
    SUMS_IN_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    SIM_DTYPE: tl.constexpr,
):
    """The backward of docs/math.md on one (region tile, class tile): the similarities, dL/ds of the three sets, and
    s^e - lse / tau (= log(a) / tau): since sum_i dL/ds^e = 0 for every (image, class), sums over
    regions of s^e dL/ds^e may use it instead of s^e and so avoid cancelling large terms. The WTA
    backward's per-region sums over classes come from the tile itself when it holds every class
    (``SUMS_IN_TILE``), from ``_region_sums_kernel`` otherwise."""
    tau = tl.exp(tl.load(log_temp_ptr).to(ACC))
    sim_e, sim_p, sim_n = _similarity_tiles(
        f_ptr,
        stride_fn,
        stride_fd,
        regions,
        region_mask,
        inv_norm,
        text_ptr,
        text_inv_norm_ptr,
        C,
        D,
        classes,
        class_mask,
        True,
        True,
        BLOCK_N,
        BLOCK_C,
        BLOCK_D,
        ACC,
        PRECISION,
        SIM_DTYPE,
    )
    attention, log_attention, grad_neg, grad_pos, h_pos, h_neg = _attention_and_h(
        image, classes, class_mask, region_mask, sim_e, sim_p, sim_n, lse_ptr, grad_ptr, tau, logit_scale, C
    )
    offsets = image * N + regions
    weights_pos, sigma_pos = _side_weights(
        sim_p, stats_ptr, stat_stride, offsets, region_mask, gamma, SIDE_POS, WTA_POS
    )
    weights_neg, sigma_neg = _side_weights(
        sim_p, stats_ptr, stat_stride, offsets, region_mask, gamma, SIDE_NEG, WTA_NEG
    )
    pair = logits_ptr + image * 2 * C + classes
    logit_neg = tl.load(pair, mask=class_mask, other=0.0)
    logit_pos = tl.load(pair + C, mask=class_mask, other=0.0)

    # softmax over regions: dL/d(tau s^e) = a (v - sum_i a v), and sum_i a v = P+ g+ + P- g-
    v = logit_scale * (sim_p * weights_pos * grad_pos[None, :] + sim_n * weights_neg * grad_neg[None, :])
    mean_v = logit_pos * grad_pos + logit_neg * grad_neg
    grad_e = tau * attention * (v - mean_v[None, :])
    grad_n = attention * logit_scale * weights_neg * grad_neg[None, :]
    grad_p = attention * logit_scale * weights_pos * grad_pos[None, :]
    # arguments spelled out: triton 3.2 compiles no starred arguments
    if WTA_POS != WEIGHT_ONE:
        if SUMS_IN_TILE:
            sums = _tile_side_sums(
                sim_p, weights_pos, sigma_pos, h_pos, classes, class_mask, region_mask, stats_ptr, index_ptr,
                stat_stride, offsets, SIDE_POS, WTA_POS,
            )  # fmt: skip
        else:
            sums = _load_side_sums(sums_ptr, stat_stride, offsets, region_mask, SIDE_POS)
        grad_p += _side_grad(
            weights_pos, sigma_pos, h_pos, sim_p, classes, region_mask, sums, stats_ptr, index_ptr, stat_stride,
            offsets, gamma, SIDE_POS, WTA_POS,
        )  # fmt: skip
    if WTA_NEG != WEIGHT_ONE:  # the negative weights are functions of s+ too
        if SUMS_IN_TILE:
            sums = _tile_side_sums(
                sim_p, weights_neg, sigma_neg, h_neg, classes, class_mask, region_mask, stats_ptr, index_ptr,
                stat_stride, offsets, SIDE_NEG, WTA_NEG,
            )  # fmt: skip
        else:
            sums = _load_side_sums(sums_ptr, stat_stride, offsets, region_mask, SIDE_NEG)
        grad_p += _side_grad(
            weights_neg, sigma_neg, h_neg, sim_p, classes, region_mask, sums, stats_ptr, index_ptr, stat_stride,
            offsets, gamma, SIDE_NEG, WTA_NEG,
        )  # fmt: skip
    valid = region_mask[:, None] & class_mask[None, :]
    grad_e = tl.where(valid, grad_e, 0.0)
    grad_p = tl.where(valid, grad_p, 0.0)
    grad_n = tl.where(valid, grad_n, 0.0)
    return sim_e, sim_p, sim_n, log_attention / tau, grad_e, grad_p, grad_n


@triton.jit
def _text_grad_kernel(
    f_ptr,
    stride_fb,
    stride_fn,
    stride_fd,
    text_ptr,
    text_inv_norm_ptr,
    inv_norm_ptr,
    stats_ptr,
    index_ptr,
    stat_stride,
    log_temp_ptr,
    lse_ptr,
    logits_ptr,
    grad_ptr,
    sums_ptr,
    grad_text_ptr,
    projection_ptr,
    grad_temp_ptr,
    N,
    C,
    D,
    set_stride,
    region_tiles,
    total_tiles,
    gamma: tl.float64,
    logit_scale: tl.float64,
    WANT_TEXT: tl.constexpr,
    WTA_POS: tl.constexpr,
    WTA_NEG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    SIM_DTYPE: tl.constexpr,
):
    """For a class tile, over this split's (image, region tile) pairs: the partial gradient to the unit
    prompts, G = dS^T f, accumulated in place in ``grad_text[split]`` (the program owns it: no
    atomics), and the partial sums of <t, G> = sum_i dS s per prompt (for the normalisation step) and
    of dL/dtheta = sum s^e dL/ds^e."""
    gamma, logit_scale = tl.full((), gamma, ACC), tl.full((), logit_scale, ACC)  # typed float64: module doc
    class_tile = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    classes = class_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    class_mask = classes < C
    rows = grad_text_ptr + split.to(tl.int64) * 3 * set_stride + classes.to(tl.int64)[:, None] * D

    projection_e = tl.zeros((BLOCK_C,), ACC)
    projection_p = tl.zeros((BLOCK_C,), ACC)
    projection_n = tl.zeros((BLOCK_C,), ACC)
    for tile in range(split, total_tiles, splits):
        image = (tile // region_tiles).to(tl.int64)
        regions = (tile % region_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        region_mask = regions < N
        image_f_ptr = f_ptr + image * stride_fb
        inv_norm = tl.load(inv_norm_ptr + image * N + regions, mask=region_mask, other=0.0)
        _, sim_p, sim_n, centered_e, grad_e, grad_p, grad_n = _grad_similarity_tiles(
            image_f_ptr,
            stride_fn,
            stride_fd,
            image,
            regions,
            region_mask,
            inv_norm,
            text_ptr,
            text_inv_norm_ptr,
            classes,
            class_mask,
            stats_ptr,
            index_ptr,
            stat_stride,
            log_temp_ptr,
            lse_ptr,
            logits_ptr,
            grad_ptr,
            sums_ptr,
            gamma,
            logit_scale,
            N,
            C,
            D,
            WTA_POS,
            WTA_NEG,
            False,
            BLOCK_N,
            BLOCK_C,
            BLOCK_D,
            ACC,
            PRECISION,
            SIM_DTYPE,
        )
        projection_e += tl.sum(centered_e * grad_e, axis=0)  # also dL/dtheta's terms
        if WANT_TEXT:
            projection_p += tl.sum(sim_p * grad_p, axis=0)
            projection_n += tl.sum(sim_n * grad_n, axis=0)
            # G += dS^T f with f = F * inv_norm: fold the norm into dS's rows, then sweep D
            scaled_e = tl.trans(grad_e * inv_norm[:, None])
            scaled_p = tl.trans(grad_p * inv_norm[:, None])
            scaled_n = tl.trans(grad_n * inv_norm[:, None])
            adds = tile != split  # the split's first tile writes, the others add
            for d_start in range(0, D, BLOCK_DT):
                dims = d_start + tl.arange(0, BLOCK_DT)
                dim_mask = dims < D
                f = _load_feature_chunk(image_f_ptr, stride_fn, stride_fd, regions, region_mask, dims, dim_mask, ACC)
                out = rows + dims[None, :]
                mask = class_mask[:, None] & dim_mask[None, :]
                add_mask = mask & adds
                part_e = tl.load(out, mask=add_mask, other=0.0)
                part_p = tl.load(out + set_stride, mask=add_mask, other=0.0)
                part_n = tl.load(out + 2 * set_stride, mask=add_mask, other=0.0)
                tl.store(out, part_e + _dot(scaled_e, f, ACC, PRECISION), mask=mask)
                tl.store(out + set_stride, part_p + _dot(scaled_p, f, ACC, PRECISION), mask=mask)
                tl.store(
                    out + 2 * set_stride,
                    part_n + _dot(scaled_n, f, ACC, PRECISION),
                    mask=mask,
                )
            tl.debug_barrier()  # this tile's stores are seen by every thread's loads for the next
    if WANT_TEXT:
        rows = projection_ptr + split * 3 * C + classes
        tl.store(rows, projection_e, mask=class_mask)
        tl.store(rows + C, projection_p, mask=class_mask)
        tl.store(rows + 2 * C, projection_n, mask=class_mask)
    tl.store(grad_temp_ptr + class_tile * splits + split, tl.sum(projection_e))


@triton.jit
def _text_grad_finish_kernel(
    text_ptr,
    text_inv_norm_ptr,
    grad_text_ptr,
    projection_ptr,
    out_e_ptr,
    out_p_ptr,
    out_n_ptr,
    C,
    D,
    set_stride,
    splits,
    BLOCK_C: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    ACC: tl.constexpr,
):
    """Sum the splits' partials of G and apply the normalisation t = T / |T| with the (3, C) sums
    <t, G>: dL/dT = (G - t <t, G>) / |T|, for one prompt set (program axis 2), a class tile and a D chunk."""
    classes = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    class_mask = classes < C
    dims = tl.program_id(1) * BLOCK_DT + tl.arange(0, BLOCK_DT)
    dim_mask = dims < D
    prompt_set = tl.program_id(2)
    if prompt_set == 0:
        out_ptr = out_e_ptr
    elif prompt_set == 1:
        out_ptr = out_p_ptr
    else:
        out_ptr = out_n_ptr
    offsets = classes.to(tl.int64)[:, None] * D + dims[None, :]
    mask = class_mask[:, None] & dim_mask[None, :]
    grad = tl.zeros((BLOCK_C, BLOCK_DT), ACC)
    for split in range(0, splits):
        part = (split * 3 + prompt_set).to(tl.int64)
        grad += tl.load(grad_text_ptr + part * set_stride + offsets, mask=mask, other=0.0)
    projection = tl.load(projection_ptr + prompt_set * C + classes, mask=class_mask, other=0.0)
    inv_norm = tl.load(text_inv_norm_ptr + prompt_set * C + classes, mask=class_mask, other=0.0)
    unit = tl.load(text_ptr + prompt_set * set_stride + offsets, mask=mask, other=0.0).to(ACC) * inv_norm[:, None]
    result = (grad - unit * projection[:, None]) * inv_norm[:, None]
    tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _feature_grad_kernel(
    f_ptr,
    stride_fb,
    stride_fn,
    stride_fd,
    text_ptr,
    text_inv_norm_ptr,
    inv_norm_ptr,
    stats_ptr,
    index_ptr,
    stat_stride,
    log_temp_ptr,
    lse_ptr,
    logits_ptr,
    grad_ptr,
    sums_ptr,
    scratch_ptr,
    grad_features_ptr,
    N,
    C,
    D,
    gamma: tl.float64,
    logit_scale: tl.float64,
    WTA_POS: tl.constexpr,
    WTA_NEG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    SIM_DTYPE: tl.constexpr,
):
    """dL/dF for a region tile: G = sum_x dS^x t^x over all classes, accumulated in place in the
    program's rows of ``scratch`` (compute dtype), then through the normalisation f = F / |F|:
    dL/dF = (G - f <f, G>) / |F|, where <f, G> = sum_x sum_m dS^x s^x."""
    gamma, logit_scale = tl.full((), gamma, ACC), tl.full((), logit_scale, ACC)  # typed float64: module doc
    image, regions, region_mask, f_ptr, offsets, inv_norm = _region_tile(f_ptr, stride_fb, inv_norm_ptr, N, BLOCK_N)
    rows = offsets[:, None] * D

    projection = tl.zeros((BLOCK_N,), ACC)
    for c_start in range(0, C, BLOCK_C):
        classes = c_start + tl.arange(0, BLOCK_C)
        class_mask = classes < C
        sim_e, sim_p, sim_n, _, grad_e, grad_p, grad_n = _grad_similarity_tiles(
            f_ptr,
            stride_fn,
            stride_fd,
            image,
            regions,
            region_mask,
            inv_norm,
            text_ptr,
            text_inv_norm_ptr,
            classes,
            class_mask,
            stats_ptr,
            index_ptr,
            stat_stride,
            log_temp_ptr,
            lse_ptr,
            logits_ptr,
            grad_ptr,
            sums_ptr,
            gamma,
            logit_scale,
            N,
            C,
            D,
            WTA_POS,
            WTA_NEG,
            False,
            BLOCK_N,
            BLOCK_C,
            BLOCK_D,
            ACC,
            PRECISION,
            SIM_DTYPE,
        )
        projection += tl.sum(grad_e * sim_e + grad_p * sim_p + grad_n * sim_n, axis=1)
        # G += dS^x t^x with t = T * text_inv_norm: fold the norm into dS's columns, then sweep D
        scaled_e = grad_e * tl.load(text_inv_norm_ptr + classes, mask=class_mask, other=0.0)[None, :]
        scaled_p = grad_p * tl.load(text_inv_norm_ptr + C + classes, mask=class_mask, other=0.0)[None, :]
        scaled_n = grad_n * tl.load(text_inv_norm_ptr + 2 * C + classes, mask=class_mask, other=0.0)[None, :]
        for d_start in range(0, D, BLOCK_DT):
            dims = d_start + tl.arange(0, BLOCK_DT)
            dim_mask = dims < D
            mask = region_mask[:, None] & dim_mask[None, :]
            out = scratch_ptr + rows + dims[None, :]
            partial = tl.load(out, mask=mask & (c_start > 0), other=0.0)  # the first class tile writes
            t_e = _load_text_chunk(text_ptr, classes, class_mask, dims, dim_mask, D, ACC)
            t_p = _load_text_chunk(text_ptr + C * D, classes, class_mask, dims, dim_mask, D, ACC)
            t_n = _load_text_chunk(text_ptr + 2 * C * D, classes, class_mask, dims, dim_mask, D, ACC)
            partial += _dot(scaled_e, t_e, ACC, PRECISION)
            partial += _dot(scaled_p, t_p, ACC, PRECISION)
            partial += _dot(scaled_n, t_n, ACC, PRECISION)
            tl.store(out, partial, mask=mask)
        tl.debug_barrier()  # this class tile's stores are seen by every thread's loads for the next
    for d_start in range(0, D, BLOCK_DT):
        dims = d_start + tl.arange(0, BLOCK_DT)
        dim_mask = dims < D
        mask = region_mask[:, None] & dim_mask[None, :]
        grad_unit = tl.load(scratch_ptr + rows + dims[None, :], mask=mask, other=0.0)
        unit = _load_feature_chunk(f_ptr, stride_fn, stride_fd, regions, region_mask, dims, dim_mask, ACC)
        unit = unit * inv_norm[:, None]
        grad = (grad_unit - unit * projection[:, None]) * inv_norm[:, None]
        tl.store(grad_features_ptr + rows + dims[None, :], grad.to(grad_features_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows_grad_kernel(
    f_ptr,
    stride_fb,
    stride_fn,
    stride_fd,
    text_ptr,
    text_inv_norm_ptr,
    inv_norm_ptr,
    stats_ptr,
    index_ptr,
    stat_stride,
    log_temp_ptr,
    lse_ptr,
    logits_ptr,
    grad_ptr,
    grad_sim_ptr,
    projection_ptr,
    grad_temp_ptr,
    grad_features_ptr,
    N,
    C,
    D,
    rows_total,
    gamma: tl.float64,
    logit_scale: tl.float64,
    WANT_TEXT: tl.constexpr,
    WANT_FEATURES: tl.constexpr,
    WTA_POS: tl.constexpr,
    WTA_NEG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    SIM_DTYPE: tl.constexpr,
):
    """The backward of a region tile when one class tile holds every class, the WTA sums taken from the
    tile itself: this tile's term of dL/dtheta; for the prompts, dS^x f-scaled (dS times the regions'
    inverse norms) written class-major into ``grad_sim`` (3C x B*N) for ``_text_grad_gemm_kernel``,
    and the tile's part of <t, G> per prompt; for the features, dL/dF = (G - f <f, G>) / |F| with
    G = sum_x dS^x t^x, the D chunks swept in registers."""
    gamma, logit_scale = tl.full((), gamma, ACC), tl.full((), logit_scale, ACC)  # typed float64: module doc
    image, regions, region_mask, f_ptr, offsets, inv_norm = _region_tile(f_ptr, stride_fb, inv_norm_ptr, N, BLOCK_N)
    tile = image * tl.num_programs(1) + tl.program_id(1)
    classes = tl.arange(0, BLOCK_C)
    class_mask = classes < C
    sim_e, sim_p, sim_n, centered_e, grad_e, grad_p, grad_n = _grad_similarity_tiles(
        f_ptr, stride_fn, stride_fd, image, regions, region_mask, inv_norm, text_ptr,
        text_inv_norm_ptr, classes, class_mask, stats_ptr, index_ptr, stat_stride, log_temp_ptr, lse_ptr,
        logits_ptr, grad_ptr, stats_ptr, gamma, logit_scale, N, C, D, WTA_POS, WTA_NEG, True, BLOCK_N, BLOCK_C,
        BLOCK_D, ACC, PRECISION, SIM_DTYPE,
    )  # fmt: skip
    projection_e = tl.sum(centered_e * grad_e, axis=0)  # also dL/dtheta's terms
    tl.store(grad_temp_ptr + tile, tl.sum(projection_e))
    if WANT_TEXT:
        rows = projection_ptr + tile * 3 * C + classes
        tl.store(rows, projection_e, mask=class_mask)
        tl.store(rows + C, tl.sum(sim_p * grad_p, axis=0), mask=class_mask)
        tl.store(rows + 2 * C, tl.sum(sim_n * grad_n, axis=0), mask=class_mask)
        valid = region_mask[:, None] & class_mask[None, :]
        grad_sim = grad_sim_ptr + classes.to(tl.int64)[None, :] * rows_total + offsets[:, None]
        tl.store(grad_sim, grad_e * inv_norm[:, None], mask=valid)
        tl.store(grad_sim + C * rows_total, grad_p * inv_norm[:, None], mask=valid)
        tl.store(grad_sim + 2 * C * rows_total, grad_n * inv_norm[:, None], mask=valid)
    if WANT_FEATURES:
        projection = tl.sum(grad_e * sim_e + grad_p * sim_p + grad_n * sim_n, axis=1)
        # G = dS^x t^x with t = T * text_inv_norm: fold the norm into dS's columns
        scaled_e = grad_e * tl.load(text_inv_norm_ptr + classes, mask=class_mask, other=0.0)[None, :]
        scaled_p = grad_p * tl.load(text_inv_norm_ptr + C + classes, mask=class_mask, other=0.0)[None, :]
        scaled_n = grad_n * tl.load(text_inv_norm_ptr + 2 * C + classes, mask=class_mask, other=0.0)[None, :]
        # BLOCK_D chunks: three (BLOCK_C, BLOCK_DT) operands would overflow shared memory
        for d_start in range(0, D, BLOCK_D):
            dims = d_start + tl.arange(0, BLOCK_D)
            dim_mask = dims < D
            grad_unit = _dot(
                scaled_e, _load_text_chunk(text_ptr, classes, class_mask, dims, dim_mask, D, ACC), ACC, PRECISION
            )
            grad_unit += _dot(
                scaled_p,
                _load_text_chunk(text_ptr + C * D, classes, class_mask, dims, dim_mask, D, ACC),
                ACC,
                PRECISION,
            )
            grad_unit += _dot(
                scaled_n,
                _load_text_chunk(text_ptr + 2 * C * D, classes, class_mask, dims, dim_mask, D, ACC),
                ACC,
                PRECISION,
            )
            unit = _load_feature_chunk(f_ptr, stride_fn, stride_fd, regions, region_mask, dims, dim_mask, ACC)
            grad = (grad_unit - unit * inv_norm[:, None] * projection[:, None]) * inv_norm[:, None]
            out = grad_features_ptr + offsets[:, None] * D + dims[None, :]
            mask = region_mask[:, None] & dim_mask[None, :]
            tl.store(out, grad.to(grad_features_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _text_grad_gemm_kernel(
    grad_sim_ptr,
    f_ptr,
    stride_fb,
    stride_fn,
    stride_fd,
    grad_text_ptr,
    prompt_rows,
    N,
    D,
    rows_total,
    rows_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """G = dS^T F for a tile of prompt rows (the 3C rows of ``grad_sim``, f's norms already folded in)
    and a D chunk, over this split's range of the B*N feature rows: one partial per split in
    ``grad_text[split]``, summed by ``_text_grad_finish_kernel`` (no atomics: deterministic)."""
    prompts = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    prompt_mask = prompts < prompt_rows
    dims = tl.program_id(1) * BLOCK_DT + tl.arange(0, BLOCK_DT)
    dim_mask = dims < D
    split = tl.program_id(2)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, rows_total)
    grad = tl.zeros((BLOCK_M, BLOCK_DT), ACC)
    for k_start in range(row_start, row_end, BLOCK_K):
        rows = k_start + tl.arange(0, BLOCK_K)
        row_mask = rows < row_end
        grad_sim = tl.load(
            grad_sim_ptr + prompts.to(tl.int64)[:, None] * rows_total + rows[None, :],
            mask=prompt_mask[:, None] & row_mask[None, :],
            other=0.0,
        )
        images, regions = rows // N, rows % N
        f_offsets = images.to(tl.int64)[:, None] * stride_fb + regions.to(tl.int64)[:, None] * stride_fn
        f = tl.load(
            f_ptr + f_offsets + dims.to(tl.int64)[None, :] * stride_fd,
            mask=row_mask[:, None] & dim_mask[None, :],
            other=0.0,
        ).to(ACC)
        grad += _dot(grad_sim, f, ACC, PRECISION)
    out = grad_text_ptr + (split.to(tl.int64) * prompt_rows + prompts.to(tl.int64)[:, None]) * D + dims[None, :]
    tl.store(out, grad, mask=prompt_mask[:, None] & dim_mask[None, :])


KERNELS = (
    _region_stats_kernel,
    _head_forward_kernel,
    _rows_forward_kernel,
    _rows_combine_kernel,
    _region_sums_kernel,
    _text_grad_kernel,
    _rows_grad_kernel,
    _text_grad_gemm_kernel,
    _text_grad_finish_kernel,
    _feature_grad_kernel,
)


# ----------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """How the kernels are launched: tile sizes (regions, classes, the D step of the similarity GEMM,
    the D chunk of the gradient GEMMs, held in registers), how many partial sums the text gradient
    splits its work into, and for the row path the region tile of its backward (at most 16 when the
    features learn too: dF's loop needs the registers) and its GEMM's tile of prompt rows and step
    over feature rows; then Triton's launch options: ``num_stages`` for the kernels whose loop is a GEMM
    alone (two stages pipeline its loads with async copies), ``grad_stages`` for the gradient kernels
    that also compute dS (more stages spill them on sm_80). A class tile that holds every class
    (``block_c >= C``) selects the row kernels."""

    block_n: int
    block_c: int
    block_d: int
    block_d_grad: int
    splits: int = 1
    grad_block_n: int = 16
    gemm_block_m: int = 64
    gemm_block_k: int = 32
    num_warps: int = 8
    num_stages: int = 2
    grad_stages: int = 1

    def as_list(self) -> list[int]:
        # as the operators take it; not astuple, whose deepcopy torch.compile <= 2.9 cannot trace
        return [getattr(self, field.name) for field in fields(self)]


def _pow2_between(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(value)))


def choose_launch_config(B: int, N: int, C: int, D: int, device: torch.device) -> LaunchConfig:
    """Tile sizes for a shape, and enough text-gradient splits to give every multiprocessor a few
    programs, as far as ``PARTIALS_BYTES`` allows. Up to ``ROW_CLASSES`` classes one class tile holds
    them all (the row kernels); tl.dot needs every side >= 16. Compiled as launched
    (``benchmarks/kernel_resources.py``), these sizes are what keeps the kernels free of spills."""
    if C <= ROW_CLASSES:  # 32 regions by up to 128 classes: larger tiles spill the row kernels
        hopper = device.type == "cuda" and _capability(device) >= (9, 0)  # larger tiles spill on sm_80 to sm_89
        launch = LaunchConfig(
            block_n=_pow2_between(N, 16, 32),
            block_c=_pow2_between(C, 16, ROW_CLASSES),
            block_d=16,
            block_d_grad=_pow2_between(D, 16, 128 if hopper else 64),
            grad_block_n=_pow2_between(N, 16, 32 if hopper else 16),
            gemm_block_m=128 if hopper else 64,
            grad_stages=2,
        )
    else:
        launch = LaunchConfig(
            block_n=_pow2_between(N, 16, 64),
            block_c=_pow2_between(C, 16, 32),
            block_d=16,
            block_d_grad=_pow2_between(D, 16, 64),
        )
    if device.type != "cuda":
        return launch
    target = 4 * _multiprocessors(device)
    if C <= ROW_CLASSES:  # one wave of GEMM programs: more splits only add partials to read
        gemm_tiles = triton.cdiv(3 * C, launch.gemm_block_m) * triton.cdiv(D, launch.block_d_grad)
        by_parallelism = _multiprocessors(device) // gemm_tiles
    else:
        by_parallelism = triton.cdiv(target, triton.cdiv(C, launch.block_c))
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
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward; the prompt sets are C x D and contiguous.

    Returns the B x 2 x C logits in the compute dtype and, for the backward, the (B, C) log-sum-exp of
    the region softmax, the (B, N) and (3, C) inverse norms, the (STATS, B, N) region statistics and
    the (INDICES, B, N) arg-maxima.
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
    if B == 0:
        return logits, lse, inv_norm, text_inv_norm, stats, index
    constants = _kernel_constants(features.dtype, launch, wta, device)
    common = _common_args(features, torch.stack(texts), text_inv_norm, inv_norm)
    region_tiles = triton.cdiv(N, launch.block_n)
    with _on_device(device):
        if launch.block_c >= C:  # one class tile holds every class: a row kernel, then a small merge
            partials = _kernel_output(PARTIALS, B * region_tiles * C, device=device, dtype=compute)
            _rows_forward_kernel[(B, region_tiles)](
                *common, stats, index, B * N, log_spatial_temp, partials, partials.stride(0), N, C, D, wta_gamma,
                **constants,
            )  # fmt: skip
            _rows_combine_kernel[(B, triton.cdiv(C, launch.block_c))](
                partials, partials.stride(0), logits, lse, C, region_tiles, logit_scale,
                BLOCK_C=launch.block_c, ACC=constants["ACC"], num_warps=4,
            )  # fmt: skip
        else:
            if wta != "none":
                _region_stats_kernel[(B, region_tiles)](*common, stats, index, B * N, N, C, D, wta_gamma, **constants)
            _head_forward_kernel[(B, triton.cdiv(C, launch.block_c))](
                *common, stats, B * N, log_spatial_temp, logits, lse, N, C, D, wta_gamma, logit_scale, **constants
            )
    return logits, lse, inv_norm, text_inv_norm, stats, index


@dualcoop_head_forward.register_fake
def _(features, text_evidence, text_pos, text_neg, log_spatial_temp, wta, wta_gamma, logit_scale, launch_config):
    B, N, _ = features.shape
    C = text_pos.shape[0]
    compute = _compute_dtype(features.dtype)

    def new(*shape, dtype=compute):
        return features.new_empty(shape, dtype=dtype)

    return new(B, 2, C), new(B, C), new(B, N), new(3, C), new(STATS, B, N), new(INDICES, B, N, dtype=torch.int32)


@torch.library.custom_op(
    "dualcoop_kernels::dualcoop_head_backward",
    mutates_args=(),
    schema="(Tensor grad_logits, Tensor features, Tensor text_evidence, Tensor text_pos, Tensor text_neg, "
    "Tensor log_spatial_temp, Tensor logits, Tensor lse, Tensor inv_norm, Tensor text_inv_norm, Tensor stats, "
    "Tensor index, str wta, float wta_gamma, float logit_scale, int[] launch_config, bool want_features, "
    "bool want_texts, bool want_temp) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
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
        backward = _rows_backward if launch.block_c >= C else _tiled_backward
        wants = (want_features, want_texts, want_temp)
        parts = backward(common, state, grad_features, (B, N, C, D), launch, constants, wta_gamma, logit_scale, wants)
        grad_temp = nothing()
        if want_texts:
            grad_text_parts, projection = parts["grad_text"], parts["projection"]
            block_c, block_d = FINISH_TILE
            _text_grad_finish_kernel[(triton.cdiv(C, block_c), triton.cdiv(D, block_d), 3)](
                text, text_inv_norm, grad_text_parts, projection, *grad_texts, C, D, C * D,
                grad_text_parts.shape[0], BLOCK_C=block_c, BLOCK_DT=block_d, ACC=constants["ACC"], num_warps=4,
            )  # fmt: skip
        if want_temp:
            grad_temp = parts["grad_temp"].sum().to(log_spatial_temp.dtype)
        return grad_features, *grad_texts, grad_temp


def _tiled_backward(common, state, grad_features, shape, launch, constants, gamma, logit_scale, wants) -> dict:
    """The backward's launches when the classes span several tiles. Returns what the host finishes:
    ``grad_text``, the per-split partials of G = dS^T f (splits, 3, C, D), ``projection``, the (3, C)
    sums <t, G>, and ``grad_temp``, partial sums of dL/dtheta; those not wanted are absent."""
    B, N, C, D = shape
    want_features, want_texts, want_temp = wants
    device, compute = grad_features.device, state[-1].dtype
    region_tiles, class_tiles = triton.cdiv(N, launch.block_n), triton.cdiv(C, launch.block_c)
    gradient_constants = dict(constants, num_stages=launch.grad_stages)
    sums = _kernel_output(SUMS, B, N, device=device, dtype=compute)
    stats, index, stat_stride, log_temp, lse, _, grad_logits = state
    if constants["WTA_POS"] != WTA_WEIGHT_CODES["one"] or constants["WTA_NEG"] != WTA_WEIGHT_CODES["one"]:
        _region_sums_kernel[(B, region_tiles)](
            *common, stats, index, stat_stride, log_temp, lse, grad_logits, sums, N, C, D, gamma, logit_scale,
            **constants,
        )  # fmt: skip
    parts = {}
    if want_texts or want_temp:
        splits = min(launch.splits, B * region_tiles)  # every split gets a tile, so writes its partial
        count = splits if want_texts else 0
        parts["grad_text"] = _kernel_output(count, 3, C, D, device=device, dtype=compute)
        projection = _kernel_output(count, 3, C, device=device, dtype=compute)
        parts["grad_temp"] = _kernel_output(class_tiles, splits, device=device, dtype=compute)
        _text_grad_kernel[(class_tiles, splits)](
            *common, *state, sums, parts["grad_text"], projection, parts["grad_temp"], N, C, D, C * D,
            region_tiles, B * region_tiles, gamma, logit_scale, WANT_TEXT=want_texts,
            BLOCK_DT=launch.block_d_grad, **gradient_constants,
        )  # fmt: skip
        parts["projection"] = projection.sum(0)
    if want_features:
        scratch = _kernel_output(B, N, D, device=device, dtype=compute)
        _feature_grad_kernel[(B, region_tiles)](
            *common, *state, sums, scratch, grad_features, N, C, D, gamma, logit_scale,
            BLOCK_DT=launch.block_d_grad, **gradient_constants,
        )  # fmt: skip
    return parts


def _rows_backward(common, state, grad_features, shape, launch, constants, gamma, logit_scale, wants) -> dict:
    """The backward's launches when one class tile holds every class (``_tiled_backward`` says what
    comes back): a row kernel per region tile, then G = dS^T f as a split GEMM over the B*N rows."""
    B, N, C, D = shape
    want_features, want_texts, _ = wants  # theta's gradient comes with every launch
    device, compute = grad_features.device, state[-1].dtype
    features = common[0]
    block_n = min(launch.grad_block_n, 16) if want_features else launch.grad_block_n  # dF's loop: more registers
    region_tiles = triton.cdiv(N, block_n)
    grad_sim = _kernel_output(3 * C if want_texts else 0, B * N, device=device, dtype=compute)
    projection = _kernel_output(B * region_tiles if want_texts else 0, 3, C, device=device, dtype=compute)
    grad_temp = _kernel_output(B * region_tiles, device=device, dtype=compute)
    _rows_grad_kernel[(B, region_tiles)](
        *common, *state, grad_sim, projection, grad_temp, grad_features, N, C, D, B * N, gamma, logit_scale,
        WANT_TEXT=want_texts, WANT_FEATURES=want_features, BLOCK_DT=launch.block_d_grad,
        **dict(constants, BLOCK_N=block_n, num_stages=launch.grad_stages),
    )  # fmt: skip
    parts = dict(grad_temp=grad_temp)
    if want_texts:
        prompt_tiles, dim_tiles = triton.cdiv(3 * C, launch.gemm_block_m), triton.cdiv(D, launch.block_d_grad)
        rows_per_split = triton.cdiv(triton.cdiv(B * N, launch.splits), launch.gemm_block_k) * launch.gemm_block_k
        splits = triton.cdiv(B * N, rows_per_split)
        parts["grad_text"] = _kernel_output(splits, 3, C, D, device=device, dtype=compute)
        _text_grad_gemm_kernel[(prompt_tiles, dim_tiles, splits)](
            grad_sim, features, *features.stride(), parts["grad_text"], 3 * C, N, D, B * N, rows_per_split,
            BLOCK_M=launch.gemm_block_m, BLOCK_K=launch.gemm_block_k, BLOCK_DT=launch.block_d_grad,
            ACC=constants["ACC"], PRECISION=constants["PRECISION"], num_warps=launch.num_warps,
            num_stages=launch.num_stages,
        )  # fmt: skip
        parts["projection"] = projection.sum(0)
    return parts


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
    logits, lse, inv_norm, text_inv_norm, stats, index = output
    ctx.save_for_backward(
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
    )
    ctx.options = (wta, wta_gamma, logit_scale, launch_config)
    ctx.mark_non_differentiable(lse, inv_norm, text_inv_norm, stats, index)


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

    ``features`` may have any strides; the prompt sets are made contiguous (a no-op when they are).
    ``launch`` overrides the tile sizes and launch options (tests use it to force several tiles on small shapes).
    """
    B, N, D = features.shape
    C = text_pos.shape[0]
    launch = launch or choose_launch_config(B, N, C, D, features.device)
    logits = dualcoop_head_forward(
        features,
        text_evidence.contiguous(),
        text_pos.contiguous(),
        text_neg.contiguous(),
        log_spatial_temp,
        wta,
        wta_gamma,
        logit_scale,
        launch.as_list(),
    )[0]
    return logits.to(features.dtype)
