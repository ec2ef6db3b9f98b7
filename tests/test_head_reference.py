"""The reference head against docs/math.md: gradients by float64 gradcheck, values by independent forms."""

import math

import pytest
import torch
import torch.nn.functional as F

from utils import head_inputs

from dualcoop_kernels import DualCoOpHead, dualcoop_head
from dualcoop_kernels.options import DEFAULT_LOGIT_SCALE, WTA_ALIASES, WTA_MODES, WTA_TRAINING_ALIASES
from dualcoop_kernels.reference import dualcoop_head_reference, wta_weights
from dualcoop_kernels.reference.head import dualcoop_head_backward_reference


@pytest.mark.parametrize("wta", WTA_MODES)
@pytest.mark.parametrize("gamma", [200.0, 5.0])  # 5 keeps the WTA terms large in the gradient
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 9, 3, 11)])
def test_gradcheck_every_input(wta, gamma, shape):
    inputs = head_inputs(*shape)

    def head(*args):
        return dualcoop_head(*args, wta=wta, wta_gamma=gamma, backend="reference")

    assert torch.autograd.gradcheck(head, inputs)


@pytest.mark.parametrize("wta", WTA_MODES)
def test_the_written_out_backward_equals_autograd(wta):
    """docs/math.md's Backward written out (what the accuracy rule's conditions take by magnitude)
    against autograd of the reference; by magnitude, every result bounds its value."""
    inputs = head_inputs(2, 9, 7, 11)
    grad_output = torch.randn(2, 2, 11, dtype=torch.float64)
    options = dict(wta=wta, wta_gamma=5.0, logit_scale=7.5)
    out = dualcoop_head_reference(*inputs, **options)
    expected = [out, *torch.autograd.grad(out, inputs, grad_output)]
    ours = dualcoop_head_backward_reference(*inputs, grad_output, **options)
    magnitudes = dualcoop_head_backward_reference(*inputs, grad_output, **options, absolute=True)
    assert len(ours) == len(magnitudes) == len(expected)
    for got, truth in zip(ours, expected):
        torch.testing.assert_close(got, truth, rtol=1e-10, atol=1e-12)
    for magnitude, truth in zip(magnitudes, expected):
        assert torch.all(magnitude >= truth.abs() * (1 - 1e-12))


def loop_head(features, t_evidence, t_pos, t_neg, log_temp, wta, gamma, scale):
    """The forward of docs/math.md written element by element, with nothing shared with the reference."""
    B, N, _ = features.shape
    C = t_pos.shape[0]
    out = torch.zeros(B, 2, C, dtype=features.dtype)
    tau = math.exp(log_temp)

    def unit(v):
        return v / v.norm()

    for b in range(B):
        f = [unit(features[b, i]) for i in range(N)]
        s = {
            key: [[float(f[i] @ unit(t[m])) for m in range(C)] for i in range(N)]
            for key, t in (("e", t_evidence), ("p", t_pos), ("n", t_neg))
        }
        weights = [loop_wta_weights(s["p"][i], wta, gamma) for i in range(N)]  # (positive, negative) per region
        for m in range(C):
            logits = [tau * s["e"][i][m] for i in range(N)]
            denominator = sum(math.exp(x - max(logits)) for x in logits)
            a = [math.exp(x - max(logits)) / denominator for x in logits]
            out[b, 1, m] = scale * sum(a[i] * s["p"][i][m] * weights[i][0][m] for i in range(N))
            out[b, 0, m] = scale * sum(a[i] * s["n"][i][m] * weights[i][1][m] for i in range(N))
    return out


def loop_wta_weights(s_pos, wta, gamma):
    """One region's weights of the positive and the negative logits (lists over classes), docs/math.md."""
    u = [gamma * max(s_pos) * x for x in s_pos]
    u_neg = [gamma * min(s_pos) * x for x in s_pos]

    def softmax(values):
        total = sum(math.exp(x - max(values)) for x in values)
        return [math.exp(x - max(values)) / total for x in values]

    ones = [1.0] * len(s_pos)
    return {
        "pos_norm": ([math.exp(x - max(u)) for x in u], ones),
        "pos_softmax": ([1 + x for x in softmax(u)], ones),
        "pos_pure_softmax": (softmax(u), ones),
        "pos_neg_softmax": ([1 + x for x in softmax(u)], [1 + x for x in softmax(u_neg)]),
        "pos_neg_pure_softmax": (softmax(u), softmax(u_neg)),
        "none": (ones, ones),
    }[wta]


