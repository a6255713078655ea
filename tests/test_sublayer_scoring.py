"""Scoring at sublayer granularity (2L units: 2i block i's attention, 2i+1 its MLP), the FLOPs budget
and cutting sublayer masks, on the tiny random Llama (block 3 the identity: units 6 and 7 write
nothing)."""

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from tabp_vllm.data import Dataset, MCQAItem
from tabp_vllm.errors import TabpError
from tabp_vllm.flops import DecoderShape, removed_flops_fraction
from tabp_vllm.scoring import METHOD_NAMES, get_method, result_at, run_scoring
from tabp_vllm.scoring.probe import ScoreContext, forward_batches, lm_text
from tabp_vllm.scoring.tabp import per_sample_statistics
from tabp_vllm.sublayers import without_sublayers
from tiny_llama import tiny_llama


@pytest.fixture(scope="module")
def tiny(demo_model):
    return tiny_llama(demo_model)


def mcqa(n=5):
    return Dataset("m", "train", "mcqa", [MCQAItem(f"Is {i} > 1?", ["no", "yes"], int(i > 1)) for i in range(n)])


def ctx_of(tiny, granularity, n=4):
    return ScoreContext(model=tiny[0], tokenizer=tiny[1], dataset=mcqa(n), k=1, candidates=[], mode="mcqa",
                        batch_size=4, probe="letters", granularity=granularity)


def test_states_between_attention_and_mlp_are_the_residual_stream(tiny):
    model = tiny[0]
    (blocks,) = list(forward_batches(ctx_of(tiny, "block"), lm_text, hidden=True))
    (subs,) = list(forward_batches(ctx_of(tiny, "sublayer"), lm_text, hidden=True))
    assert len(subs.hidden) == 2 * 6 + 1
    for mine, block in zip(subs.hidden[0::2], blocks.hidden):  # after each MLP: the blocks' outputs
        assert torch.equal(mine, block)
    # after block 2's attention: block 2's output when its MLP writes nothing
    with without_sublayers(model, mlp={2}):
        (no_mlp,) = list(forward_batches(ctx_of(tiny, "block"), lm_text, hidden=True))
    assert torch.allclose(subs.hidden[5], no_mlp.hidden[3], atol=1e-6)
    assert not torch.allclose(subs.hidden[5], subs.hidden[6], atol=1e-3)


def test_tabp_sublayer_shifts_add_up_to_the_block_shifts(tiny):
    block = per_sample_statistics(ctx_of(tiny, "block"))
    sub = per_sample_statistics(ctx_of(tiny, "sublayer"))
    assert sub.shape == (4, 13) and torch.allclose(sub[:, 0::2], block)
    # the identity block's two sublayers shift nothing: SSN 0, removed first
    res = run_scoring("unused", mcqa(), "tabp", k=2, granularity="sublayer", block_range="0:6",
                      model_and_tokenizer=tiny, probe="letters")
    assert res.removed == [6, 7] and res.scores[6] == res.scores[7] == 0.0


@pytest.mark.parametrize("name", ["block_influence", "what_matters", "angular", "ppl-task"])
def test_similarity_and_ppl_see_the_identity_sublayers(tiny, name):
    res = run_scoring("unused", mcqa(), name, k=2, granularity="sublayer", block_range="0:6",
                      model_and_tokenizer=tiny)
    assert len(res.scores) == 12
    if name == "ppl-task":  # PPL with the unit left out (sublayers.without_sublayers): the dense PPL
        from tabp_vllm.scoring.perplexity import calibration_nll

        dense = calibration_nll(ctx_of(tiny, "sublayer", n=5), set())
        assert res.scores[6] == pytest.approx(dense, abs=1e-5) and res.scores[7] == pytest.approx(dense, abs=1e-5)
        assert res.scores[4] != pytest.approx(dense, abs=1e-4)  # a unit that writes something
    else:
        assert res.removed == [6, 7], res.scores  # arccos near cos = 1 in float32: angular's zero is ~1e-4
        assert res.scores[6] == pytest.approx(0.0, abs=1e-3 if name == "angular" else 1e-6)
    assert get_method(name).ranks(res.params)


@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize("units,parity", [("attention", 0), ("mlp", 1)])
def test_units_restrict_the_candidates(tiny, name, units, parity):
    res = run_scoring("unused", mcqa(3), name, k=2, granularity="sublayer", units=units, block_range="1:6",
                      model_and_tokenizer=tiny, probe="letters", max_length=32)
    assert len(res.removed) == 2 and all(u % 2 == parity for u in res.removed)
    assert [u for u, s in enumerate(res.scores) if s is not None] == list(range(2 + parity, 12, 2))
    assert res.params["units"] == units


def shape(tiny):
    return DecoderShape.from_config(tiny[0].config)


@pytest.mark.parametrize("name,units", [("tabp", "both"), ("tabp", "attention"), ("sleb-task", "both"),
                                        ("block_influence", "mlp")])
