"""The asymmetric loss with partial labels in eager PyTorch, docs/math.md line by line."""

from __future__ import annotations

import torch

from ..options import DEFAULT_CLIP, DEFAULT_EPS, DEFAULT_GAMMA_NEG, DEFAULT_GAMMA_POS
from .upcast import upcast_low_precision


def asymmetric_loss_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma_neg: float = DEFAULT_GAMMA_NEG,
    gamma_pos: float = DEFAULT_GAMMA_POS,
    clip: float = DEFAULT_CLIP,
    eps: float = DEFAULT_EPS,
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
    (logits,) = upcast_low_precision([logits], upcast)
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
