"""Argument checks shared by the public entry points.

Every failure is a ``ValueError`` or ``TypeError`` that names the argument and what was expected, so
that nothing reaches a kernel with a shape or dtype it cannot handle. Checks that read tensor values
(finiteness, label values) are skipped while ``torch.compile`` traces, where they would break the graph,
and on the meta device, where there are no values.
"""

from __future__ import annotations

import collections
import math
import numbers

import torch

from .errors import UsageError, UsageTypeError
from .options import REDUCTIONS, WTA_ALIASES, WTA_MODES, WTA_TRAINING_ALIASES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def has_values(*tensors: torch.Tensor) -> bool:
    """Whether checks may read the values of these tensors (see the module doc)."""
    return not torch.compiler.is_compiling() and all(t.device.type != "meta" for t in tensors)


def check_tensor(name: str, value, rank: int, shape_doc: str) -> torch.Tensor:
    """``value`` must be a tensor of the given rank; ``shape_doc`` spells the expected shape."""
    if not isinstance(value, torch.Tensor):
        raise UsageTypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(value).__name__}")
    if value.dim() != rank:
        raise UsageError(f"{name} must have shape {shape_doc} ({rank}-d), got {tuple(value.shape)}")
    return value


def check_float(name: str, value: torch.Tensor) -> None:
    if value.dtype not in FLOAT_DTYPES:
        raise UsageTypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {value.dtype}"
        )


def check_same_device(named: dict[str, torch.Tensor]) -> None:
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise UsageError(f"all tensors must be on one device, got {listing}")


def check_same_dtype(named: dict[str, torch.Tensor]) -> None:
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{name} is {dtype}" for name, dtype in dtypes.items())
        raise UsageTypeError(f"these tensors must share one dtype, got {listing}")


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise UsageError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def wta_mode(wta) -> str:
    """The WTA mode by its name, or by an alias (the authors' names: ``pos200`` for ``pos_softmax``, ...).
    The authors' ``pos_norm_det`` also freezes the temperature, which the head's caller owns: refused
    here with what to pass instead."""
    if isinstance(wta, str) and wta in WTA_TRAINING_ALIASES:
        meaning = ", ".join(f"{key}={value!r}" for key, value in WTA_TRAINING_ALIASES[wta].items())
        raise UsageError(
            f"wta {wta!r} (the authors' name) is {meaning}: pass those to DualCoOpHead or DualCoOpPlusPlus "
            "(or a log_spatial_temp that does not require grad to dualcoop_head)"
        )
    wta = WTA_ALIASES.get(wta, wta) if isinstance(wta, str) else wta
    check_choice("wta", wta, WTA_MODES)
    return wta


def wta_sharpness(wta_gamma) -> float:
    """gamma >= 0: WTA favours the best class of each region; a negative gamma would favour the worst
    and overflow the kernels' exponents, which assume max u comes from max s+ or min s+."""
    value = finite_number("wta_gamma", wta_gamma)
    if value < 0:
        raise UsageError(f"wta_gamma must be >= 0 (0 turns the winner-take-all weights uniform), got {value}")
    return value


def positive_scale(logit_scale) -> float:
    """k > 0: it scales cosine similarities into logits; 0 would make every logit 0, and a negative k
    would swap presence and absence."""
    value = finite_number("logit_scale", logit_scale)
    if value <= 0:
        raise UsageError(f"logit_scale must be > 0 (e^3 in DualCoOp++, 100 in DualCoOp), got {value}")
    return value


def check_head_inputs(features, text_evidence, text_pos, text_neg, log_spatial_temp):
    """Validate the head's inputs; returns ``log_spatial_temp`` as a 0-d tensor.

    ``log_spatial_temp`` may be a one-element tensor of any floating dtype, or a Python number
    (a fixed temperature, as in the original DualCoOp), which becomes a constant tensor.
    """
    check_tensor("features", features, 3, "B x N x D")
    check_float("features", features)
    _, regions, width = features.shape
    if regions == 0 or width == 0:
        raise UsageError(f"features must have N >= 1 regions and D >= 1 channels, got {tuple(features.shape)}")
    texts = {"text_evidence": text_evidence, "text_pos": text_pos, "text_neg": text_neg}
    for name, text in texts.items():
        check_tensor(name, text, 2, f"C x D with D = {width}")
        check_float(name, text)
        if text.shape[1] != width:
            raise UsageError(f"{name} must have shape C x {width} (D of features), got {tuple(text.shape)}")
    classes = {name: t.shape[0] for name, t in texts.items()}
    if len(set(classes.values())) > 1:
        raise UsageError(f"text_evidence, text_pos and text_neg must have the same C, got {classes}")
    if text_pos.shape[0] == 0:
        raise UsageError("text_evidence, text_pos and text_neg must have C >= 1 classes, got C = 0")
    check_same_dtype({"features": features, **texts})

    if isinstance(log_spatial_temp, (int, float)) and not isinstance(log_spatial_temp, bool):
        dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        log_spatial_temp = torch.tensor(float(log_spatial_temp), dtype=dtype, device=features.device)
    if not isinstance(log_spatial_temp, torch.Tensor):
        raise UsageTypeError(
            f"log_spatial_temp must be a 0-d floating tensor or a number, got {type(log_spatial_temp).__name__}"
        )
    if log_spatial_temp.numel() != 1:
        raise UsageError(f"log_spatial_temp must be a scalar (0-d tensor), got shape {tuple(log_spatial_temp.shape)}")
    check_float("log_spatial_temp", log_spatial_temp)
    check_same_device({"features": features, **texts, "log_spatial_temp": log_spatial_temp})
    # on a GPU, reading it would stall the stream every call: a non-finite one gives NaN logits there
    on_host = log_spatial_temp.device.type == "cpu"
    if on_host and has_values(log_spatial_temp) and not bool(torch.isfinite(log_spatial_temp).all()):
        raise UsageError(f"log_spatial_temp must be finite, got {log_spatial_temp.item()}")
    return log_spatial_temp.reshape(())


