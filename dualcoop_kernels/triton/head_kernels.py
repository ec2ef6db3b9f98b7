"""The Triton head's kernels: the ``@triton.jit`` code, its tile helpers and the layout constants of
the buffers the kernels share with the host side (head.py: launches, operators, autograd, and the
list of launches of each path)."""

import triton
import triton.language as tl

from ..options import WTA_WEIGHT_CODES

# The kernels' WTA_POS and WTA_NEG: how a mode weighs the positive and the negative logits (options.py).
WEIGHT_ONE, WEIGHT_NORM, WEIGHT_ONE_PLUS_SOFTMAX, WEIGHT_SOFTMAX = (
    tl.constexpr(WTA_WEIGHT_CODES[kind]) for kind in ("one", "norm", "one_plus_softmax", "softmax")
)
SIDE_POS, SIDE_NEG = tl.constexpr(0), tl.constexpr(1)  # added to a statistic's first row: that side's row

# Per-region float statistics, stacked along dim 0 of one (STATS, B, N) tensor, two rows each (a side's
# row: the first plus the side): STAT_COEF is c in u = gamma c s+ (M for the positive side, m for the
# negative one), STAT_MAX_U the largest u, STAT_INV_TOTAL 1 / sum_m exp(u - max u) (the softmax kinds;
# 1 otherwise), STAT_SHIFT s+ at the arg-max of u. Constexpr: kernels read them.
STAT_COEF, STAT_MAX_U, STAT_INV_TOTAL, STAT_SHIFT = (tl.constexpr(i) for i in (0, 2, 4, 6))
# Per-region indices, stacked along dim 0 of one (INDICES, B, N) int32 tensor: the arg-max and arg-min
# of s+ (where dM and dm go; first row plus the side), and the arg-max of the positive u (norm's winner).
INDEX_COEF, INDEX_WINNER = tl.constexpr(0), tl.constexpr(2)
# The forward's per-(image, region tile, class) partial sums of the region softmax, rows of one tensor.
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
def _load_feature_chunk(f_ptr, stride_fn, stride_fd, regions, region_mask, dims, dim_mask, DTYPE: tl.constexpr):
    offsets = regions.to(tl.int64)[:, None] * stride_fn + dims.to(tl.int64)[None, :] * stride_fd
    return tl.load(f_ptr + offsets, mask=region_mask[:, None] & dim_mask[None, :], other=0.0).to(DTYPE)


@triton.jit
def _load_text_chunk(t_ptr, classes, class_mask, dims, dim_mask, D, DTYPE: tl.constexpr):
    offsets = classes.to(tl.int64)[:, None] * D + dims[None, :]
    return tl.load(t_ptr + offsets, mask=class_mask[:, None] & dim_mask[None, :], other=0.0).to(DTYPE)


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
def _saved_tile(sims_ptr, offsets, classes, C):
    """A tile's place in the first of the saved similarities (3, B*N, C); int64, since B*N*C may pass 2**31."""
    return sims_ptr + offsets.to(tl.int64)[:, None] * C + classes[None, :]


