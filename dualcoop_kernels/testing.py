"""Accuracy rules shared by the tests and the benchmarks.

In float64 a kernel matches the reference to ``FLOAT64_RTOL`` and ``FLOAT64_ATOL``. In a low
precision one draw of inputs says little: a result that is a small difference of large terms (the
head's dL/dtheta) comes out of eager PyTorch's own float32 arithmetic 100 times more or less exact
from one seed to the next (benchmarks/NOTES.md). So a kernel is held, over several draws (seeds) of
a case, to two rules, :func:`accuracy_failures`:

- **typical error**: its median error (the largest absolute deviation from float64) is at most twice
  the eager reference's median error in the same precision, plus ``EXTRA_ERROR`` of the result's
  scale (flash-attention's rule, over draws);
- **every error within the condition**: element by element,
  ``|got - exact| <= CONDITION_FACTOR * u * condition + ulp_out(exact)``, where ``condition`` is the
  first-order bound of the rounding error a result can carry in units of the roundoff u of the
  compute precision (float32 for fp16, bf16 and fp32 inputs; :func:`head_conditions` for the head),
  and ulp_out the spacing of the result's own dtype there (a bf16 gradient is rounded once at the
  end: a whole unit, since Triton's interpreter rounds float32 to bf16 toward zero).

A kernel that drops or misplaces a term, or computes in a lower precision, fails the second rule on
every draw; one that is merely unlucky on a draw fails neither. The loss's tests keep the rule on one
draw, :func:`within_twice_reference_error`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from .options import DEFAULT_LOGIT_SCALE, WTA_WEIGHTS
from .reference.head import dualcoop_head_backward_reference, dualcoop_head_reference

# Draws of a case that the low-precision rules are taken over. Eager fp16 and bf16 compute in their own
# precision, an order of magnitude less exact than the kernels: their median rule needs fewer draws.
DRAWS = {torch.float32: 5, torch.float16: 3, torch.bfloat16: 3}
# Error allowed beyond twice the eager reference's, relative to the result's scale, per input dtype.
EXTRA_ERROR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
FLOAT64_RTOL, FLOAT64_ATOL = 1e-9, 1e-10
# How many roundoffs of the condition an error may reach: the condition leaves out the few roundoffs
# of a normalisation and of a dot product's length, which eager float32 reaches (up to 0.26 of this
# bound over 8 seeds of the tests' cases, the kernels 0.24: benchmarks/NOTES.md).
CONDITION_FACTOR = 4.0


def max_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest absolute difference, in float64; NaN when either holds a NaN."""
    return (got.double() - exact.double()).abs().max().item() if got.numel() else 0.0


def within_twice_reference_error(got, low_precision_reference, exact, extra: float) -> tuple[bool, float, float]:
    """Whether ``got`` meets the rule on one draw, with its error and the reference's. Where the eager
    reference breaks down (NaN: fp16 cannot hold some constants) any finite error passes; a NaN of
    ``got`` never does."""
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    ours, theirs = max_error(got, exact), max_error(low_precision_reference, exact)
    bound = (math.inf if math.isnan(theirs) else 2 * theirs) + extra * scale
    return ours <= bound, ours, theirs


def assert_within_twice_reference_error(got, low_precision_reference, exact, extra: float, what: str) -> None:
    passed, ours, theirs = within_twice_reference_error(got, low_precision_reference, exact, extra)
    assert passed, f"{what}: error {ours:.3g} > 2 x reference error {theirs:.3g} + {extra:.3g} of the scale"


@dataclass
class Draw:
    """One draw of one result: the kernel's, the eager reference's in the same precision, the float64
    one from the same (rounded) inputs, and the result's condition (same shape)."""

    got: torch.Tensor
    eager: torch.Tensor
    exact: torch.Tensor
    condition: torch.Tensor


def condition_bound(draw: Draw) -> torch.Tensor:
    """The error each element of ``draw.got`` may have by the second rule (module doc)."""
    compute = torch.float64 if draw.got.dtype == torch.float64 else torch.float32
    roundoff = torch.finfo(compute).eps / 2
    output = torch.finfo(draw.got.dtype)
    spacing = output.eps * draw.exact.double().abs().clamp_min(output.tiny)  # below it, the subnormals' spacing
    return CONDITION_FACTOR * roundoff * draw.condition.double() + spacing


