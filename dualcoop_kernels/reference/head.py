"""The head in eager PyTorch, docs/math.md line by line."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..options import DEFAULT_LOGIT_SCALE, DEFAULT_WTA_GAMMA, WTA_MODES, WTA_WEIGHTS
from .upcast import upcast_low_precision


def side_weights(sim_pos: torch.Tensor, kind: str, coefficient: torch.Tensor, gamma: float) -> torch.Tensor:
    """One side's weight of every class for every region (last dim = classes), ``kind`` as in
    ``options.WTA_WEIGHTS``, with ``u = gamma * coefficient * s+``: ``norm``: ``exp(u - max_m u)``
    (which is ``softmax(u) / max softmax(u)``), ``softmax``: ``softmax_m(u)``, ``one_plus_softmax``:
    ``1 + softmax_m(u)``."""
    u = gamma * coefficient * sim_pos
    if kind == "norm":
        return torch.exp(u - u.max(dim=-1, keepdim=True).values)
    softmax = torch.softmax(u, dim=-1)
    return 1.0 + softmax if kind == "one_plus_softmax" else softmax


def wta_weights(sim_pos: torch.Tensor, mode: str, gamma: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Winner-take-all weights of the positive and of the negative logits, for every region and class
    (last dim = classes); None where a side is not weighted (a weight of 1).

    The positive side's ``u = gamma * M * s+`` with ``M = max_m s+``, the negative side's
    ``gamma * m * s+`` with ``m = min_m s+``. ``max`` and ``min`` (not ``amax``) so that gradient
    reaches exactly one element, as in docs/math.md, Backward.
    """
    if mode not in WTA_WEIGHTS:
        raise UsageError(f"wta must be one of {WTA_MODES}, got {mode!r}")
    kinds = WTA_WEIGHTS[mode]
    coefficients = (sim_pos.max(dim=-1, keepdim=True).values, sim_pos.min(dim=-1, keepdim=True).values)
    return tuple(
        None if kind == "one" else side_weights(sim_pos, kind, coefficient, gamma)
        for kind, coefficient in zip(kinds, coefficients)
    )


def dualcoop_head_reference(
    features: torch.Tensor,
    text_evidence: torch.Tensor,
    text_pos: torch.Tensor,
    text_neg: torch.Tensor,
    log_spatial_temp: torch.Tensor,
    *,
    wta: str = "pos_norm",
    wta_gamma: float = DEFAULT_WTA_GAMMA,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    upcast: bool = False,
) -> torch.Tensor:
    """DualCoOp++ head in eager PyTorch: B x N x D regions, three C x D prompt sets -> B x 2 x C.

    Output ``[:, 0]`` is ``P-`` and ``[:, 1]`` is ``P+``. With ``upcast`` the arithmetic of fp16 and
    bf16 inputs runs in float32 and the result is cast back, like the fused kernels do.
    """
    out_dtype = features.dtype
    features, text_evidence, text_pos, text_neg, log_spatial_temp = upcast_low_precision(
        [features, text_evidence, text_pos, text_neg, log_spatial_temp], upcast
    )
    attention, region_pos, region_neg = dualcoop_head_regions(
        features, text_evidence, text_pos, text_neg, log_spatial_temp, wta, wta_gamma, logit_scale
    )
    logits_pos = (attention * region_pos).sum(dim=1)
    logits_neg = (attention * region_neg).sum(dim=1)
    return torch.stack([logits_neg, logits_pos], dim=1).to(out_dtype)


def dualcoop_head_regions(features, text_evidence, text_pos, text_neg, log_spatial_temp, wta, wta_gamma, logit_scale):
    """What the head aggregates, each B x N x C: the evidence weights of every class over the regions
    (``softmax_i(tau s^e)``), and the positive and negative region logits after WTA (``k s+ w+`` and
    ``k s- w-``); ``P+ = sum_i attention * positive`` and ``P- = sum_i attention * negative``."""
    regions = F.normalize(features, dim=-1)
    sim_evidence = regions @ F.normalize(text_evidence, dim=-1).T
    sim_pos = regions @ F.normalize(text_pos, dim=-1).T
    sim_neg = regions @ F.normalize(text_neg, dim=-1).T
    weight_pos, weight_neg = wta_weights(sim_pos, wta, wta_gamma)
    tau = torch.exp(log_spatial_temp.to(sim_evidence.dtype))
    attention = torch.softmax(tau * sim_evidence, dim=1)  # over regions, per class
    region_pos = logit_scale * (sim_pos if weight_pos is None else sim_pos * weight_pos)
    region_neg = logit_scale * (sim_neg if weight_neg is None else sim_neg * weight_neg)
    return attention, region_pos, region_neg


