"""The asymmetric loss with partial labels: public function, module, label helper."""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from . import extension
from ._checks import check_asl_inputs, check_asl_options, check_tensor, has_values
from .dispatch import BackendRegistry
from .errors import UsageError, UsageTypeError
from .options import DEFAULT_CLIP, DEFAULT_EPS, DEFAULT_GAMMA_NEG, DEFAULT_GAMMA_POS
from .reference import asymmetric_loss_reference

ASL_BACKENDS = BackendRegistry("asymmetric_loss")
# Built just in time by its first call, "auto" or by name (unless DUALCOOP_KERNELS_NO_BUILD=1), then cached.
ASL_BACKENDS.register(
    "extension",
    extension.asymmetric_loss,
    unavailable_reason=extension.unavailable_reason,
    prepare=extension.prepare,
)
ASL_BACKENDS.register("reference", functools.partial(asymmetric_loss_reference, upcast=True))


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
    backend: str = "auto",
) -> torch.Tensor:
    """Asymmetric loss (ASL, Ridnik et al. 2021) for multi-label scores with partial labels.

    Args:
        logits: B x C scores of the sigmoid form, or the B x 2 x C output of the head (two-way form,
            ``[:, 0]`` negative, ``[:, 1]`` positive), which is the sigmoid form on ``P+ - P-``.
            float16, bfloat16, float32 or float64 (fp16 and bf16 are computed in float32 by every
            backend). A NaN or infinite logit gives a NaN loss (its element's, and so the sum's), known
            label or not.
        targets: B x C labels, 1 (present) or 0 (absent) at every known position; bool, integer or
            floating. Values at unknown positions are ignored.
        mask: B x C bool, True where the label is known; None when all are. Unknown labels add
            nothing to the loss and get zero gradient. ``split_signed_labels`` builds it.
        gamma_neg, gamma_pos: focusing exponents of negatives and positives (DualCoOp++ trains with 2, 1).
        clip: probability shift of the negatives, ``q = min(1 - p + clip, 1)``, in [0, 1]; 0 disables it.
        eps: clamp of the probabilities inside the logarithms, in (0, 1). The numbers may also be
            one-element tensors that do not require grad.
        focal_grad: let gradient flow through the focusing weight (the ASL library's "optimized"
            variant); False detaches it, as the library does by default.
        reduction: ``"sum"`` (the ASL library; DualCoOp++ then scales by 0.02), ``"mean"`` over the
            known labels (0 when none is known), or ``"none"`` for the B x C elements (0 where unknown).
        backend: ``"auto"`` or a registered name; see ``available_backends("asymmetric_loss")``.

    Returns:
        A 0-d tensor (``sum``, ``mean``) or a B x C tensor (``none``) in the dtype of ``logits``.
    """
    numbers = check_asl_options(gamma_neg, gamma_pos, clip, eps, reduction)
    targets, mask = check_asl_inputs(logits, targets, mask)
    implementation = ASL_BACKENDS.resolve(backend, logits.device, logits.dtype).function
    return implementation(logits, targets, mask, **numbers, focal_grad=bool(focal_grad), reduction=reduction)


class AsymmetricLoss(nn.Module):
    """Module form of :func:`asymmetric_loss`; ``forward(logits, targets, mask=None)``.

    The constructor takes the keyword arguments of :func:`asymmetric_loss` and checks them at once.
    """

    def __init__(
        self,
        gamma_neg: float = DEFAULT_GAMMA_NEG,
        gamma_pos: float = DEFAULT_GAMMA_POS,
        clip: float = DEFAULT_CLIP,
        eps: float = DEFAULT_EPS,
        focal_grad: bool = False,
        reduction: str = "sum",
        backend: str = "auto",
    ):
        super().__init__()
        numbers = check_asl_options(gamma_neg, gamma_pos, clip, eps, reduction)
        ASL_BACKENDS.check_known(backend)
        self.options = dict(**numbers, focal_grad=focal_grad, reduction=reduction, backend=backend)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of ``logits`` against ``targets``, known where ``mask`` is True (everywhere when None):
        ``asymmetric_loss`` with this module's options."""
        return asymmetric_loss(logits, targets, mask, **self.options)

    def extra_repr(self) -> str:
        """The options the module's ``repr`` shows, as the constructor took them."""
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


def split_signed_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split DualCoOp++ signed labels into ``(targets, mask)`` for :func:`asymmetric_loss`.

    Args:
        labels: B x C with +1 (present), -1 (absent) and 0 (unknown), any real dtype.

    Returns:
        ``targets``: B x C in {0, 1} with the dtype of ``labels`` (1 where +1);
        ``mask``: B x C bool, True where the label is known (not 0).

    Warns when no label is -1: such a matrix is almost always 0/1 labels, whose 0 (absent) this
    would read as unknown.
    """
    check_tensor("labels", labels, 2, "B x C")
    if labels.dtype == torch.bool or labels.is_complex():
        raise UsageTypeError(f"labels must be a signed real tensor with values +1 / -1 / 0, got {labels.dtype}")
    if has_values(labels):
        if not bool(((labels == 1) | (labels == -1) | (labels == 0)).all()):
            raise UsageError("labels must hold only +1 (present), -1 (absent) and 0 (unknown)")
        if labels.numel() and not bool((labels == -1).any()):
            warnings.warn(
                "split_signed_labels: no label is -1 (absent), so every 0 is read as unknown. If these are "
                "0/1 labels (0 = absent), pass them to asymmetric_loss as targets directly, with "
                "mask=None or a bool mask that is True where a label is known.",
                stacklevel=2,
            )
    return (labels == 1).to(labels.dtype), labels != 0
