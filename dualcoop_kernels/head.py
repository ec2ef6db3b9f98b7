"""The DualCoOp++ head: public function, module, and backend selection."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import nn

from ._backends import BackendRegistry
from ._checks import check_choice, check_head_inputs, finite_number
from .reference import DEFAULT_LOGIT_SCALE, DEFAULT_WTA_GAMMA, WTA_MODES, dualcoop_head_reference


def _triton_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton needs a CUDA device (or TRITON_INTERPRET=1 for its CPU interpreter)"
    return None


def _triton_head(*args, **kwargs):
    from .head_triton import dualcoop_head_triton  # imports triton only when first used

    return dualcoop_head_triton(*args, **kwargs)


def wta_sharpness(wta_gamma) -> float:
    """gamma >= 0: WTA favours the best class of each region; a negative gamma would favour the worst
    and overflow the kernels' exponents, which assume max u comes from max s+ or min s+."""
    value = finite_number("wta_gamma", wta_gamma)
    if value < 0:
        raise ValueError(f"wta_gamma must be >= 0 (0 turns the winner-take-all weights uniform), got {value}")
    return value


def positive_scale(logit_scale) -> float:
    """k > 0: it scales cosine similarities into logits; 0 would make every logit 0, and a negative k
    would swap presence and absence."""
    value = finite_number("logit_scale", logit_scale)
    if value <= 0:
        raise ValueError(f"logit_scale must be > 0 (e^3 in DualCoOp++, 100 in DualCoOp), got {value}")
    return value


HEAD_BACKENDS = BackendRegistry("dualcoop_head")
# the interpreter runs Triton on the CPU too, but slowly: "auto" keeps it for CUDA tensors
HEAD_BACKENDS.register("triton", _triton_head, _triton_unavailable, use_in_auto=lambda device: device.type == "cuda")
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
        wta: winner-take-all across classes per region: ``"pos_norm"`` (COCO setting,
            ``exp(u - max u)``), ``"pos200"`` (VOC and NUS-WIDE, ``1 + softmax(u)``) or ``"none"``.
        wta_gamma: WTA sharpness gamma >= 0 in ``u = gamma * max_m(s+) * s+``: a number, or a
            one-element tensor that does not require grad.
        logit_scale: k, the constant scale of the logits (e^3 in DualCoOp++); a number or a tensor
            as ``wta_gamma``.
        backend: ``"auto"`` (the fused Triton kernels for CUDA tensors, the reference elsewhere),
            ``"triton"`` (also on the CPU under ``TRITON_INTERPRET=1``, slowly) or ``"reference"``
            (eager PyTorch); see ``available_backends("dualcoop_head")``.

    Returns:
        B x 2 x C logits in the dtype of ``features``: ``[:, 0]`` is P- (evidence of absence) and
        ``[:, 1]`` is P+ (evidence of presence); ``sigmoid(P+ - P-)`` is the class probability.
    """
    log_spatial_temp = check_head_inputs(features, text_evidence, text_pos, text_neg, log_spatial_temp, wta)
    wta_gamma = wta_sharpness(wta_gamma)
    logit_scale = positive_scale(logit_scale)
    implementation = HEAD_BACKENDS.resolve(backend, features.device).function
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

    ``forward(features, text_evidence, text_pos, text_neg)`` takes B x N x D regions and three C x D
    prompt sets and returns B x 2 x C logits (``[:, 0]`` negative, ``[:, 1]`` positive).
    """

    def __init__(
        self,
        wta: str = "pos_norm",
        wta_gamma: float = DEFAULT_WTA_GAMMA,
        logit_scale: float = DEFAULT_LOGIT_SCALE,
        spatial_temp_init: float = 3.0,
        backend: str = "auto",
    ):
        super().__init__()
        check_choice("wta", wta, WTA_MODES)
        HEAD_BACKENDS.check_known(backend)
        self.wta = wta
        self.wta_gamma = wta_sharpness(wta_gamma)
        self.logit_scale = positive_scale(logit_scale)
        self.backend = backend
        self.log_spatial_temp = nn.Parameter(torch.tensor(finite_number("spatial_temp_init", spatial_temp_init)))

    def forward(
        self,
        features: torch.Tensor,
        text_evidence: torch.Tensor,
        text_pos: torch.Tensor,
        text_neg: torch.Tensor,
    ) -> torch.Tensor:
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
        return (
            f"wta={self.wta!r}, wta_gamma={self.wta_gamma}, logit_scale={self.logit_scale:.4f}, "
            f"backend={self.backend!r}"
        )
