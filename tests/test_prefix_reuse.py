"""SLEB and PPL with prefix reuse (tabp_vllm/scoring/prefix.py) give exactly the numbers of a full
pass per candidate (`calibration_nll`, the straightforward path), on tiny random Llama and Qwen2
models, at block and sublayer granularity, with k and with a FLOPs budget."""

from functools import partial

import pytest

from tabp_vllm.data import Dataset, TextItem
from tabp_vllm.scoring import perplexity, run_scoring
from tabp_vllm.scoring.perplexity import calibration_nll, removal_nlls
from tabp_vllm.scoring.probe import ScoreContext
from tiny_llama import tiny_llama, tiny_qwen2


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, demo_model):
    return (tiny_llama if request.param == "llama" else tiny_qwen2)(demo_model)


def texts() -> Dataset:
    # lengths differ, so the batches are left padded; 5 samples at batch 3: a short last batch
    return Dataset("t", "train", "text", [TextItem(" ".join(["The number", str(i), "is followed by"]
                                                            + [str(i + j) for j in range(1, 2 + i)]))
                                          for i in range(5)])


@pytest.mark.parametrize("granularity,removed", [("block", set()), ("block", {1, 4}),
                                                 ("sublayer", set()), ("sublayer", {2, 7, 8, 9})])
def test_removal_nlls_equal_a_full_pass_per_candidate(tiny, granularity, removed):
    model, tok = tiny
    units = [u for u in range(6 * (2 if granularity == "sublayer" else 1)) if u not in removed]
    ctx = ScoreContext(model=model, tokenizer=tok, dataset=texts(), k=1, candidates=units,
                       mode="text", batch_size=3, granularity=granularity)
    ref = {u: calibration_nll(ctx, removed | {u}) for u in units}  # a full pass per candidate
    passes = ctx.forward_passes
    ctx.forward_passes = 0
    got = removal_nlls(ctx, removed, units)
    assert got == ref  # to the bit: the same modules on the same tensors
    assert ctx.forward_passes == passes  # counted as a full pass per candidate, as published
    assert len(set(got.values())) > len(units) // 2  # the units do differ


@pytest.mark.parametrize("method,granularity,budget", [
    ("sleb-task", "block", {"k": 3}), ("sleb-task", "sublayer", {"flops_ratio": 0.02}),
    ("ppl-task", "block", {"flops_ratio": 0.04}), ("ppl-task", "sublayer", {"k": 3})])
def test_scores_and_removal_order_equal_the_straightforward_path(tiny, monkeypatch, method,
                                                                 granularity, budget):
    def run():
        ticks = {}

        def progress(desc, total):
            ticks[desc] = [total, 0]

            def tick(n=1):
                ticks[desc][1] += n
            return tick

        res = run_scoring("unused", texts(), method, **budget, block_range="2:6", batch_size=3,
                          granularity=granularity, model_and_tokenizer=tiny, progress=progress)
        return res, ticks

    new, new_ticks = run()
    with monkeypatch.context() as m:
        m.setattr(perplexity, "removal_nlls", partial(perplexity.removal_nlls, reuse_prefix=False))
        old, old_ticks = run()
    assert new.scores == old.scores and new.removed == old.removed
    assert new.params.get("removal_order") == old.params.get("removal_order")
    assert new.forward_passes == old.forward_passes
    assert new_ticks == old_ticks
    if method == "ppl-task" or "k" in budget:  # a known number of passes: the bar fills
        assert all(total == done for total, done in new_ticks.values())


class Killed(Exception):
    pass


# 5 candidates (blocks 1-5) x 2 batches a round: PPL killed in its second batch, SLEB in its
# second round's first batch; `done`: the candidate-batches saved before the kill
@pytest.mark.parametrize("method,kill_at,done", [("ppl-task", 6, 5), ("sleb-task", 12, 10)])
def test_a_killed_perplexity_run_resumes_where_it_stopped(tiny, tmp_path, method, kill_at, done):
    """SLEB and PPL keep their progress per batch (`run_scoring(checkpoint=)`): a run killed
    mid-way (PPL in its only round, SLEB in its second) and run again ends with the scores, the
    removal order and the counted passes of a run never killed, redoing only the batch it was in;
    a save of another run is one error line."""
    from tabp_vllm.errors import TabpError

    def run(checkpoint=None, kill_after=None, seen=None):
        def progress(desc, total):
            def tick(n=1):
                seen.append(n) if seen is not None else None
                if kill_after is not None and sum(seen) >= kill_after:
                    raise Killed
            return tick
        return run_scoring("unused", texts(), method, k=2, block_range="1:6", batch_size=3,
                           model_and_tokenizer=tiny, progress=progress, checkpoint=checkpoint)

    whole = run()
    save = tmp_path / "m.json.partial.json"
    with pytest.raises(Killed):
        run(save, kill_after=kill_at, seen=[])
    assert save.exists()
    seen = []
    resumed = run(save, seen=seen)
    assert resumed.removed == whole.removed and resumed.scores == whole.scores
    assert resumed.params == whole.params and resumed.forward_passes == whole.forward_passes
    assert seen[0] == done  # what was done before the kill, ticked at once, not run again
    earlier = resumed.calibration["resumed"]["earlier_wall_s"]  # the cost counts the killed run
    assert 0 < earlier <= resumed.wall_s and "resumed" not in whole.calibration
    # another run's save (another seed: other settings) is refused, and kept
    with pytest.raises(TabpError, match="a save of another scoring run"):
        run_scoring("unused", texts(), method, k=2, block_range="1:6", batch_size=3, seed=1,
                    model_and_tokenizer=tiny, checkpoint=save)
    save.write_text("{")
    with pytest.raises(TabpError, match="not a readable scoring save"):
        run(save)