def test_flops_budget_is_met_by_the_smallest_prefix(tiny, name, units):
    # the tiny model's LM head (49k vocabulary, hidden 32) is most of its FLOPs: small ratios
    ratio = 0.02
    res = run_scoring("unused", mcqa(3), name, flops_ratio=ratio, granularity="sublayer", units=units,
                      block_range="0:6", model_and_tokenizer=tiny, probe="letters")
    removed = removed_flops_fraction(shape(tiny), res.removed)
    assert removed >= ratio and res.params["removed_flops_fraction"] == pytest.approx(removed, abs=1e-6)
    order = res.params.get("removal_order") or sorted(res.removed, key=lambda u: (res.scores[u], u))
    assert sorted(order) == res.removed
    assert removed_flops_fraction(shape(tiny), order[:-1]) < ratio  # one unit fewer falls short
    assert res.params["k"] == len(res.removed) and res.params["flops_ratio"] == ratio
    assert res.forward_passes == get_method(name).forward_passes(3, 12 if units == "both" else 6, len(res.removed))


def test_flops_budget_at_block_granularity_is_a_number_of_blocks(tiny):
    share = removed_flops_fraction(shape(tiny), {0, 1})  # one block
    res = run_scoring("unused", mcqa(3), "angular", flops_ratio=1.5 * share, block_range="0:6",
                      model_and_tokenizer=tiny)
    assert len(res.removed) == 2 and res.removed[1] == res.removed[0] + 1  # a run of 2 blocks


@pytest.mark.parametrize("name", ["tabp", "sleb-task", "angular", "random"])
def test_a_smaller_budget_is_a_prefix_of_the_ranking(tiny, name):
    big = run_scoring("unused", mcqa(3), name, k=5, granularity="sublayer", block_range="0:6",
                      model_and_tokenizer=tiny, probe="letters")
    order = big.params.get("removal_order") or sorted(
        (u for u, s in enumerate(big.scores) if s is not None), key=lambda u: (big.scores[u], u))
    for k in (1, 2, 4):
        cut = result_at(big, k=k)
        assert cut.removed == sorted(order[:k]) and cut.params["k"] == k
    ratio = removed_flops_fraction(shape(tiny), order[:3]) - 1e-4
    cut = result_at(big, flops_ratio=ratio)
    assert cut.removed == sorted(order[:3]) and cut.params["flops_ratio"] == ratio
    if name == "tabp":  # the same as its own run at that budget
        own = run_scoring("unused", mcqa(3), name, k=2, granularity="sublayer", block_range="0:6",
                          model_and_tokenizer=tiny, probe="letters")
        assert result_at(big, k=2).removed == own.removed
    with pytest.raises(TabpError, match="larger"):
        result_at(big, k=6)
    with pytest.raises(TabpError, match="larger"):
        result_at(big, flops_ratio=removed_flops_fraction(shape(tiny), order[:5]) + 0.01)


def test_score_per_flop_takes_the_least_score_per_flop_first():
    # attention units cost 1, MLP units 2.25 (the demo model's 4/9); by score the two cheap
    # attentions go first (0.10, 0.12), by score per FLOP the MLPs (0.18 / 2.25 = 0.08, 0.09)
    from tabp_vllm.scoring.units import Budget

    scores = [0.10, 0.18, 0.12, 0.20, 0.50, 0.60]
    shares = (1.0, 2.25, 1.0, 2.25, 1.0, 2.25)
    ranking = sorted(range(6), key=lambda u: (scores[u], u))
    by_score = Budget(flops_ratio=2.0, shares=shares)
    per_flop = Budget(flops_ratio=2.0, shares=shares, order="score-per-flop")
    assert by_score.take(by_score.ordered(ranking, scores)) == [0, 2]
    assert per_flop.ordered(ranking, scores) == [1, 3, 0, 2, 5, 4]
    assert per_flop.take(per_flop.ordered(ranking, scores)) == [1]  # 2.25 FLOPs for 0.18 of score
    assert per_flop.record([1])["budget_order"] == "score-per-flop" and "budget_order" not in by_score.record([0])
    with pytest.raises(TabpError, match="nonnegative importance"):
        per_flop.ordered(ranking, [-0.1, *scores[1:]])


def test_a_per_flop_run_equals_its_cut_and_its_greedy_order(tiny):
    ratio = 0.02
    own = run_scoring("unused", mcqa(3), "tabp", flops_ratio=ratio, budget_order="score-per-flop",
                      granularity="sublayer", block_range="0:6", model_and_tokenizer=tiny, probe="letters")
    shares = own.params["unit_flops"]
    order = sorted((u for u, x in enumerate(own.scores) if x is not None),
                   key=lambda u: own.scores[u] / shares[u])
    n = next(i for i in range(1, 13) if removed_flops_fraction(shape(tiny), order[:i]) >= ratio)
    assert own.removed == sorted(order[:n]) and own.params["budget_order"] == "score-per-flop"
    wide = run_scoring("unused", mcqa(3), "tabp", k=1, granularity="sublayer", block_range="0:6",
                       model_and_tokenizer=tiny, probe="letters")
    cut = result_at(wide, flops_ratio=ratio, order="score-per-flop")  # beyond the run's k = 1: exact
    assert cut.removed == own.removed and cut.params["budget_order"] == "score-per-flop"
    assert "budget_order" not in result_at(own, k=1).params


