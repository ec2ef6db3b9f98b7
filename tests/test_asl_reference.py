"""The reference asymmetric loss against docs/math.md: gradcheck, identities, partial labels, known values."""

import functools
import math

import pytest
import torch

from utils import asl_inputs

import dualcoop_kernels

# the public entry point (its checks included), pinned to the reference: "auto" may pick the extension
asymmetric_loss = functools.partial(dualcoop_kernels.asymmetric_loss, backend="reference")


@pytest.mark.parametrize("two_way", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("focal_grad, gammas", [(True, (2.0, 1.0)), (False, (0.0, 0.0))])
def test_gradcheck_with_unknown_labels(two_way, reduction, focal_grad, gammas):
    """gradcheck differentiates the focusing weight too, so a detached one is checked at gamma 0 here
    and against its closed form below."""
    logits, targets, mask = asl_inputs(4, 9, two_way)
    gamma_neg, gamma_pos = gammas

    def loss(z):
        return asymmetric_loss(
            z, targets, mask, gamma_neg=gamma_neg, gamma_pos=gamma_pos, focal_grad=focal_grad, reduction=reduction
        )

    assert torch.autograd.gradcheck(loss, (logits,))


def detached_focal_gradient(z, y, gamma_neg, gamma_pos, clip):
    """d(sum loss)/dz with the focusing weight held constant, from docs/math.md's formulas by hand."""
    p = torch.sigmoid(z)
    q = torch.clamp(1 - p + clip, max=1.0)
    focusing = torch.where(y == 1, (1 - p) ** gamma_pos, (1 - q) ** gamma_neg)
    d_log_p = 1 - p  # d log(p) / dz
    d_log_q = torch.where(1 - p + clip < 1, -p * (1 - p) / q, torch.zeros_like(p))  # q clipped at 1
    return -focusing * torch.where(y == 1, d_log_p, d_log_q)


@pytest.mark.parametrize("two_way", [False, True])
def test_detached_focusing_gradient_closed_form(two_way):
    logits, targets, mask = asl_inputs(5, 12, two_way)
    loss = asymmetric_loss(logits, targets, mask, gamma_neg=3.0, gamma_pos=1.5, clip=0.05)
    (grad,) = torch.autograd.grad(loss, logits)
    z = logits[:, 1] - logits[:, 0] if two_way else logits
    expected = torch.where(mask, detached_focal_gradient(z.detach(), targets, 3.0, 1.5, 0.05), 0.0)
    torch.testing.assert_close(grad[:, 1] if two_way else grad, expected)


@pytest.mark.parametrize("focal_grad", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_two_way_equals_sigmoid_form_on_difference(focal_grad, reduction):
    pair, targets, mask = asl_inputs(5, 7, two_way=True)
    difference = (pair[:, 1] - pair[:, 0]).detach().requires_grad_()
    options = dict(focal_grad=focal_grad, reduction=reduction)
    two_way = asymmetric_loss(pair, targets, mask, **options)
    sigmoid = asymmetric_loss(difference, targets, mask, **options)
    torch.testing.assert_close(two_way, sigmoid)
    grad = torch.randn_like(two_way)
    two_way.backward(grad)
    sigmoid.backward(grad)
    torch.testing.assert_close(pair.grad[:, 1], difference.grad)
    torch.testing.assert_close(pair.grad[:, 0], -difference.grad)


def test_known_values():
    """Hand-computed elements: a positive and a shifted negative at z = 0 (p = 0.5)."""
    logits = torch.zeros(1, 2, dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    got = asymmetric_loss(logits, targets, gamma_neg=4.0, gamma_pos=1.0, clip=0.05, reduction="none")
    positive = -math.log(0.5) * 0.5  # (1 - p)^1
    negative = -math.log(0.55) * 0.45**4  # q = 0.5 + 0.05, (1 - q)^4
    torch.testing.assert_close(got, torch.tensor([[positive, negative]], dtype=torch.float64))


def test_clip_zero_is_plain_asymmetric_focal_loss():
    z = torch.randn(3, 5, dtype=torch.float64)
    y = (torch.rand(3, 5) < 0.5).double()
    p = torch.sigmoid(z)
    expected = -(y * torch.log(p) * (1 - p) ** 1 + (1 - y) * torch.log(1 - p) * p**3)
    got = asymmetric_loss(z, y, gamma_pos=1.0, gamma_neg=3.0, clip=0.0, reduction="none")
    torch.testing.assert_close(got, expected)


def test_unknown_labels_add_nothing_and_get_zero_gradient():
    logits, targets, mask = asl_inputs(6, 11, two_way=True)
    per_label = asymmetric_loss(logits, targets, mask, reduction="none")
    assert per_label.shape == (6, 11)
    assert torch.all(per_label[~mask] == 0)
    asymmetric_loss(logits, targets, mask).backward()
    assert torch.all(logits.grad[:, 0][~mask] == 0) and torch.all(logits.grad[:, 1][~mask] == 0)
    assert torch.all(logits.grad[:, 1][mask & (targets == 1)] != 0)  # known negatives may sit under the clip
    # values at unknown positions are ignored, whatever they are
    scrambled = torch.where(mask, targets, torch.full_like(targets, 7.0))
    torch.testing.assert_close(asymmetric_loss(logits, scrambled, mask), per_label.sum())


def test_reductions_agree():
    logits, targets, mask = asl_inputs(4, 13, two_way=False)
    per_label = asymmetric_loss(logits, targets, mask, reduction="none")
    torch.testing.assert_close(asymmetric_loss(logits, targets, mask, reduction="sum"), per_label.sum())
    mean = asymmetric_loss(logits, targets, mask, reduction="mean")
    torch.testing.assert_close(mean, per_label.sum() / mask.sum())
    all_known = asymmetric_loss(logits, targets, reduction="mean")
    torch.testing.assert_close(all_known, asymmetric_loss(logits, targets, reduction="none").mean())


def test_all_unknown_gives_zero_loss_and_gradient():
    logits, targets, _ = asl_inputs(3, 4, two_way=True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for reduction in ("sum", "mean"):
        loss = asymmetric_loss(logits, targets, mask, reduction=reduction)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.all(logits.grad == 0)


def test_focal_grad_changes_gradient_not_value():
    logits, targets, mask = asl_inputs(4, 6, two_way=False)
    detached = asymmetric_loss(logits, targets, mask, focal_grad=False)
    (grad_detached,) = torch.autograd.grad(detached, logits)
    flowing = asymmetric_loss(logits, targets, mask, focal_grad=True)
    (grad_flowing,) = torch.autograd.grad(flowing, logits)
    torch.testing.assert_close(detached, flowing)
    assert not torch.allclose(grad_detached, grad_flowing)


@pytest.mark.parametrize("two_way", [False, True])
def test_extreme_logits_stay_finite(two_way):
    logits, targets, mask = asl_inputs(4, 8, two_way, dtype=torch.float32, scale=50.0)
    for focal_grad in (False, True):
        loss = asymmetric_loss(logits, targets, mask, focal_grad=focal_grad)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("two_way", [False, True])
@pytest.mark.parametrize("known", [True, False])
def test_non_finite_logit_gives_nan_loss_and_gradient(bad, two_way, known):
    """NaN in, NaN out: a diverging model must not train on with a finite loss (the sigmoid of an
    infinite logit saturates to a finite loss unless the loss says otherwise), known label or not."""
    logits, targets, mask = asl_inputs(3, 7, two_way)
    with torch.no_grad():
        logits[0, ..., 4].view(-1)[0] = bad  # P- in the two-way form
    mask[0, 4] = known
    for reduction in ("sum", "mean", "none"):
        loss = asymmetric_loss(logits, targets, mask, reduction=reduction)
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        assert torch.isnan(loss).any() and torch.isnan(grad).any(), reduction
    finite = torch.isfinite(logits).all(dim=1) if two_way else torch.isfinite(logits)
    per_label = asymmetric_loss(logits, targets, mask, reduction="none")
    assert torch.isfinite(per_label[finite]).all() and torch.isnan(per_label[~finite]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_public_loss_computes_low_precision_in_float32(dtype):
    """fp16 cannot hold eps = 1e-8: computed in fp16, large logits give NaN; the public function
    computes in float32 on every backend and casts the loss back."""
    logits, targets, mask = asl_inputs(4, 9, two_way=True, dtype=torch.float32, scale=30.0)
    low = logits.detach().to(dtype).requires_grad_()
    loss = asymmetric_loss(low, targets, mask)
    (grad,) = torch.autograd.grad(loss, low)
    expected = asymmetric_loss(low.detach().float(), targets, mask)
    assert loss.dtype == dtype and grad.dtype == dtype
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, expected.to(dtype), rtol=0, atol=0)