def check_asl_options(gamma_neg, gamma_pos, clip, eps, reduction: str) -> dict:
    """Validate the loss's options; returns the numbers as floats, by name."""
    check_choice("reduction", reduction, REDUCTIONS)
    given = dict(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps)
    values = {name: finite_number(name, value) for name, value in given.items()}
    for name in ("gamma_neg", "gamma_pos"):
        if values[name] < 0:
            raise UsageError(f"{name} must be >= 0, got {values[name]}")
    # clip shifts a probability: above 1 it would zero every negative's loss, below 0 make it negative
    if not 0 <= values["clip"] <= 1:
        raise UsageError(f"clip must be in [0, 1] (a probability shift; 0 disables it), got {values['clip']}")
    # eps floors a probability inside a log: 0 lets the loss reach infinity, 1 zeroes it
    if not 0 < values["eps"] < 1:
        raise UsageError(f"eps must be in (0, 1), got {values['eps']}")
    return values


def check_asl_inputs(logits, targets, mask):
    """Validate the loss's tensors; returns ``(targets, mask)``."""
    if not isinstance(logits, torch.Tensor):
        raise UsageTypeError(f"logits must be a torch.Tensor of shape B x C or B x 2 x C, got {type(logits).__name__}")
    if logits.dim() not in (2, 3):
        raise UsageError(
            f"logits must have shape B x C (sigmoid form) or B x 2 x C (two-way form), got {tuple(logits.shape)}"
        )
    check_float("logits", logits)
    if logits.dim() == 3 and logits.shape[1] != 2:
        raise UsageError(f"two-way logits must have shape B x 2 x C, got {tuple(logits.shape)}")
    label_shape = (logits.shape[0], logits.shape[-1])
    doc = f"B x C = {label_shape[0]} x {label_shape[1]}"
    check_tensor("targets", targets, 2, doc)
    if tuple(targets.shape) != label_shape:
        raise UsageError(f"targets must have shape {doc}, got {tuple(targets.shape)}")
    if targets.is_complex():
        raise UsageTypeError(f"targets must be real (bool, integer or floating), got {targets.dtype}")
    named = {"logits": logits, "targets": targets}
    if mask is not None:
        check_tensor("mask", mask, 2, doc)
        if tuple(mask.shape) != label_shape:
            raise UsageError(f"mask must have shape {doc}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise UsageTypeError(f"mask must be a bool tensor (True = known label), got {mask.dtype}")
        named["mask"] = mask
    check_same_device(named)
    if has_values(targets, *([] if mask is None else [mask])):
        valid = (targets == 0) | (targets == 1)
        if mask is not None:
            valid = valid | ~mask
        if not bool(valid.all()):
            raise UsageError("targets must be 0 or 1 at every known label (use mask for unknown ones)")
    return targets, mask


def finite_number(name: str, value) -> float:
    """A finite real number, given as a Python or NumPy number or a one-element tensor, as a float.
    A tensor that requires grad is refused: these are constants, and its gradient would be lost."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise UsageError(
                f"{name} must be a finite real number (or a one-element real tensor), got a {value.dtype} "
                f"tensor of shape {tuple(value.shape)}"
            )
        if value.requires_grad:
            raise UsageError(f"{name} is a constant and gets no gradient: pass a number or a detached tensor")
        if torch.compiler.is_compiling():
            raise UsageError(f"{name} must be a Python number inside torch.compile, which cannot read a tensor")
        if value.device.type == "meta":
            raise UsageError(f"{name} must be a number, got a meta tensor, which has no value")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UsageError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def check_classnames(classnames) -> list[str]:
    """A list (or tuple) of distinct, non-empty class names; returned as a list."""
    if isinstance(classnames, str) or not isinstance(classnames, (list, tuple)):
        raise UsageTypeError(
            f"classnames must be a list of class names (e.g. ['cat', 'dog']), got {type(classnames).__name__}"
            + (f" {classnames!r}" if isinstance(classnames, str) else "")
        )
    if not classnames:
        raise UsageError("classnames must name at least one class")
    bad = [name for name in classnames if not isinstance(name, str) or not name.strip()]
    if bad:
        raise UsageTypeError(f"every class name must be a non-empty string, got {bad[:5]}")
    repeated = sorted(name for name, count in collections.Counter(classnames).items() if count > 1)
    if repeated:
        raise UsageError(f"class names must be distinct, these repeat: {repeated[:5]}")
    return list(classnames)


def error_gist(error: Exception) -> str:
    """An error's type and first line, for a message of ours; torch's advice to unpickle a file with
    weights_only=False, which would run any code it holds, is not ours to give."""
    line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not line or "weights_only" in line or "Weights only" in line:
        return type(error).__name__
    return f"{type(error).__name__}: {line[:200]}"