def _one_hot(indices: torch.Tensor, classes: int, like: torch.Tensor) -> torch.Tensor:
    return F.one_hot(indices, classes).to(like.dtype)


@torch.no_grad()
def dualcoop_head_backward_reference(
    features: torch.Tensor,
    text_evidence: torch.Tensor,
    text_pos: torch.Tensor,
    text_neg: torch.Tensor,
    log_spatial_temp: torch.Tensor,
    grad_output: torch.Tensor,
    *,
    wta: str,
    wta_gamma: float,
    logit_scale: float,
    absolute: bool = False,
) -> list[torch.Tensor]:
    """docs/math.md's Backward written out: the logits and the gradients to features, text_evidence,
    text_pos, text_neg and log_spatial_temp for the output gradient ``grad_output`` (autograd of
    :func:`dualcoop_head_reference` gives the same, to rounding).

    With ``absolute`` every term enters by its magnitude: absolute values of every factor (a dot
    product by the magnitudes of its terms, sum |f_d t_d|) and differences as sums. The results
    then bound, to first order, the rounding error each result can carry, in units of the roundoff
    and before the exponents amplify it: the condition of its sums (``dualcoop_kernels.testing``).
    """

    def magnitude(x):
        return x.abs() if absolute else x

    def minus(x, y):
        return x + y if absolute else x - y

    units = [F.normalize(t, dim=-1) for t in (text_evidence, text_pos, text_neg)]
    regions = F.normalize(features, dim=-1)
    s_e, s_p, s_n = (regions @ t.T for t in units)
    factors = [regions.abs() @ t.abs().T for t in units] if absolute else [s_e, s_p, s_n]
    weights = [torch.ones_like(s_p) if w is None else w for w in wta_weights(s_p, wta, wta_gamma)]
    tau = torch.exp(log_spatial_temp.to(s_e.dtype))
    attention = torch.softmax(tau * s_e, dim=1)
    logits_pos = logit_scale * (attention * factors[1] * weights[0]).sum(dim=1)
    logits_neg = logit_scale * (attention * factors[2] * weights[1]).sum(dim=1)

    g_neg, g_pos = magnitude(grad_output[:, 0]), magnitude(grad_output[:, 1])
    v = logit_scale * (factors[1] * weights[0] * g_pos[:, None] + factors[2] * weights[1] * g_neg[:, None])
    mean_v = (logits_pos * g_pos + logits_neg * g_neg)[:, None]
    grads_s = [
        tau * attention * minus(v, mean_v),
        attention * logit_scale * weights[0] * g_pos[:, None],
        attention * logit_scale * weights[1] * g_neg[:, None],
    ]
    sides = zip(
        WTA_WEIGHTS[wta],
        (s_p.max(dim=-1), s_p.min(dim=-1)),
        weights,
        (attention * logit_scale * factors[1] * g_pos[:, None], attention * logit_scale * factors[2] * g_neg[:, None]),
    )
    for kind, (coefficient, at), w, h in sides:  # the WTA terms of dL/ds+, docs/math.md
        if kind == "one":
            continue
        if kind == "norm":
            winner = _one_hot((wta_gamma * coefficient[..., None] * s_p).argmax(dim=-1), s_p.shape[-1], s_p)
            grad_u = minus(w * h, winner * (w * h).sum(dim=-1, keepdim=True))
        else:
            sigma = side_weights(s_p, "softmax", coefficient[..., None], wta_gamma)
            grad_u = sigma * minus(h, (sigma * h).sum(dim=-1, keepdim=True))
        grad_coefficient = wta_gamma * (factors[1] * grad_u).sum(dim=-1, keepdim=True)
        grads_s[1] = grads_s[1] + wta_gamma * magnitude(coefficient)[..., None] * grad_u
        grads_s[1] = grads_s[1] + _one_hot(at, s_p.shape[-1], s_p) * grad_coefficient

    grad_theta = (factors[0] * grads_s[0]).sum()
    # through the products and the normalisations: dL/dy = (G - x <x, G>) / |y| for x = y / |y|
    grad_regions = sum(g @ magnitude(t) for g, t in zip(grads_s, units))
    projection = sum((g * s).sum(dim=-1, keepdim=True) for g, s in zip(grads_s, factors))
    grad_features = minus(grad_regions, magnitude(regions) * projection) / _norms(features)
    grad_texts = [
        minus(torch.einsum("bnc,bnd->cd", g, magnitude(regions)), magnitude(t) * (g * s).sum(dim=(0, 1))[:, None])
        / _norms(text)
        for g, s, t, text in zip(grads_s, factors, units, (text_evidence, text_pos, text_neg))
    ]
    return [torch.stack([logits_neg, logits_pos], dim=1), grad_features, *grad_texts, grad_theta]


def _norms(rows: torch.Tensor) -> torch.Tensor:
    return rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # as F.normalize divides