@pytest.mark.parametrize("wta", WTA_MODES)
def test_forward_matches_elementwise_spec(wta):
    features, te, tp, tn, log_temp = head_inputs(2, 4, 5, 6, requires_grad=False)
    expected = loop_head(features, te, tp, tn, log_temp.item(), wta, 30.0, 7.5)
    got = dualcoop_head_reference(features, te, tp, tn, log_temp, wta=wta, wta_gamma=30.0, logit_scale=7.5)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_pos_norm_weight_is_normalised_softmax():
    """The authors write softmax(u) / max softmax(u); the reference uses exp(u - max u)."""
    sim = torch.rand(3, 7, 13, dtype=torch.float64) * 2 - 1
    u = 200.0 * sim.max(dim=-1, keepdim=True).values * sim
    u_neg = 200.0 * sim.min(dim=-1, keepdim=True).values * sim
    soft, soft_neg = torch.softmax(u, dim=-1), torch.softmax(u_neg, dim=-1)
    pos_norm, unweighted = wta_weights(sim, "pos_norm", 200.0)
    torch.testing.assert_close(pos_norm, soft / soft.max(dim=-1, keepdim=True).values)
    assert unweighted is None
    torch.testing.assert_close(wta_weights(sim, "pos_softmax", 200.0)[0], 1 + soft)
    torch.testing.assert_close(wta_weights(sim, "pos_pure_softmax", 200.0)[0], soft)
    for got, expected in zip(wta_weights(sim, "pos_neg_softmax", 200.0), (1 + soft, 1 + soft_neg)):
        torch.testing.assert_close(got, expected)
    for got, expected in zip(wta_weights(sim, "pos_neg_pure_softmax", 200.0), (soft, soft_neg)):
        torch.testing.assert_close(got, expected)
    assert wta_weights(sim, "none", 200.0) == (None, None)


def test_original_dualcoop_is_special_case():
    """Evidence = positive prompt, tau = 20, k = 100, no WTA: P = 100 * sum_i softmax_i(20 s+) s."""
    features, _, tp, tn, _ = head_inputs(3, 11, 8, 5, requires_grad=False)
    got = dualcoop_head(features, tp, tp, tn, math.log(20.0), wta="none", logit_scale=100.0)
    f = F.normalize(features, dim=-1)
    s_pos, s_neg = f @ F.normalize(tp, dim=-1).T, f @ F.normalize(tn, dim=-1).T
    a = torch.softmax(20.0 * s_pos, dim=1)
    expected = torch.stack([100 * (a * s_neg).sum(1), 100 * (a * s_pos).sum(1)], dim=1)
    torch.testing.assert_close(got, expected)


