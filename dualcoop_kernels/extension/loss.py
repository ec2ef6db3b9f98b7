"""The extension's operators as the loss uses them: their fake (shape) implementations and autograd,
registered once the compiled library has defined them, and the backend function.

The forward computes the loss and its gradient to every logit in one pass and keeps the gradient (B x C
floats); the backward only scales it.
"""

from __future__ import annotations

import functools

import torch

from ..options import DEFAULT_CLIP, DEFAULT_EPS, DEFAULT_GAMMA_NEG, DEFAULT_GAMMA_POS, REDUCTIONS


@functools.cache
def register_python_side() -> None:
    """Fake (shape) implementations and autograd of the C++ operators, once they exist."""
    torch.library.register_fake("dualcoop_kernels::asymmetric_loss_forward")(_fake_forward)
    torch.library.register_fake("dualcoop_kernels::asymmetric_loss_backward")(_fake_backward)
    torch.library.register_autograd(
        "dualcoop_kernels::asymmetric_loss_forward", _backward, setup_context=_setup_context
    )


def _fake_forward(logits, targets, mask, gamma_neg, gamma_pos, clip, eps, focal_grad, reduction, need_grad):
    rows, cols = logits.shape[0], logits.shape[-1]
    loss = logits.new_empty((rows, cols) if reduction == REDUCTIONS["none"] else ())
    grad_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    grad = logits.new_empty((rows, cols) if need_grad else (0, 0), dtype=grad_dtype)
    return loss, grad


def _fake_backward(grad_loss, grad, two_way, dtype):
    rows, cols = grad.shape
    return grad.new_empty((rows, 2, cols) if two_way else (rows, cols), dtype=dtype)


def _setup_context(ctx, inputs, output):
    logits = inputs[0]
    ctx.two_way = logits.dim() == 3
    ctx.dtype = logits.dtype
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    grad_logits = torch.ops.dualcoop_kernels.asymmetric_loss_backward(grad_loss, grad, ctx.two_way, ctx.dtype)
    return (grad_logits,) + (None,) * 9


def asymmetric_loss(
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
) -> torch.Tensor:
    """The loss through the extension; same contract as ``asymmetric_loss_reference``."""
    if targets.dtype != logits.dtype:
        targets = targets.to(logits.dtype)
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = torch.ops.dualcoop_kernels.asymmetric_loss_forward(
        logits, targets, mask, gamma_neg, gamma_pos, clip, eps, focal_grad, REDUCTIONS[reduction], need_grad
    )
    return loss
