"""Sublayer configurations of the comparison report (issue 33): their FLOPs budget per k, masks cut
from one scoring run of every unit (exact for unit-local scores), the evaluation cache's keys, and
the reference (the best whole-block configuration) with the goal's verdict."""

import argparse
import json

import pytest

from tabp_vllm import comparison as cmp
from tabp_vllm.data import Dataset, MCQAItem
from tabp_vllm.flops import DecoderShape, removed_flops_fraction
from tabp_vllm.mask import make_mask
from tabp_vllm.scoring import result_at, run_scoring
from tabp_vllm.scoring.units import Budget, unit_flops_shares
from tiny_llama import tiny_llama


@pytest.fixture(scope="module")
def tiny(demo_model):
    return tiny_llama(demo_model)


def mcqa(n=4):
    return Dataset("m", "train", "mcqa", [MCQAItem(f"Is {i} > 1?", ["no", "yes"], int(i > 1)) for i in range(n)])


def test_budget_of_k_is_the_flops_of_k_whole_blocks(demo_model):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(demo_model)
    assert cmp.k_flops_ratio(cfg, 4) == pytest.approx(0.107, abs=1e-4)  # the first check: 0.1069
    assert cmp.k_flops_ratio(cfg, 8) == pytest.approx(2 * cmp.k_flops_ratio(cfg, 4), abs=2e-6)
    shape = DecoderShape.from_config(cfg)
    assert cmp.k_flops_ratio(cfg, 2) == pytest.approx(removed_flops_fraction(shape, {30, 31, 50, 51}))
    # 13 attention sublayers hold exactly 4 blocks' FLOPs here; the shares a mask records (8
    # decimals) must not break that tie against them, nor let 12 pass
    shares = tuple(round(x, 8) for x in unit_flops_shares(cfg, "sublayer"))
    budget = Budget(flops_ratio=cmp.k_flops_ratio(cfg, 4) - cmp.FLOPS_TIE, shares=shares)
    assert budget.met(range(0, 26, 2)) and not budget.met(range(0, 24, 2))