@pytest.mark.parametrize("kwargs,fragment", [
    ({"units": "attention"}, "--units attention needs --granularity sublayer"),
    ({"method": "what_matters"}, "what_matters scores sublayers: add --granularity sublayer"),
    ({"granularity": "sublayer", "k": 12, "block_range": "0:6"}, "would remove every one of the 12 units"),
    ({"granularity": "sublayer", "k": 11, "block_range": "3:6"}, "k = 11: must be between 1 and the 6"),
    ({"granularity": "sublayer", "units": "attention", "flops_ratio": 0.5},
     "--flops-ratio 0.5: the 3 candidate units hold only"),
    ({"granularity": "sublayer", "k": 2, "flops_ratio": 0.01}, "give exactly one of --k, --ratio and --flops-ratio"),
    ({"granularity": "sublayer", "k": 2, "budget_order": "score-per-flop"}, "needs a --flops-ratio budget"),
    ({"granularity": "sublayer", "method": "sleb-task", "flops_ratio": 0.01, "budget_order": "score-per-flop"},
     "sleb-task removes in its own order"),
    ({"granularity": "sublayer", "flops_ratio": 0.01, "budget_order": "cheapest"}, "unknown --budget-order"),
])
def test_bad_combinations_are_one_line(tiny, kwargs, fragment):
    kwargs = {"method": "random", "k": None, "block_range": "3:6", **kwargs}
    if kwargs["k"] is None and "flops_ratio" not in kwargs:
        kwargs["k"] = 1
    with pytest.raises(TabpError) as e:
        run_scoring("unused", mcqa(2), model_and_tokenizer=tiny, **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- the CLI, end to end

def app():
    from tabp_vllm.masks_commands import masks_app
    from tabp_vllm.scoring.commands import score

    a = typer.Typer()
    a.command("score")(score)
    a.add_typer(masks_app, name="masks")
    return a


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny[0].save_pretrained(path)
    tiny[1].save_pretrained(path)
    return str(path)


def test_score_sublayer_writes_a_v2_mask_that_validates_and_cuts(tiny_dir, tmp_path):
    from tabp_vllm.mask import load_mask

    out, small = tmp_path / "sub.json", tmp_path / "sub-k1.json"
    runner = CliRunner()
    r = runner.invoke(app(), ["score", "--model", tiny_dir, "--task", "demo", "--samples", "4", "--granularity",
                              "sublayer", "--flops-ratio", "0.02", "--range", "0:6", "--probe", "letters",
                              "-o", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["version"] == 2 and len(doc["scores"]) == 12
    mask = load_mask(out, tiny_dir)
    p = mask.params
    assert p["granularity"] == "sublayer" and p["units"] == "both" and p["unit_numbering"].startswith("unit 2*i")
    assert p["removed_flops_fraction"] >= 0.02 and len(p["unit_flops"]) == 12
    assert 3 in mask.removed_attention + mask.removed_layers  # the identity block 3: its units go first
    units = sorted([2 * i for i in mask.removed_attention] + [2 * i + 1 for i in mask.removed_mlp]
                   + [u for i in mask.removed_layers for u in (2 * i, 2 * i + 1)])
    assert len(units) == p["k"] and mask.calibration["forward_passes"] == 4
    r = runner.invoke(app(), ["masks", "validate", str(out), "--model", tiny_dir])
    assert r.exit_code == 0 and r.output.startswith("ok:"), r.output
    r = runner.invoke(app(), ["masks", "cut", str(out), "--k", "1", "-o", str(small)])
    assert r.exit_code == 0, r.output
    first = min(units, key=lambda u: (mask.scores[u], u))
    cut = load_mask(small, tiny_dir)
    assert cut.params["k"] == 1 and cut.scores == mask.scores and "flops_ratio" not in cut.params
    assert (cut.removed_attention, cut.removed_mlp) == (([first // 2], []) if first % 2 == 0 else ([], [first // 2]))
    per_flop = tmp_path / "sub-per-flop.json"
    r = runner.invoke(app(), ["masks", "cut", str(out), "--flops-ratio", "0.01", "--budget-order",
                              "score-per-flop", "-o", str(per_flop)])
    assert r.exit_code == 0, r.output
    assert load_mask(per_flop, tiny_dir).params["budget_order"] == "score-per-flop"
    r = runner.invoke(app(), ["masks", "cut", str(out), "--k", "1", "--budget-order", "score-per-flop",
                              "-o", str(tmp_path / "bad.json")])
    assert r.exit_code == 2 and "needs a --flops-ratio budget" in r.output


def test_score_cli_bad_combination_is_one_line_exit_2(tiny_dir, tmp_path):
    out = tmp_path / "x.json"
    r = CliRunner().invoke(app(), ["score", "--model", tiny_dir, "--task", "demo", "--units", "mlp", "-o", str(out)])
    assert r.exit_code == 2 and not out.exists()
    assert [ln for ln in r.output.splitlines() if ln.strip()] == [
        "error: --units mlp needs --granularity sublayer (blocks have no kinds)"]