@triton.jit
def _saved_similarity_tiles(sims_ptr, sims_stride, offsets, region_mask, classes, class_mask, C):
    """The tiles the forward saved (``_forward_kernel``'s SAVE_SIMILARITIES), zero outside the valid part
    as ``_similarity_tiles`` gives them."""
    tile = _saved_tile(sims_ptr, offsets, classes, C)
    valid = region_mask[:, None] & class_mask[None, :]
    return (
        tl.load(tile, mask=valid, other=0.0),
        tl.load(tile + sims_stride, mask=valid, other=0.0),
        tl.load(tile + 2 * sims_stride, mask=valid, other=0.0),
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
def _tile_statistics(
    sim_p, class_mask, stats_ptr, index_ptr, stat_stride, offsets, region_mask, gamma,
    WTA_POS: tl.constexpr, WTA_NEG: tl.constexpr,
):  # fmt: skip
    """The WTA statistics of a tile that holds every class, stored for the backward, and both sides'
    weights from them."""
    run_max, run_min, arg_max, arg_min, has_nan = _tile_extrema(sim_p, class_mask, 0)
    run_max, run_min, shift_pos, shift_neg, max_u_pos, max_u_neg = _shifts(run_max, run_min, has_nan, gamma)
    total_pos = tl.full(run_max.shape, 1.0, run_max.dtype)  # what a side that is no softmax stores
    total_neg = total_pos
    if (WTA_POS != WEIGHT_ONE) and (WTA_POS != WEIGHT_NORM):
        total_pos = _softmax_total(sim_p, class_mask, run_max, max_u_pos, gamma)
    if WTA_NEG != WEIGHT_ONE:
        total_neg = _softmax_total(sim_p, class_mask, run_min, max_u_neg, gamma)
    _store_statistics(
        stats_ptr, index_ptr, stat_stride, offsets, region_mask, run_max, run_min, arg_max, arg_min,
        shift_pos, shift_neg, max_u_pos, max_u_neg, total_pos, total_neg,
    )  # fmt: skip
    weights_pos, _ = _weights(sim_p, run_max, max_u_pos, 1.0 / total_pos, gamma, WTA_POS)
    weights_neg, _ = _weights(sim_p, run_min, max_u_neg, 1.0 / total_neg, gamma, WTA_NEG)
    return weights_pos, weights_neg


@triton.jit
def _forward_kernel(
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
    sims_ptr,
    sims_stride,
    N,
    C,
    D,
    gamma: tl.float64,
    ALL_CLASSES: tl.constexpr,
    SAVE_SIMILARITIES: tl.constexpr,
    WTA_POS: tl.constexpr,
    WTA_NEG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    SIM_DTYPE: tl.constexpr,
):
    """The forward of an (image, region tile, class tile): the three similarity tiles in one sweep over
    D, both sides' WTA weights and this tile's part of the region softmax per class: its max of
    tau s^e, and sums of p = exp(tau s^e - max), p s+ w+ and p s- w-, as rows PARTIAL_* of
    ``partials`` at (image, region tile), for ``_combine_regions_kernel``. When the tile holds every
    class (``ALL_CLASSES``) it computes the WTA statistics itself and stores them for the backward;
    otherwise ``_region_stats_kernel`` has. ``SAVE_SIMILARITIES`` stores the three tiles for the
    backward in ``sims`` (3, B*N, C)."""
    gamma = tl.full((), gamma, ACC)  # typed float64: module doc
    image, regions, region_mask, f_ptr, offsets, inv_norm = _region_tile(f_ptr, stride_fb, inv_norm_ptr, N, BLOCK_N)
    classes = tl.arange(0, BLOCK_C)  # spelled out for a tile of every class: fewer registers on sm_80
    if not ALL_CLASSES:
        classes += tl.program_id(2) * BLOCK_C
    class_mask = classes < C
    sim_e, sim_p, sim_n = _similarity_tiles(
        f_ptr, stride_fn, stride_fd, regions, region_mask, inv_norm, text_ptr, text_inv_norm_ptr,
        C, D, classes, class_mask, True, True, BLOCK_N, BLOCK_C, BLOCK_D, ACC, PRECISION, SIM_DTYPE,
    )  # fmt: skip
    if SAVE_SIMILARITIES:
        tile = _saved_tile(sims_ptr, offsets, classes, C)
        valid = region_mask[:, None] & class_mask[None, :]
        tl.store(tile, sim_e, mask=valid)
        tl.store(tile + sims_stride, sim_p, mask=valid)
        tl.store(tile + 2 * sims_stride, sim_n, mask=valid)
    if ALL_CLASSES and ((WTA_POS != WEIGHT_ONE) or (WTA_NEG != WEIGHT_ONE)):
        weights_pos, weights_neg = _tile_statistics(
            sim_p, class_mask, stats_ptr, index_ptr, stat_stride, offsets, region_mask, gamma, WTA_POS, WTA_NEG
        )
    else:
        weights_pos, _ = _side_weights(sim_p, stats_ptr, stat_stride, offsets, region_mask, gamma, SIDE_POS, WTA_POS)
        weights_neg, _ = _side_weights(sim_p, stats_ptr, stat_stride, offsets, region_mask, gamma, SIDE_NEG, WTA_NEG)
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
def _combine_regions_kernel(
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
    partials (``_forward_kernel``), merged as an online softmax merges them."""
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
    weights, sigma, h, sim_p, classes, region_mask, sum_0, sum_1, sum_2, stats_ptr, index_ptr, stat_stride,
    offsets, gamma, SIDE: tl.constexpr, KIND: tl.constexpr,
):  # fmt: skip
    """One side's WTA part of dL/ds+ on a tile (docs/math.md) from its three per-region sums
    (``_side_sums``; separate arguments: triton 3.2 passes no tuples): gamma c du, plus dc = gamma
    sum_m s+ du at the arg-max of s+ (c = M, positive side) or its arg-min (c = m, negative side)."""
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
    """A side's per-region sums from a tile that holds every class."""
    winner = tl.load(index_ptr + INDEX_WINNER * stat_stride + offsets, mask=region_mask, other=-1)
    shift = tl.load(stats_ptr + (STAT_SHIFT + SIDE) * stat_stride + offsets, mask=region_mask, other=0.0)
    return _side_sums(sim_p, weights, sigma, h, classes, class_mask, winner, shift, KIND)


@triton.jit
def _tile_grads(
    sim_e, sim_p, sim_n, image, regions, region_mask, classes, class_mask, stats_ptr, index_ptr, stat_stride,
    log_temp_ptr, lse_ptr, logits_ptr, grad_ptr, sums_ptr, gamma, logit_scale, N, C,
    WTA_POS: tl.constexpr, WTA_NEG: tl.constexpr, SUMS_IN_TILE: tl.constexpr,
):  # fmt: skip
    """The backward of docs/math.md on one (region tile, class tile) from its similarities: dL/ds of the
    three sets, and s^e - lse / tau (= log(a) / tau): since sum_i dL/ds^e = 0 for every (image, class),
    sums over regions of s^e dL/ds^e may use it instead of s^e and so avoid cancelling large terms.
    The WTA backward's per-region sums over classes come from the tile itself when it holds every
    class (``SUMS_IN_TILE``), from ``_region_sums_kernel`` otherwise."""
    tau = tl.exp(tl.load(log_temp_ptr).to(sim_e.dtype))
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
            sum_0, sum_1, sum_2 = _tile_side_sums(
                sim_p, weights_pos, sigma_pos, h_pos, classes, class_mask, region_mask, stats_ptr, index_ptr,
                stat_stride, offsets, SIDE_POS, WTA_POS,
            )  # fmt: skip
        else:
            sum_0, sum_1, sum_2 = _load_side_sums(sums_ptr, stat_stride, offsets, region_mask, SIDE_POS)
        grad_p += _side_grad(
            weights_pos, sigma_pos, h_pos, sim_p, classes, region_mask, sum_0, sum_1, sum_2, stats_ptr,
            index_ptr, stat_stride, offsets, gamma, SIDE_POS, WTA_POS,
        )  # fmt: skip
    if WTA_NEG != WEIGHT_ONE:  # the negative weights are functions of s+ too
        if SUMS_IN_TILE:
            sum_0, sum_1, sum_2 = _tile_side_sums(
                sim_p, weights_neg, sigma_neg, h_neg, classes, class_mask, region_mask, stats_ptr, index_ptr,
                stat_stride, offsets, SIDE_NEG, WTA_NEG,
            )  # fmt: skip
        else:
            sum_0, sum_1, sum_2 = _load_side_sums(sums_ptr, stat_stride, offsets, region_mask, SIDE_NEG)
        grad_p += _side_grad(
            weights_neg, sigma_neg, h_neg, sim_p, classes, region_mask, sum_0, sum_1, sum_2, stats_ptr,
            index_ptr, stat_stride, offsets, gamma, SIDE_NEG, WTA_NEG,
        )  # fmt: skip
    valid = region_mask[:, None] & class_mask[None, :]
    grad_e = tl.where(valid, grad_e, 0.0)
    grad_p = tl.where(valid, grad_p, 0.0)
    grad_n = tl.where(valid, grad_n, 0.0)
    return log_attention / tau, grad_e, grad_p, grad_n


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
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    ACC: tl.constexpr,
):
    """Sum the splits' partials of G and apply the normalisation t = T / |T| with the (3, C) sums
    <t, G>: dL/dT = (G - t <t, G>) / |T|, for one prompt set (program axis 2), a class tile and a D
    chunk. BLOCK_SPLITS partials are loaded at once: one after the other, each load's latency adds up."""
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
    for split_start in range(0, splits, BLOCK_SPLITS):
        parts = split_start + tl.arange(0, BLOCK_SPLITS)
        part_offsets = (parts * 3 + prompt_set).to(tl.int64)[:, None, None] * set_stride + offsets[None, :, :]
        part_mask = (parts < splits)[:, None, None] & mask[None, :, :]
        grad += tl.sum(tl.load(grad_text_ptr + part_offsets, mask=part_mask, other=0.0), axis=0)
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
        sim_e, sim_p, sim_n = _similarity_tiles(
            f_ptr, stride_fn, stride_fd, regions, region_mask, inv_norm, text_ptr, text_inv_norm_ptr, C, D,
            classes, class_mask, True, True, BLOCK_N, BLOCK_C, BLOCK_D, ACC, PRECISION, SIM_DTYPE,
        )  # fmt: skip
        _, grad_e, grad_p, grad_n = _tile_grads(
            sim_e, sim_p, sim_n, image, regions, region_mask, classes, class_mask, stats_ptr, index_ptr,
            stat_stride, log_temp_ptr, lse_ptr, logits_ptr, grad_ptr, sums_ptr, gamma, logit_scale, N, C,
            WTA_POS, WTA_NEG, False,
        )  # fmt: skip
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
def _similarity_grad_kernel(
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
    sims_ptr,
    sims_stride,
    grad_sim_ptr,
    set_stride,
    projection_ptr,
    grad_temp_ptr,
    grad_features_ptr,
    N,
    C,
    D,
    rows_total,
    class_start,
    chunk_classes,
    gamma: tl.float64,
    logit_scale: tl.float64,
    ALL_CLASSES: tl.constexpr,
    SAVED_SIMILARITIES: tl.constexpr,
    WANT_TEXT: tl.constexpr,
    WANT_FEATURES: tl.constexpr,
    WTA_POS: tl.constexpr,
    WTA_NEG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    SIM_DTYPE: tl.constexpr,
):
    """The backward of an (image, region tile, class tile) of the chunk of classes from ``class_start``:
    this tile's term of dL/dtheta; for the prompts, dS^x f-scaled (dS times the regions' inverse norms)
    written class-major into the chunk's ``grad_sim`` (3, chunk_classes, B*N) for
    ``_text_grad_gemm_kernel``, and the tile's part of <t, G> per prompt. The WTA backward's per-region
    sums come from the tile when it holds every class (``ALL_CLASSES``), from ``_region_sums_kernel``
    otherwise; its similarities from the forward when it saved them (``SAVED_SIMILARITIES``), from the
    GEMM otherwise. Only a tile of every class can give the features' gradient (``WANT_FEATURES``):
    dL/dF = (G - f <f, G>) / |F| with G = sum_x dS^x t^x, swept over D in BLOCK_D chunks."""
    gamma, logit_scale = tl.full((), gamma, ACC), tl.full((), logit_scale, ACC)  # typed float64: module doc
    image, regions, region_mask, f_ptr, offsets, inv_norm = _region_tile(f_ptr, stride_fb, inv_norm_ptr, N, BLOCK_N)
    region_tile = image * tl.num_programs(1) + tl.program_id(1)
    class_tile = class_start // BLOCK_C + tl.program_id(2)
    if ALL_CLASSES:  # one tile and one chunk, spelled out: sm_80 spills otherwise
        chunk_class = tl.arange(0, BLOCK_C)
        classes, class_mask = chunk_class, chunk_class < C
    else:
        chunk_class = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        classes, class_mask = class_start + chunk_class, chunk_class < chunk_classes
    if SAVED_SIMILARITIES:
        sim_e, sim_p, sim_n = _saved_similarity_tiles(
            sims_ptr, sims_stride, offsets, region_mask, classes, class_mask, C
        )
    else:
        sim_e, sim_p, sim_n = _similarity_tiles(
            f_ptr, stride_fn, stride_fd, regions, region_mask, inv_norm, text_ptr, text_inv_norm_ptr, C, D,
            classes, class_mask, True, True, BLOCK_N, BLOCK_C, BLOCK_D, ACC, PRECISION, SIM_DTYPE,
        )  # fmt: skip
    centered_e, grad_e, grad_p, grad_n = _tile_grads(
        sim_e, sim_p, sim_n, image, regions, region_mask, classes, class_mask, stats_ptr, index_ptr, stat_stride,
        log_temp_ptr, lse_ptr, logits_ptr, grad_ptr, sums_ptr, gamma, logit_scale, N, C, WTA_POS, WTA_NEG,
        ALL_CLASSES,
    )  # fmt: skip
    projection_e = tl.sum(centered_e * grad_e, axis=0)  # also dL/dtheta's terms
    region_tiles = tl.num_programs(0) * tl.num_programs(1)
    tl.store(grad_temp_ptr + class_tile * region_tiles + region_tile, tl.sum(projection_e))
    if WANT_TEXT:
        part = projection_ptr + region_tile * 3 * C + classes
        tl.store(part, projection_e, mask=class_mask)
        tl.store(part + C, tl.sum(sim_p * grad_p, axis=0), mask=class_mask)
        tl.store(part + 2 * C, tl.sum(sim_n * grad_n, axis=0), mask=class_mask)
        valid = region_mask[:, None] & class_mask[None, :]
        scale = inv_norm[:, None]
        grad_sim_ptr += chunk_class.to(tl.int64)[None, :] * rows_total + offsets[:, None]  # class-major
        tl.store(grad_sim_ptr, grad_e * scale, mask=valid)
        tl.store(grad_sim_ptr + set_stride, grad_p * scale, mask=valid)
        tl.store(grad_sim_ptr + 2 * set_stride, grad_n * scale, mask=valid)
    if WANT_FEATURES:
        projection = tl.sum(grad_e * sim_e + grad_p * sim_p + grad_n * sim_n, axis=1)
        # G = dS^x t^x with t = T * text_inv_norm: fold the norm into dS's columns
        scaled_e = grad_e * tl.load(text_inv_norm_ptr + classes, mask=class_mask, other=0.0)[None, :]
        scaled_p = grad_p * tl.load(text_inv_norm_ptr + C + classes, mask=class_mask, other=0.0)[None, :]
        scaled_n = grad_n * tl.load(text_inv_norm_ptr + 2 * C + classes, mask=class_mask, other=0.0)[None, :]
        # BLOCK_D chunks: three (BLOCK_C, block_d_grad) operands would overflow shared memory
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
    C,
    class_start,
    chunk_classes,
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
    """G = dS^T F for a tile of a chunk's prompt rows (the 3 chunk_classes rows of ``grad_sim``, f's
    norms already folded in) and a D chunk, over this split's range of the B*N feature rows: one
    partial per split in ``grad_text[split]`` (3, C, D), summed by ``_text_grad_finish_kernel`` (no
    atomics: deterministic)."""
    prompts = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    prompt_mask = prompts < 3 * chunk_classes
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
    out_rows = (prompts // chunk_classes) * C + class_start + prompts % chunk_classes  # (set, class) in (3, C)
    out = grad_text_ptr + (split.to(tl.int64) * 3 * C + out_rows.to(tl.int64)[:, None]) * D + dims[None, :]
    tl.store(out, grad, mask=prompt_mask[:, None] & dim_mask[None, :])


KERNELS = (
    _region_stats_kernel,
    _forward_kernel,
    _combine_regions_kernel,
    _region_sums_kernel,
    _similarity_grad_kernel,
    _text_grad_gemm_kernel,
    _text_grad_finish_kernel,
    _feature_grad_kernel,
)
