"""Baselines on a tiny random Llama (fast) with the demo tokenizer."""

import pytest

from tabp_vllm.data import Dataset, MCQAItem, TextItem
from tabp_vllm.scoring import get_method, run_scoring
from tabp_vllm.scoring.perplexity import calibration_nll
from tabp_vllm.scoring.probe import ScoreContext
from tiny_llama import tiny_llama


@pytest.fixture(scope="module")
def tiny(demo_model):
    return tiny_llama(demo_model)


def texts():
    return Dataset("t", "train", "text", [TextItem(f"The number {i} is followed by {i + 1}.") for i in range(6)])


def ctx_for(tiny, k=1, ds=None):
    model, tok = tiny
    return ScoreContext(model=model, tokenizer=tok, dataset=ds or texts(), k=k, candidates=list(range(6)),
                        mode="text", batch_size=4)


def test_block_influence_identity_block_is_zero(tiny):
    res = get_method("block_influence").score(ctx_for(tiny, k=1))
    assert res.scores[3] == pytest.approx(0.0, abs=1e-6)
    assert all(s > 1e-4 for i, s in enumerate(res.scores) if i != 3)
    assert res.removed == [3]


def test_sleb_k1_removes_lowest_perplexity_block(tiny):
    ctx = ctx_for(tiny, k=1)
    res = get_method("sleb-task").score(ctx)
    nll = {b: calibration_nll(ctx_for(tiny), {b}) for b in range(6)}
    assert res.removed == [min(nll, key=nll.get)]
    assert res.scores[res.removed[0]] == pytest.approx(min(nll.values()))
    # one calibration pass per candidate block
    assert ctx.forward_passes == 6 * len(texts())


def test_sleb_k2_counts_passes_and_is_iterative(tiny):
    ctx = ctx_for(tiny, k=2)
    res = get_method("sleb-task").score(ctx)
    assert len(res.removed) == 2
    assert ctx.forward_passes == (6 + 5) * len(texts())


def test_ppl_angular_random_lastk(tiny):
    r = get_method("ppl-task").score(ctx_for(tiny, k=2))
    assert len(r.removed) == 2 and all(r.scores[i] <= min(r.scores[j] for j in range(6) if j not in r.removed)
                                       for i in r.removed)
    a = get_method("angular").score(ctx_for(tiny, k=2))
    assert a.removed == [a.removed[0], a.removed[0] + 1]  # contiguous run
    assert a.scores[a.removed[0]] == min(s for s in a.scores if s is not None)
    # the last k before the final block (Gromov et al. keep it); the final block only when needed
    assert get_method("last_k").score(ctx_for(tiny, k=2)).removed == [3, 4]
    assert get_method("last_k").score(ctx_for(tiny, k=6)).removed == [0, 1, 2, 3, 4, 5]
    r1, r2 = get_method("random").score(ctx_for(tiny, k=2)), get_method("random").score(ctx_for(tiny, k=2))
    assert r1.removed == r2.removed  # seeded


def test_candidate_range_respected(tiny):
    ds = Dataset("m", "train", "mcqa", [MCQAItem("Is 2 > 1?", ["no", "yes"], 1)] * 3)
    for method in ("tabp", "block_influence", "ppl", "random", "last_k"):
        res = run_scoring("unused", ds, method, k=2, block_range="2:5", model_and_tokenizer=tiny)
        assert set(res.removed) <= {2, 3, 4}, method
        assert res.scores[0] is None and res.scores[5] is None


def test_tabp_one_forward_pass_per_sample_and_deterministic(tiny):
    ds = Dataset("m", "train", "mcqa", [MCQAItem(f"Q{i}?", ["a", "b", "c"], i % 3) for i in range(5)])
    r1 = run_scoring("unused", ds, "tabp", k=2, block_range="0:6", batch_size=2, model_and_tokenizer=tiny,
                     probe="letters")  # auto may add a pass (tests/test_tabp_probe.py)
    r2 = run_scoring("unused", ds, "tabp", k=2, block_range="0:6", batch_size=4, model_and_tokenizer=tiny,
                     probe="letters")
    assert r1.forward_passes == 5
    assert r1.removed == r2.removed
    assert r1.scores == pytest.approx(r2.scores, abs=1e-6)
    for stat in ("top1", "gold", "gap", "kl", "js", "ce"):
        for agg in ("ssn", "ddf"):
            r = run_scoring("unused", ds, "tabp", k=1, statistic=stat, aggregate=agg,
                            block_range="0:6", model_and_tokenizer=tiny)
            if agg == "ddf":
                assert all(0 <= s <= 1 for s in r.scores)


@pytest.mark.parametrize("method", ["tabp", "block_influence", "ppl", "random", "last_k", "sleb"])
def test_result_for_smaller_k_equals_its_own_run(tiny, method):
    from tabp_vllm.scoring import result_for_k

    ds = Dataset("m", "train", "mcqa", [MCQAItem(f"Is {i} > 1?", ["no", "yes"], int(i > 1)) for i in range(5)])
    big = run_scoring("unused", ds, method, k=4, block_range="0:6", model_and_tokenizer=tiny)
    small = run_scoring("unused", ds, method, k=2, block_range="0:6", model_and_tokenizer=tiny)
    derived = result_for_k(big, 2)
    assert derived.removed == small.removed
    assert derived.params["k"] == 2 and big.params["k"] == 4


def test_result_for_k_refuses_angular_and_larger_k(tiny):
    from tabp_vllm.errors import TabpError
    from tabp_vllm.scoring import result_for_k

    res = run_scoring("unused", texts(), "angular", k=2, block_range="0:6", model_and_tokenizer=tiny)
    with pytest.raises(TabpError, match="own scoring run"):
        result_for_k(res, 1)
    with pytest.raises(TabpError, match="larger"):
        result_for_k(res, 3)


@pytest.mark.parametrize("published,task", [("sleb", "sleb-task"), ("ppl", "ppl-task")])
def test_published_perplexity_baselines_calibrate_on_wikitext2(tiny, published, task):
    """As their papers do: generic text (WikiText-2; its test split is the one here), as many paragraphs as task samples,
    seeded; the task-aligned twin scores the task's own text."""
    from dataclasses import replace

    from tabp_vllm.data import load_task

    ctx = ctx_for(tiny, k=1)
    pub = get_method(published).score(ctx)
    assert ctx.forward_passes == 6 * len(texts())  # the same cost as on the task's text
    assert get_method(published).params(ctx)["calibration_text"] == "wikitext2 test"
    assert get_method(task).params(ctx)["calibration_text"] == "task"
    wiki = replace(ctx_for(tiny, k=1), dataset=load_task("wikitext2", "test").subset(len(texts()), 0))
    assert pub.scores == pytest.approx(get_method(task).score(wiki).scores)
    assert pub.scores != pytest.approx(get_method(task).score(ctx_for(tiny, k=1)).scores)
