"""Pure PyTorch references for the head and the asymmetric loss.

These follow docs/math.md line by line and are the bar every fused backend is tested against.
They take already-validated tensors; the public entry points in ``head.py`` and ``loss.py`` check input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WTA_MODES = ("pos_norm", "pos200", "none")
# DualCoOp++'s constants (docs/math.md, Notation): the WTA sharpness gamma and the logit scale k
DEFAULT_WTA_GAMMA = 200.0
DEFAULT_LOGIT_SCALE = math.exp(3.0)


def _upcast(tensors, upcast: bool):
    """With ``upcast``, compute a low-precision input in float32 (float64 stays float64)."""
    if not upcast:
        return tensors
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


def wta_weights(sim_pos: torch.Tensor, mode: str, gamma: float) -> torch.Tensor:
    """Winner-take-all weight of every class for every region (last dim = classes).

    ``u = gamma * M * s+`` with ``M = max_m s+``; ``pos_norm``: ``exp(u - max_m u)`` (which is
    ``softmax(u) / max softmax(u)``), ``pos200``: ``1 + softmax_m(u)``, ``none``: 1.
    ``max`` (not ``amax``) so that gradient reaches exactly one arg-max element, as in docs/math.md, Backward.
    """
    if mode == "none":
        return torch.ones_like(sim_pos)
    best = sim_pos.max(dim=-1, keepdim=True).values
    u = gamma * best * sim_pos
    if mode == "pos_norm":
        return torch.exp(u - u.max(dim=-1, keepdim=True).values)
    if mode == "pos200":
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
    features, text_evidence, text_pos, text_neg, log_spatial_temp = _upcast(
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


def asymmetric_loss_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma_neg: float = 4.0,
    gamma_pos: float = 1.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    focal_grad: bool = False,
    reduction: str = "sum",
    upcast: bool = False,
) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al. 2021) with partial labels, as in docs/math.md, "Asymmetric loss".

    ``logits`` is B x C (sigmoid form) or B x 2 x C (two-way form, ``[:, 0]`` negative), ``targets``
    B x C in {0, 1}, ``mask`` B x C bool (True = known) or None. Unknown elements add nothing and get
    zero gradient. ``mean`` divides by the number of known elements (0 when none is known). A NaN or
    infinite logit makes its element's loss NaN, known label or not. With ``upcast`` fp16 and bf16
    logits are computed in float32 and the loss is cast back.
    """
    out_dtype = logits.dtype
    (logits,) = _upcast([logits], upcast)
    if logits.dim() == 3:
        logits = logits[:, 1] - logits[:, 0]
    # 0 * z is 0 for a finite logit and NaN for a NaN or infinite one (whose sigmoid saturates to a
    # finite loss): NaN in, NaN out. Its gradient is exactly 0 elsewhere.
    logits = logits + 0 * logits
    targets = targets.to(logits.dtype)
    prob = torch.sigmoid(logits)
    prob_neg = (1.0 - prob + clip).clamp(max=1.0) if clip > 0 else 1.0 - prob
    log_likelihood = targets * torch.log(prob.clamp(min=eps)) + (1.0 - targets) * torch.log(prob_neg.clamp(min=eps))
    prob_target = prob * targets + prob_neg * (1.0 - targets)
    exponent = gamma_pos * targets + gamma_neg * (1.0 - targets)
    focusing = torch.pow(1.0 - prob_target, exponent)
    if not focal_grad:
        focusing = focusing.detach()
    loss = -log_likelihood * focusing
    if mask is not None:
        loss = loss * mask  # not torch.where: a NaN at an unknown label stays NaN
    if reduction == "none":
        return loss.to(out_dtype)
    if reduction == "sum":
        return loss.sum().to(out_dtype)
    known = loss.numel() if mask is None else mask.sum()
    return (loss.sum() / torch.clamp(torch.as_tensor(known, device=loss.device), min=1)).to(out_dtype)
