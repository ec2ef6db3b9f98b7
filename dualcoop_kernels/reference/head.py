"""The head in eager PyTorch, docs/math.md line by line."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..options import DEFAULT_LOGIT_SCALE, DEFAULT_WTA_GAMMA, WTA_MODES
from .upcast import upcast_low_precision


def wta_weights(sim_pos: torch.Tensor, mode: str, gamma: float) -> torch.Tensor:
    """Winner-take-all weight of every class for every region (last dim = classes).

    ``u = gamma * M * s+`` with ``M = max_m s+``; ``pos_norm``: ``exp(u - max_m u)`` (which is
    ``softmax(u) / max softmax(u)``), ``pos_softmax``: ``1 + softmax_m(u)``, ``none``: 1.
    ``max`` (not ``amax``) so that gradient reaches exactly one arg-max element, as in docs/math.md, Backward.
    """
    if mode == "none":
        return torch.ones_like(sim_pos)
    best = sim_pos.max(dim=-1, keepdim=True).values
    u = gamma * best * sim_pos
    if mode == "pos_norm":
        return torch.exp(u - u.max(dim=-1, keepdim=True).values)
    if mode == "pos_softmax":
        return 1.0 + torch.softmax(u, dim=-1)
    raise ValueError(f"wta must be one of {WTA_MODES}, got {mode!r}")


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
    regions = F.normalize(features, dim=-1)
    sim_evidence = regions @ F.normalize(text_evidence, dim=-1).T
    sim_pos = regions @ F.normalize(text_pos, dim=-1).T
    sim_neg = regions @ F.normalize(text_neg, dim=-1).T

    weights = wta_weights(sim_pos, wta, wta_gamma)
    tau = torch.exp(log_spatial_temp.to(sim_evidence.dtype))
    attention = torch.softmax(tau * sim_evidence, dim=1)  # over regions, per class

    logits_pos = logit_scale * (attention * sim_pos * weights).sum(dim=1)
    logits_neg = logit_scale * (attention * sim_neg).sum(dim=1)
    return torch.stack([logits_neg, logits_pos], dim=1).to(out_dtype)
