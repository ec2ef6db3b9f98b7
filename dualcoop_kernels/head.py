"""The DualCoOp++ head: public function, module, and backend selection."""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import triton as triton_backend
from ._checks import check_head_inputs, finite_number, positive_scale, wta_mode, wta_sharpness
from .dispatch import BackendRegistry
from .options import DEFAULT_LOG_SPATIAL_TEMP, DEFAULT_LOGIT_SCALE, DEFAULT_WTA_GAMMA
from .reference import dualcoop_head_reference

HEAD_BACKENDS = BackendRegistry("dualcoop_head")
# the interpreter runs Triton on the CPU too, but slowly: "auto" keeps it for CUDA tensors
HEAD_BACKENDS.register(
    "triton",
    triton_backend.dualcoop_head,
    unavailable_reason=triton_backend.unavailable_reason,
    unsupported_dtype=triton_backend.unsupported_dtype,
    prepare=triton_backend.prepare,
    use_in_auto=lambda device: device.type == "cuda",
)
HEAD_BACKENDS.register("reference", functools.partial(dualcoop_head_reference, upcast=True))


def dualcoop_head(
    features: torch.Tensor,
    text_evidence: torch.Tensor,
    text_pos: torch.Tensor,
    text_neg: torch.Tensor,
    log_spatial_temp: torch.Tensor | float,
    *,
    wta: str = "pos_norm",
    wta_gamma: float = DEFAULT_WTA_GAMMA,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    backend: str = "auto",
) -> torch.Tensor:
    """Score every class of every image from region features and three prompts per class.

    Args:
        features: B x N x D region features of a frozen CLIP image encoder (N regions per image, D the
            joint embedding width), float16, bfloat16, float32 or float64 (fp16 and bf16 are computed
            in float32 by every backend). Normalised inside.
        text_evidence: C x D text features of the evidential prompts; their similarity to each region
            decides how much that region counts for the class (softmax over regions). Same dtype.
        text_pos: C x D text features of the positive prompts ("the class is present").
        text_neg: C x D text features of the negative prompts ("the class is absent").
        log_spatial_temp: theta, the learnable log temperature of the region softmax (tau = exp(theta),
            ``spatial_T`` in the authors' code): a 0-d floating tensor on the same device, or a number
            for a fixed temperature.
        wta: winner-take-all across classes per region (docs/math.md), weighing the positive logits by
            a function of ``u = gamma * max_m(s+) * s+`` and, in the ``pos_neg`` modes, the negative ones by
            the same function of ``u- = gamma * min_m(s+) * s+``: ``"pos_norm"`` (COCO setting,
            ``exp(u - max u)``), ``"pos_softmax"`` (VOC and NUS-WIDE, ``1 + softmax(u)``),
            ``"pos_pure_softmax"`` (``softmax(u)``), ``"pos_neg_softmax"`` (``1 + softmax`` on both
            sides), ``"pos_neg_pure_softmax"`` (``softmax`` on both) or ``"none"``. The authors' names
            are accepted too: ``"pos200"``, ``"pos_test"``, ``"pos_neg"``, ``"pos_neg_test"``.
        wta_gamma: WTA sharpness gamma >= 0 in u: a number, or a one-element tensor that does not
            require grad.
        logit_scale: k, the constant scale of the logits (e^3 in DualCoOp++); a number or a tensor
            as ``wta_gamma``.
        backend: ``"auto"`` (the fused Triton kernels for CUDA tensors, the reference elsewhere),
            ``"triton"`` (also on the CPU under ``TRITON_INTERPRET=1``, slowly) or ``"reference"``
            (eager PyTorch); see ``available_backends("dualcoop_head")``.

    Returns:
        B x 2 x C logits in the dtype of ``features``: ``[:, 0]`` is P- (evidence of absence) and
        ``[:, 1]`` is P+ (evidence of presence); ``sigmoid(P+ - P-)`` is the class probability.
    """
    wta = wta_mode(wta)
    log_spatial_temp = check_head_inputs(features, text_evidence, text_pos, text_neg, log_spatial_temp)
    wta_gamma = wta_sharpness(wta_gamma)
    logit_scale = positive_scale(logit_scale)
    implementation = HEAD_BACKENDS.resolve(backend, features.device, features.dtype).function
    return implementation(
        features,
        text_evidence,
        text_pos,
        text_neg,
        log_spatial_temp,
        wta=wta,
        wta_gamma=wta_gamma,
        logit_scale=logit_scale,
    )


class DualCoOpHead(nn.Module):
    """Drop-in DualCoOp++ head that owns the learnable log spatial temperature.

    Args:
        wta, wta_gamma, logit_scale, backend: as in :func:`dualcoop_head`.
        spatial_temp_init: initial theta (log temperature); 3.0 as in DualCoOp++, so tau starts at ~20.
        freeze_temperature: keeps theta at ``spatial_temp_init`` (``requires_grad`` False): with
            ``wta="pos_norm"``, the authors' ``pos_norm_det``.

    ``forward(features, text_evidence, text_pos, text_neg)`` takes B x N x D regions and three C x D
    prompt sets and returns B x 2 x C logits (``[:, 0]`` negative, ``[:, 1]`` positive).
    """

    def __init__(
        self,
        wta: str = "pos_norm",
        wta_gamma: float = DEFAULT_WTA_GAMMA,
        logit_scale: float = DEFAULT_LOGIT_SCALE,
        spatial_temp_init: float = DEFAULT_LOG_SPATIAL_TEMP,
        backend: str = "auto",
        *,
        freeze_temperature: bool = False,
    ):
        super().__init__()
        HEAD_BACKENDS.check_known(backend)
        self.wta = wta_mode(wta)
        self.wta_gamma = wta_sharpness(wta_gamma)
        self.logit_scale = positive_scale(logit_scale)
        self.backend = backend
        theta = torch.tensor(finite_number("spatial_temp_init", spatial_temp_init))
        self.log_spatial_temp = nn.Parameter(theta, requires_grad=not freeze_temperature)

    def forward(
        self,
        features: torch.Tensor,
        text_evidence: torch.Tensor,
        text_pos: torch.Tensor,
        text_neg: torch.Tensor,
    ) -> torch.Tensor:
        """B x 2 x C logits of B x N x D ``features`` and three C x D prompt sets: ``dualcoop_head`` with this
        module's temperature and options."""
        return dualcoop_head(
            features,
            text_evidence,
            text_pos,
            text_neg,
            self.log_spatial_temp,
            wta=self.wta,
            wta_gamma=self.wta_gamma,
            logit_scale=self.logit_scale,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        """The options the module's ``repr`` shows: WTA mode and sharpness, logit scale, backend, and whether
        the temperature is frozen."""
        return (
            f"wta={self.wta!r}, wta_gamma={self.wta_gamma}, logit_scale={self.logit_scale:.4f}, "
            f"backend={self.backend!r}, freeze_temperature={not self.log_spatial_temp.requires_grad}"
        )
