import math

import pytest
import torch

from tabp_vllm.scoring import statistics as st
from tabp_vllm.scoring.tabp import aggregate, ddf, shifts, ssn


def lp(*probs):
    return torch.log(torch.tensor([list(probs)], dtype=torch.float64))


def test_entropy_hand_values():
    assert st.entropy(lp(0.5, 0.5)).item() == pytest.approx(math.log(2))
    assert st.entropy(lp(1.0, 0.0)).item() == pytest.approx(0.0)  # 0 log 0 = 0, no NaN
    assert st.entropy(lp(0.25, 0.25, 0.25, 0.25)).item() == pytest.approx(math.log(4))


def test_top1_gap_gold():
    x = lp(0.6, 0.3, 0.1)
    assert st.top1(x).item() == pytest.approx(0.6)
    assert st.gap(x).item() == pytest.approx(0.3)
    assert st.gold(x, gold=torch.tensor([2])).item() == pytest.approx(0.1)


def test_divergences_hand_values():
    q = lp(0.5, 0.5)  # layer
    p = lp(0.9, 0.1)  # final (reference)
    kl = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert st.kl(q, ref=p).item() == pytest.approx(kl)
    assert st.ce(q, ref=p).item() == pytest.approx(math.log(2))
    # the mixture m = (0.7, 0.3)
    js = 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)) + \
        0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3))
    assert st.js(q, ref=p).item() == pytest.approx(js)
    assert st.kl(p, ref=p).item() == pytest.approx(0.0, abs=1e-12)


def test_masked_option_is_ignored():
    # a 2-choice item padded to 3 options: -inf logit must not produce NaN
    logp = torch.log_softmax(torch.tensor([[0.0, 0.0, float("-inf")]]), -1)
    assert st.entropy(logp).item() == pytest.approx(math.log(2))
    assert not torch.isnan(st.kl(logp, ref=logp)).any()


def test_ddf_in_unit_interval_and_counts_direction():
    torch.manual_seed(0)
    stats = torch.randn(50, 11)
    d = shifts(stats)
    v = ddf(d, -1)
    assert ((v >= 0) & (v <= 1)).all()
    d2 = torch.tensor([[-1.0, 2.0], [-0.5, -1.0], [0.3, 3.0]])
    assert ddf(d2, -1).tolist() == pytest.approx([2 / 3, 1 / 3])
    assert ddf(d2, +1).tolist() == pytest.approx([1 / 3, 2 / 3])


def test_ssn_p1_is_mean_abs_shift_and_p2():
    d = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])
    assert ssn(d, 1).tolist() == pytest.approx([2.0, 3.0])
    assert ssn(d, 2).tolist() == pytest.approx([math.sqrt(5), math.sqrt(10)])
    assert aggregate(d, "ssn", -1, 1).tolist() == pytest.approx([2.0, 3.0])


def test_shifts():
    s = torch.tensor([[1.0, 3.0, 2.0]])
    assert shifts(s).tolist() == [[2.0, -1.0]]