def test_gradient_reaches_one_argmax_element():
    """Both maxima, and the minimum, pass gradient to a single class per region (docs/math.md, Backward)."""
    sim = torch.tensor([[[0.5, 0.5, 0.1]]], dtype=torch.float64, requires_grad=True)
    wta_weights(sim, "pos_norm", 3.0)[0].sum().backward()
    # w = exp(u - max u) with u = 3 * max(s) * s: a tie gets its gradient at one index only
    assert (sim.grad[0, 0, :2] != sim.grad[0, 0, :2].flip(0)).any()
    sim = torch.tensor([[[0.5, 0.1, 0.1]]], dtype=torch.float64, requires_grad=True)
    (wta_weights(sim, "pos_neg_softmax", 3.0)[1] * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert sim.grad[0, 0, 1] != sim.grad[0, 0, 2]  # u- = 3 * min(s) * s: the tied minimum's gradient at one


# The authors' forward, transcribed: CustomCLIP.forward of trainers/Caption_tri_wta_soft.py in
# github.com/kjmillerCURIS/dualcoopstarstar (regions first, HW x B x D), from the normalised features to
# logits_ (their global-feature logits_g are left out). Their 200 is wta_gamma here, e^3 (their
# temperature_pos and temperature_neg start at 3) logit_scale.
def authors_head(features, t_evidence, t_pos, t_neg, spatial_T, mode, wta_gamma=200.0, logit_scale=DEFAULT_LOGIT_SCALE):
    image_features = features.transpose(0, 1)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = t_evidence / t_evidence.norm(dim=-1, keepdim=True)
    text_features_pos = t_pos / t_pos.norm(dim=-1, keepdim=True)
    text_features_neg = t_neg / t_neg.norm(dim=-1, keepdim=True)
    logits = image_features @ text_features.t()
    logits_pos = logit_scale * image_features @ text_features_pos.t()
    logits_neg = logit_scale * image_features @ text_features_neg.t()
    map_pos = image_features @ text_features_pos.t()
    if mode == "pos200":
        w_pos = 1 + (map_pos * wta_gamma * map_pos.max(dim=2, keepdim=True)[0]).softmax(dim=2)
        logits_pos *= w_pos
    elif mode == "pos_test":
        w_pos = (map_pos * wta_gamma * map_pos.max(dim=2, keepdim=True)[0]).softmax(dim=2)
        logits_pos *= w_pos
    elif mode in ("pos_norm", "pos_norm_det"):
        w_pos = (map_pos * wta_gamma * map_pos.max(dim=2, keepdim=True)[0]).softmax(dim=2)
        w_pos = w_pos / w_pos.max(dim=2, keepdim=True)[0]
        logits_pos *= w_pos
        if mode == "pos_norm_det":
            spatial_T = torch.tensor(3.0, dtype=features.dtype)
    elif mode == "pos_neg":
        w_pos = 1 + (map_pos * wta_gamma * map_pos.max(dim=2, keepdim=True)[0]).softmax(dim=2)
        logits_pos *= w_pos
        w_neg = 1 + (map_pos * wta_gamma * map_pos.min(dim=2, keepdim=True)[0]).softmax(dim=2)
        logits_neg *= w_neg
    elif mode == "pos_neg_test":
        w_pos = (map_pos * wta_gamma * map_pos.max(dim=2, keepdim=True)[0]).softmax(dim=2)
        logits_pos *= w_pos
        w_neg = (map_pos * wta_gamma * map_pos.min(dim=2, keepdim=True)[0]).softmax(dim=2)
        logits_neg *= w_neg
    else:
        raise ValueError
    prob_ = torch.nn.functional.softmax(logits * spatial_T.exp(), dim=0)
    logits_pos = torch.sum(logits_pos * prob_, dim=0)
    logits_neg = torch.sum(logits_neg * prob_, dim=0)
    return torch.cat([torch.unsqueeze(logits_neg, 1), torch.unsqueeze(logits_pos, 1)], dim=1)


# The authors' modes by their names, as the package spells them: (wta, a frozen temperature)
AUTHORS_MODES = {
    "pos200": ("pos_softmax", False),
    "pos_test": ("pos_pure_softmax", False),
    "pos_norm": ("pos_norm", False),
    "pos_norm_det": ("pos_norm", True),
    "pos_neg": ("pos_neg_softmax", False),
    "pos_neg_test": ("pos_neg_pure_softmax", False),
}


def test_every_authors_mode_is_spelled_here():
    assert set(AUTHORS_MODES) == set(WTA_ALIASES) | set(WTA_TRAINING_ALIASES) | {"pos_norm"}
    assert {wta for wta, _ in AUTHORS_MODES.values()} == set(WTA_MODES) - {"none"}
    for name, (wta, frozen) in AUTHORS_MODES.items():
        if name in WTA_TRAINING_ALIASES:
            assert WTA_TRAINING_ALIASES[name] == dict(wta=wta, freeze_temperature=frozen)
        else:
            assert WTA_ALIASES.get(name, name) == wta and not frozen


@pytest.mark.parametrize("gamma", [200.0, 5.0])
@pytest.mark.parametrize("mode", AUTHORS_MODES)
def test_the_authors_modes_forward_and_backward(mode, gamma):
    """The reference against the transcription of the authors' branches, float64: logits and the
    gradients of every input (none to a frozen temperature), through the public names."""
    wta, frozen = AUTHORS_MODES[mode]
    features, te, tp, tn, _ = head_inputs(2, 9, 7, 11)
    grad_output = torch.randn(2, 2, 11, dtype=torch.float64)
    head = DualCoOpHead(**WTA_TRAINING_ALIASES.get(mode, dict(wta=mode)), wta_gamma=gamma, backend="reference")
    head = head.double()
    assert head.wta == wta and head.log_spatial_temp.requires_grad is not frozen
    theirs_temp = head.log_spatial_temp.detach().clone().requires_grad_()
    texts = [te, tp, tn]
    ours = head(features, *texts)
    theirs = authors_head(features, *texts, theirs_temp, mode, wta_gamma=gamma)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    expected = torch.autograd.grad(theirs, [features, *texts, theirs_temp], grad_output, allow_unused=True)
    if frozen:
        assert expected[-1] is None  # their pos_norm_det replaces the learned temperature by 3.0
        expected = expected[:-1]
    learned = [features, *texts] + ([] if frozen else [head.log_spatial_temp])
    grads = torch.autograd.grad(ours, learned, grad_output)
    assert len(grads) == len(expected)
    for got, truth in zip(grads, expected):
        torch.testing.assert_close(got, truth, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_upcast_computes_in_float32(dtype):
    inputs = head_inputs(2, 9, 16, 5, dtype=torch.float32, requires_grad=False)
    low = [t.to(dtype) for t in inputs[:4]] + [inputs[4]]
    got = dualcoop_head_reference(*low, upcast=True)
    expected = dualcoop_head_reference(*[t.float() for t in low]).to(dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
