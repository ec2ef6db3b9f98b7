"""The reference head against docs/math.md: gradients by float64 gradcheck, values by independent forms."""

import math

import pytest
import torch
import torch.nn.functional as F

from utils import head_inputs

from dualcoop_kernels import dualcoop_head
from dualcoop_kernels.options import WTA_MODES
from dualcoop_kernels.reference import dualcoop_head_reference, wta_weights


@pytest.mark.parametrize("wta", WTA_MODES)
@pytest.mark.parametrize("gamma", [200.0, 5.0])  # 5 keeps the WTA terms large in the gradient
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 9, 3, 11)])
def test_gradcheck_every_input(wta, gamma, shape):
    inputs = head_inputs(*shape)

    def head(*args):
        return dualcoop_head(*args, wta=wta, wta_gamma=gamma, backend="reference")

    assert torch.autograd.gradcheck(head, inputs)


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
        weights = []
        for i in range(N):
            best = max(s["p"][i])
            u = [gamma * best * s["p"][i][m] for m in range(C)]
            if wta == "pos_norm":
                weights.append([math.exp(x - max(u)) for x in u])
            elif wta == "pos_softmax":
                total = sum(math.exp(x - max(u)) for x in u)
                weights.append([1 + math.exp(x - max(u)) / total for x in u])
            else:
                weights.append([1.0] * C)
        for m in range(C):
            logits = [tau * s["e"][i][m] for i in range(N)]
            denominator = sum(math.exp(x - max(logits)) for x in logits)
            a = [math.exp(x - max(logits)) / denominator for x in logits]
            out[b, 1, m] = scale * sum(a[i] * s["p"][i][m] * weights[i][m] for i in range(N))
            out[b, 0, m] = scale * sum(a[i] * s["n"][i][m] for i in range(N))
    return out


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
    soft = torch.softmax(u, dim=-1)
    torch.testing.assert_close(wta_weights(sim, "pos_norm", 200.0), soft / soft.max(dim=-1, keepdim=True).values)
    torch.testing.assert_close(wta_weights(sim, "pos_softmax", 200.0), 1 + soft)
    assert torch.equal(wta_weights(sim, "none", 200.0), torch.ones_like(sim))


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
    """Both maxima pass gradient to a single arg-max class per region (docs/math.md, Backward)."""
    sim = torch.tensor([[[0.5, 0.5, 0.1]]], dtype=torch.float64, requires_grad=True)
    wta_weights(sim, "pos_norm", 3.0).sum().backward()
    # w = exp(u - max u) with u = 3 * max(s) * s: a tie gets its gradient at one index only
    assert (sim.grad[0, 0, :2] != sim.grad[0, 0, :2].flip(0)).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_upcast_computes_in_float32(dtype):
    inputs = head_inputs(2, 9, 16, 5, dtype=torch.float32, requires_grad=False)
    low = [t.to(dtype) for t in inputs[:4]] + [inputs[4]]
    got = dualcoop_head_reference(*low, upcast=True)
    expected = dualcoop_head_reference(*[t.float() for t in low]).to(dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