def test_a_budget_the_candidates_cannot_hold_is_one_clear_error(demo_model):
    """The demo model's attention of blocks 1-29 holds 0.239 of the FLOPs: 8 blocks' budget
    (0.214) fits in it, 9 blocks' (0.241) does not, and says so before any scoring."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(demo_model)
    cmp.check_budget_reachable("tabp-sub-attention", cfg, 8)
    cmp.check_budget_reachable("tabp-sub-both", cfg, 9)  # (latter half, both kinds: 0.4)
    with pytest.raises(cmp.TabpError, match=r"tabp-sub-attention: its candidates \(attention of "
                       r"blocks 1-29\) hold 0.2387 of the FLOPs, less than k = 9 whole blocks' "
                       r"0.2407: no mask at this budget"):
        cmp.check_budget_reachable("tabp-sub-attention", cfg, 9)


@pytest.mark.parametrize("method,units,block_range,order", [
    ("tabp", "both", "2:6", "score"), ("tabp", "attention", "1:6", "score"),
    ("block_influence", "mlp", "0:4", "score"), ("tabp", "both", "2:6", "score-per-flop")])
def test_masks_cut_from_the_run_of_every_unit_equal_their_own_runs(tiny, method, units, block_range, order):
    # unit-local scores: one run over all 12 units gives each candidate set's mask exactly
    # k = 1 as the report scores it (its mask must validate): every unit is scored whatever k is
    wide = run_scoring("unused", mcqa(), method, k=1, granularity="sublayer", block_range="0:6",
                       model_and_tokenizer=tiny, probe="letters")
    assert all(s is not None for s in wide.scores)
    shape = DecoderShape.from_config(tiny[0].config)
    cand = [u for u, s in enumerate(cmp.restrict(wide, units, block_range, 6).scores) if s is not None]
    for part in (0.3, 0.7):  # of what the candidates hold
        ratio = part * removed_flops_fraction(shape, cand)
        own = run_scoring("unused", mcqa(), method, flops_ratio=ratio, granularity="sublayer",
                          units=units, block_range=block_range, model_and_tokenizer=tiny,
                          probe="letters", budget_order=order)
        cut = result_at(cmp.restrict(wide, units, block_range, 6), flops_ratio=ratio, order=order)
        assert cut.removed == own.removed
        assert cut.params["candidate_range"] == own.params["candidate_range"]
        assert cut.params["removed_flops_fraction"] == pytest.approx(own.params["removed_flops_fraction"])
        assert [s is None for s in cut.scores] == [s is None for s in own.scores]


def test_cache_keys_of_whole_blocks_are_compare_v2s_and_sublayers_differ(tmp_path, demo_model):
    args = argparse.Namespace(tasks=["arc_easy"], configs=["tabp"], protocols=["paper"], ks=[4],
                              seeds=[0], samples=256, sleb_samples=32, limit=None)
    rep = cmp.Report(tmp_path, args)
    whole = make_mask(demo_model, [15, 16], task="arc_easy", model_id="llama")
    assert rep.key("arc_easy", cmp.variant_of(whole)) == "tabp_arc_easy_validation|15,16"
    assert rep.key("arc_easy", ()) == "tabp_arc_easy_validation|"
    sub = make_mask(demo_model, [15, 16], task="arc_easy", model_id="llama", removed_attention=[20])
    only_attention = make_mask(demo_model, [], task="arc_easy", model_id="llama", removed_attention=[20])
    keys = {rep.key("arc_easy", cmp.variant_of(m)) for m in (whole, sub, only_attention)}
    assert len(keys) == 3 and "tabp_arc_easy_validation|15,16|attention 20|mlp " in keys


def whole_block_report(blocks, right, seeds, n=200):
    """A compare_v2-like folder: its seeds (report.json) and per-document results of each
    removed set (`right`: removed blocks -> documents right, the first ones)."""
    (blocks / "masks").mkdir(parents=True)
    cache = {f"tabp_arc_easy_validation|{','.join(map(str, r))}":
             {"n": n, "docs": {"acc_norm": [1.0] * got + [0.0] * (n - got)}} for r, got in right.items()}
    (blocks / "eval_cache.json").write_text(json.dumps(cache))
    (blocks / "report.json").write_text(json.dumps({"args": {"seeds": seeds}}))


def sublayer_report(tmp_path, demo_model, blocks, right, run_seed, sub_right=130):
    """A sublayer report over `blocks` (asked for `run_seed`): the whole-block masks of `right`
    (config -> removed blocks per seed) saved where it reads them, and one tabp-sub-both mask at
    `run_seed`, evaluated (`sub_right` of 200 documents right)."""
    args = argparse.Namespace(tasks=["arc_easy"], configs=["tabp", "sleb-task", "tabp-sub-both"],
                              protocols=["paper"], ks=[4], seeds=[run_seed], samples=256,
                              sleb_samples=32, limit=None, blocks_from=str(blocks))
    rep = cmp.Report(tmp_path / "sub", args)
    for config, removed in right.items():
        for seed, r in enumerate(removed):
            make_mask(demo_model, list(r), task="arc_easy", model_id="llama").save(
                rep.mask_path(config, "arc_easy", seed, 4))
    make_mask(demo_model, [], task="arc_easy", model_id="llama", removed_attention=[20]).save(
        rep.mask_path("tabp-sub-both", "arc_easy", run_seed, 4))
    rep.cache[rep.key("arc_easy", ((), (20,), ()))] = {
        "n": 200, "docs": {"acc_norm": [1.0] * sub_right + [0.0] * (200 - sub_right)}}
    return rep


def test_reference_is_the_best_whole_block_configuration(tmp_path, demo_model):
    blocks = tmp_path / "v2"
    args = argparse.Namespace(tasks=["arc_easy"], configs=["tabp", "sleb-task", "tabp-sub-both"],
                              protocols=["paper"], ks=[4], seeds=[0, 1], samples=256,
                              sleb_samples=32, limit=None, blocks_from=str(blocks))
    n = 200
    whole_block_report(blocks, {(10, 11, 12, 13): 100, (10, 11, 12, 14): 110, (20, 21, 22, 23): 120,
                                (20, 21, 22, 24): 124, (): 150}, seeds=[0, 1], n=n)
    rep = cmp.Report(tmp_path / "sub", args)
    for (config, seed), r in {("tabp", 0): [10, 11, 12, 13], ("tabp", 1): [10, 11, 12, 14],
                              ("sleb-task", 0): [20, 21, 22, 23], ("sleb-task", 1): [20, 21, 22, 24]}.items():
        make_mask(demo_model, r, task="arc_easy", model_id="llama").save(rep.mask_path(config, "arc_easy", seed, 4))
        assert rep.mask_path(config, "arc_easy", seed, 4).parent == blocks / "masks"  # read there
    # the sublayer masks: seed 0 evaluated (128 right, +4 over sleb-task seed 1's documents), seed 1 not yet
    for seed, att in ((0, [20]), (1, [21])):
        m = make_mask(demo_model, [], task="arc_easy", model_id="llama", removed_attention=att)
        m.save(rep.mask_path("tabp-sub-both", "arc_easy", seed, 4))
        assert rep.mask_path("tabp-sub-both", "arc_easy", seed, 4).parent == tmp_path / "sub" / "masks"
    docs = [1.0] * 128 + [0.0] * (n - 128)
    rep.cache[rep.key("arc_easy", ((), (20,), ()))] = {"n": n, "docs": {"acc_norm": docs}}
    doc = rep.summarize()
    rows = {r["config"]: r for r in doc["rows"]}
    assert rows["tabp"]["best_block"] == "sleb-task" and "minus_best_block" not in rows["sleb-task"]
    assert rows["tabp-sub-both"]["minus_best_block"]["mean"] == pytest.approx(0.64 - 0.61)
    assert rows["tabp"]["dense"] == pytest.approx(0.75)
    (goal,) = doc["sublayer_goal"]
    assert goal["best_block"] == "sleb-task" and goal["best_block_mean"] == pytest.approx(0.61)
    (v,) = goal["sublayer"]
    assert v["minus_best_block"]["interval"][0] > 0 and (v["seeds"], v["seeds_asked"]) == (1, 2)
    assert v["met"] is False  # a seed missing is no verdict yet
    assert "(1 of 2 seeds)" in cmp.table_cell(rows["tabp-sub-both"])
    assert doc["goal"] == []
    assert rep.reference_of({}) is None  # nothing whole-block evaluated yet


def test_reference_averages_every_seed_of_the_whole_block_report_whatever_the_runs_seeds(
        tmp_path, demo_model):
    # over compare_v2's seeds 0-2 tabp is best (0.60 against 0.52); at seed 2 alone sleb-task is
    # (0.70 against 0.55): a run working on seed 2 must still compare with tabp over 0-2
    blocks = tmp_path / "v2"
    right = {"tabp": [(10, 11, 12, 13), (10, 11, 12, 14), (10, 11, 12, 15)],
             "sleb-task": [(20, 21, 22, 23), (20, 21, 22, 24), (20, 21, 22, 25)]}
    got = {"tabp": [130, 120, 110], "sleb-task": [80, 90, 140]}
    whole_block_report(blocks, {r: g for c in right for r, g in zip(right[c], got[c])}, seeds=[0, 1, 2])
    rep = sublayer_report(tmp_path, demo_model, blocks, right, run_seed=2)
    rows = {r["config"]: r for r in rep.summarize()["rows"]}
    assert rows["tabp-sub-both"]["best_block"] == "tabp"
    assert rows["tabp-sub-both"]["minus_best_block"]["mean"] == pytest.approx(0.65 - 0.60)
    assert (rows["tabp"]["seeds"], rows["tabp"]["seeds_asked"]) == (3, 3)
    assert rows["sleb-task"]["mean"] == pytest.approx(310 / 600)
    assert (rows["tabp-sub-both"]["seeds"], rows["tabp-sub-both"]["seeds_asked"]) == (1, 1)


def test_reference_counts_the_seeds_scored_not_the_seeds_asked(tmp_path, demo_model):
    # the whole-block report asked seeds 0-2 but scored sleb-task on 0 and 1 only (its masks do
    # not move with the seed: the qwen1.5b plan): its two evaluated seeds make it the reference.
    # tabp has all three masks, one not evaluated yet: barred, though its two seeds' mean is higher
    blocks = tmp_path / "v2"
    right = {"tabp": [(10, 11, 12, 13), (10, 11, 12, 14), (10, 11, 12, 15)],
             "sleb-task": [(20, 21, 22, 23), (20, 21, 22, 24)]}
    got = {(10, 11, 12, 13): 150, (10, 11, 12, 14): 150, (20, 21, 22, 23): 120,
           (20, 21, 22, 24): 124}
    whole_block_report(blocks, got, seeds=[0, 1, 2])
    rep = sublayer_report(tmp_path, demo_model, blocks, right, run_seed=0)
    rows = {r["config"]: r for r in rep.summarize()["rows"]}
    assert (rows["tabp"]["seeds"], rows["sleb-task"]["seeds"]) == (2, 2)
    assert rows["tabp-sub-both"]["best_block"] == "sleb-task"
    assert rows["tabp-sub-both"]["minus_best_block"]["mean"] == pytest.approx(0.65 - 0.61)
    # its third seed evaluated, tabp is complete and the better one
    rep.cache[rep.key("arc_easy", (10, 11, 12, 15))] = {"n": 200, "docs": {"acc_norm": [1.0] * 150 + [0.0] * 50}}
    rows = {r["config"]: r for r in rep.summarize()["rows"]}
    assert rows["tabp-sub-both"]["best_block"] == "tabp"


def test_a_whole_block_report_without_its_seeds_is_one_clear_error(tmp_path):
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "eval_cache.json").write_text("{}")
    args = argparse.Namespace(tasks=["arc_easy"], configs=["tabp", "tabp-sub-both"], protocols=["paper"],
                              ks=[4], seeds=[0], samples=256, sleb_samples=32, limit=None,
                              blocks_from=str(tmp_path / "v2"))
    with pytest.raises(cmp.TabpError, match="report.json: cannot read the seeds"):
        cmp.Report(tmp_path / "sub", args)


def test_a_shared_run_of_every_unit_is_scored_and_costed_once(tmp_path, tiny, monkeypatch):
    both, attention = "block_influence-sub-both", "block_influence-sub-attention"
    monkeypatch.setitem(cmp.CONFIGS, both, {**cmp.CONFIGS[both], "block_range": "3:6"})
    monkeypatch.setitem(cmp.CONFIGS, attention, {**cmp.CONFIGS[attention], "block_range": "1:6"})
    ckpt = tmp_path / "tiny"
    for part in tiny:
        part.save_pretrained(ckpt)
    whole_block_report(tmp_path / "v2", {}, seeds=[0])
    args = argparse.Namespace(tasks=["arc_easy"], configs=[both, attention], protocols=["paper"],
                              ks=[1], seeds=[0], samples=4, sleb_samples=4, limit=None, model=str(ckpt),
                              blocks_from=str(tmp_path / "v2"))
    rep = cmp.Report(tmp_path / "out", args)
    got = {c: rep.masks(c, "arc_easy", 0)[1][0] for c in (both, attention)}
    assert got[attention] != got[both]  # two configurations cut from the one run
    runs = [r for r in rep.scoring.values() if r["config"] == "block_influence-sub-all"]
    assert len(runs) == 1 and runs[0]["forward_passes"] == 4
    (cost,) = [r for r in rep.cost() if r["config"] == "block_influence-sub-all"]
    assert cost["runs"] == 1


def test_a_whole_block_run_gives_every_smaller_k_and_is_recorded_at_its_k(tmp_path, tiny):
    # the whole-block configurations go through the same scoring run as the sublayer ones:
    # one run at the largest k (TaBP ranks every k), the smaller k a prefix of its ranking,
    # recorded under compare_v2's key "config|calibration|seed|k"
    ckpt = tmp_path / "tiny"
    for part in tiny:
        part.save_pretrained(ckpt)
    args = argparse.Namespace(tasks=["arc_easy"], configs=["tabp"], protocols=["paper"], ks=[1, 2],
                              seeds=[0], samples=4, sleb_samples=4, limit=None, model=str(ckpt))
    rep = cmp.Report(tmp_path / "out", args)
    got = rep.masks("tabp", "arc_easy", 0)
    assert len(got[2][0]) == 2 and set(got[1][0]) < set(got[2][0])
    (key,) = rep.scoring
    assert key == "tabp|arc_easy|0|2" and rep.scoring[key]["scored_at_k"] == 2
    assert rep.scoring[key]["samples"] == 4
    assert rep.masks("tabp", "arc_easy", 0) == got and len(rep.scoring) == 1  # resumed: nothing redone