def condition_ratio(draw: Draw, of: str = "got") -> float:
    """Largest error of ``draw.got`` (or ``draw.eager``) in units of its condition bound: at most 1 passes."""
    error = (getattr(draw, of).double() - draw.exact.double()).abs()
    return (error / condition_bound(draw)).nan_to_num(nan=math.inf).max().item() if error.numel() else 0.0


def accuracy_failures(draws: list[Draw], dtype: torch.dtype, what: str) -> list[str]:
    """The two rules of the module doc over the draws of one result; an empty list when both hold."""
    failures = []
    ours = statistics.median(max_error(d.got, d.exact) for d in draws)
    theirs = statistics.median(max_error(d.eager, d.exact) for d in draws)
    scale = max([1.0, *(d.exact.abs().max().item() for d in draws if d.exact.numel())])
    allowed = (math.inf if math.isnan(theirs) else 2 * theirs) + EXTRA_ERROR[dtype] * scale
    if not ours <= allowed:
        failures.append(f"{what}: median error {ours:.3g} > 2 x eager's median {theirs:.3g} + {EXTRA_ERROR[dtype]:.3g}")
    for seed, draw in enumerate(draws):
        ratio = condition_ratio(draw)
        if not ratio <= 1.0:
            failures.append(f"{what}: draw {seed}'s error is {ratio:.3g} times its condition bound")
    return failures


def head_conditions(
    features, text_evidence, text_pos, text_neg, log_spatial_temp, grad_output, *, wta, wta_gamma, logit_scale
) -> list[torch.Tensor]:
    """The condition of each result of the head (logits, then the gradients to features, the three
    prompt sets and log_spatial_temp), from the exact inputs in float64: the magnitudes of the terms
    its sums add (``dualcoop_head_backward_reference(absolute=True)``), times how much the exponents
    amplify a rounding of the similarities they read: ``1 + tau max|s^e| + 2 gamma max|s+|`` (the
    region softmax, and WTA's ``gamma c s+``; docs/math.md, Numerics)."""
    inputs = [t.detach().double() for t in (features, text_evidence, text_pos, text_neg, log_spatial_temp)]
    magnitudes = dualcoop_head_backward_reference(
        *inputs, grad_output.double(), wta=wta, wta_gamma=wta_gamma, logit_scale=logit_scale, absolute=True
    )
    regions = torch.nn.functional.normalize(inputs[0], dim=-1).abs()
    largest = [(regions @ torch.nn.functional.normalize(t, dim=-1).abs().T).max().item() for t in inputs[1:3]]
    weighted = WTA_WEIGHTS[wta] != ("one", "one")
    amplification = 1 + math.exp(inputs[4].item()) * largest[0] + (2 * wta_gamma * largest[1] if weighted else 0)
    return [amplification * m for m in magnitudes]


def head_draw(head, inputs, grad_output, *, wta, wta_gamma, logit_scale=DEFAULT_LOGIT_SCALE, **options) -> list[Draw]:
    """One draw of the head's results: the logits and the gradients to those of ``inputs`` (features,
    the three prompt sets, log_spatial_temp, in a low precision) that require grad, for ``grad_output``
    (in the inputs' dtype), from ``head`` (with ``options``), from the eager reference in the same
    precision, and in float64 from the same values; with their conditions."""
    settings = dict(wta=wta, wta_gamma=wta_gamma, logit_scale=logit_scale)

    def results(function, tensors, grad, **extra):
        out = function(*tensors, **settings, **extra)
        return [out, *torch.autograd.grad(out, [t for t in tensors if t.requires_grad], grad.to(out.dtype))]

    exact_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    exact = results(dualcoop_head_reference, exact_inputs, grad_output.double())
    eager = results(dualcoop_head_reference, inputs, grad_output)
    got = results(head, inputs, grad_output, **options)
    conditions = head_conditions(*exact_inputs, grad_output, **settings)
    kept = [0] + [1 + i for i, t in enumerate(inputs) if t.requires_grad]
    assert len(got) == len(eager) == len(exact) == len(kept)  # no zip(strict=True): Python 3.9
    return [Draw(g, e, x, conditions[i]) for g, e, x, i in zip(got, eager, exact, kept)]


def assert_accurate(draws: list[list[Draw]], names: list[str], dtype: torch.dtype, what: str) -> None:
    """The rules over ``draws`` (one list of results per draw, named by ``names``), every failure listed."""
    assert all(len(draw) == len(names) for draw in draws)
    failures = [
        failure
        for name, column in zip(names, zip(*draws))
        for failure in accuracy_failures(list(column), dtype, f"{what} {name}")
    ]
    assert not failures, "\n".join(failures)
