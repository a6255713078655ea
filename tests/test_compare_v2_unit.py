"""The method comparison (tabp_vllm.comparison, run by bench/compare.py): the paired bootstrap, and
the summary it builds from per-document results (mean and sd over seeds, configuration minus TaBP,
the goal's verdict)."""

import argparse
import json
from fractions import Fraction

import numpy as np
import pytest


@pytest.fixture(scope="module")
def cv2():
    from tabp_vllm import comparison

    return comparison


def test_paired_bootstrap_keeps_documents_paired(cv2):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400).astype(float)
    # the same documents, 20 of the wrong ones now right: +0.05, and every resample agrees on
    # the sign because the pairs move together
    x = y.copy()
    x[np.flatnonzero(y == 0)[:20]] = 1.0
    res = cv2.paired_bootstrap(x, y)
    assert res["mean"] == pytest.approx(0.05)
    lo, hi = res["interval"]
    assert 0 < lo < 0.05 < hi < 0.1
    assert cv2.paired_bootstrap(x, y) == res  # seeded
    # identical scores: no difference and no width
    assert cv2.paired_bootstrap(y, y) == {"mean": 0.0, "interval": [0.0, 0.0]}
    # unpaired (y shuffled) the same mean difference is far less certain
    lo_u, hi_u = cv2.paired_bootstrap(x, rng.permutation(y))["interval"]
    assert hi_u - lo_u > 3 * (hi - lo)


def test_calibration_of_names_what_a_mask_depends_on(cv2):
    assert cv2.calibration_of("tabp", "piqa") == "piqa"
    assert cv2.calibration_of("sleb-task", "piqa") == "piqa"
    assert cv2.calibration_of("sleb", "piqa") == "wikitext2"  # as its paper: WikiText-2
    assert cv2.calibration_of("random", "piqa") == "none"


def test_summary_over_seeds_and_the_goal(cv2, tmp_path, demo_model):
    from tabp_vllm.mask import make_mask

    args = argparse.Namespace(tasks=["arc_easy"], configs=["tabp", "sleb", "last_k"],
                              protocols=["paper"], ks=[4], seeds=[0, 1], samples=256,
                              sleb_samples=32, limit=None)
    rep = cv2.Report(tmp_path, args)
    n = 200
    # removed sets: TaBP seeds 0 and 1, SLEB seeds 0 and 1, last-k (seedless)
    removed = {("tabp", "arc_easy", 0): [20, 21, 22, 23], ("tabp", "arc_easy", 1): [20, 21, 22, 24],
               ("sleb", "wikitext2", 0): [10, 11, 12, 13], ("sleb", "wikitext2", 1): [10, 11, 12, 14],
               ("last_k", "none", 0): [26, 27, 28, 29]}
    right = {(20, 21, 22, 23): 100, (20, 21, 22, 24): 110, (10, 11, 12, 13): 150,
             (10, 11, 12, 14): 160, (26, 27, 28, 29): 60, (): 170}  # documents right of 200
    for (config, calib, seed), blocks in removed.items():
        make_mask(demo_model, blocks, task=calib, model_id="llama").save(
            rep.mask_path(config, calib, seed, 4))
    for blocks, r in right.items():
        docs = [1.0] * r + [0.0] * (n - r)
        rep.cache[rep.key("arc_easy", blocks)] = {"n": n, "acc_norm": r / n,
                                                  "docs": {"acc": docs, "acc_norm": docs}}
    rep.scoring = {"tabp|arc_easy|0|4": {"config": "tabp", "calibration": "arc_easy", "seed": 0,
                                         "scored_at_k": 4, "samples": 256, "forward_passes": 256,
                                         "wall_s": 40.0},
                   "sleb|wikitext2|0|4": {"config": "sleb", "calibration": "wikitext2", "seed": 0,
                                          "scored_at_k": 4, "samples": 32, "forward_passes": 2944,
                                          "wall_s": 1300.0}}
    doc = rep.summarize()
    rows = {r["config"]: r for r in doc["rows"]}
    assert rows["tabp"]["acc_per_seed"] == [0.5, 0.55]
    assert rows["tabp"]["mean"] == pytest.approx(0.525)
    assert rows["tabp"]["sd"] == pytest.approx(np.std([0.5, 0.55], ddof=1))
    assert rows["tabp"]["dense"] == pytest.approx(0.85)
    assert rows["last_k"]["seeds"] == 1 and rows["last_k"]["sd"] is None
    assert rows["sleb"]["minus_tabp"]["mean"] == pytest.approx(0.775 - 0.525)
    assert rows["sleb"]["minus_tabp"]["interval"][0] > 0  # clearly better than TaBP here
    (goal,) = doc["goal"]
    assert goal["best_baseline"] == "sleb" and goal["best_mean"] == pytest.approx(0.775)
    (verdict,) = goal["tabp"]
    assert verdict["within_sleb_share"] is True  # 256 <= 2944 / 10 ...
    assert verdict["within"] is False and goal["met"] is False  # ... but far less accurate
    assert goal["sleb_share"] == "1/10"
    # a stricter bound (a run's --goal-sleb-share) is what the verdict and the heading use
    rep.args.goal_sleb_share = Fraction(1, 20)
    doc20 = rep.summarize()
    assert doc20["goal"][0]["tabp"][0]["within_sleb_share"] is False  # 256 > 2944 / 20
    rep.save()  # report.json keeps the bound ("1/20"), report.md's heading names it
    assert json.loads((tmp_path / "report.json").read_text())["args"]["goal_sleb_share"] == "1/20"
    assert "<= 1/20 of SLEB's forward passes" in (tmp_path / "report.md").read_text()
    del rep.args.goal_sleb_share
    # the next chunk of a resumable run (one configuration) still reports the others' rows
    (tmp_path / "eval_cache.json").write_text(json.dumps(rep.cache))
    chunk = cv2.Report(tmp_path, argparse.Namespace(**{**vars(args), "configs": ["tabp"],
                                                       "seeds": [1]}))
    assert chunk.shown == ["tabp", "sleb", "last_k"] and chunk.shown_seeds == [0, 1]
    rows = {r["config"]: r for r in chunk.summarize()["rows"]}
    assert set(rows) == {"tabp", "sleb", "last_k"}
    assert rows["tabp"]["acc_per_seed"] == [0.5, 0.55]  # both seeds, not the chunk's seed 1 alone
    chunk.save()
    saved = json.loads((tmp_path / "report.json").read_text())["args"]
    assert saved["configs"] == chunk.shown and saved["seeds"] == [0, 1]
    assert {c["config"]: c["forward_passes"] for c in doc["cost"]} == {"tabp": 256, "sleb": 2944}
    # a run calibrated on other data (the per-task protocol) is costed apart, and the paper
    # protocol's verdict keeps counting its own calibration's passes
    rep.scoring["tabp|piqa|0|4"] = {**rep.scoring["tabp|arc_easy|0|4"], "calibration": "piqa",
                                    "forward_passes": 900, "wall_s": 99.0}
    assert {(c["config"], c["calibration"]): c["forward_passes"] for c in rep.cost()} == {
        ("tabp", "arc_easy"): 256, ("tabp", "piqa"): 900, ("sleb", "wikitext2"): 2944}
    assert rep.summarize()["goal"][0]["tabp"][0]["passes"] == 256
    # the summary (the table docs/results.md copies) gives the spread over seeds where there are several
    table = cv2.summary_table({"args": vars(args), "rows": doc["rows"], "reference": "tabp"})
    assert "| tabp | 0.525 ± 0.035 |" in table
    assert any(line.startswith("| last_k | 0.300 [") for line in table)  # one seed: no sd
    # a cell missing some of its seeds says so (here seed 1's TaBP mask is not evaluated yet)
    del rep.cache[rep.key("arc_easy", (20, 21, 22, 24))]
    rows = {r["config"]: r for r in rep.summarize()["rows"]}
    assert (rows["tabp"]["seeds"], rows["tabp"]["seeds_asked"]) == (1, 2)
    assert cv2.table_cell(rows["tabp"]) == "0.500 (1 of 2 seeds)"
    assert "seeds)" not in cv2.table_cell(rows["sleb"])


def test_no_skill_floors(cv2):
    # BoolQ-like: two choices, 7 of 10 golds "yes" -> chance 0.5, majority answer 0.7
    assert cv2.no_skill([1] * 7 + [0] * 3, [2] * 10) == pytest.approx({"chance": 0.5, "majority": 0.7})
    # ARC-like: mixed numbers of choices -> chance is the mean of 1 / choices
    got = cv2.no_skill([0, 1, 2, 3], [4, 4, 3, 5])
    assert got["chance"] == pytest.approx((0.25 + 0.25 + 1 / 3 + 0.2) / 4)
    assert got["majority"] == pytest.approx(0.25)


def test_yes_share_from_right_and_wrong(cv2):
    golds = np.array([1, 1, 0, 0, 1])
    # right on a "yes" and a "no" document, wrong on the rest: answered yes, yes, no, yes, no
    correct = np.array([1, 1, 1, 0, 0])
    assert cv2.yes_share(correct, golds) == pytest.approx(3 / 5)
    assert cv2.yes_share(np.ones(5), golds) == pytest.approx(3 / 5)  # always right
    assert cv2.yes_share(np.zeros(5), golds) == pytest.approx(2 / 5)  # always wrong


def test_hosts_are_those_that_did_work(cv2, tmp_path, monkeypatch):
    """A resumed run keeps the CPU(s) of earlier work (an older report's single `host` too) and
    adds its own only once it scores or evaluates: a --report-only elsewhere leaves it alone."""
    import json

    args = argparse.Namespace(tasks=["arc_easy"], configs=["tabp"], protocols=["paper"], ks=[4],
                              seeds=[0], samples=256, sleb_samples=32, limit=None)
    earlier = {"model": "Earlier CPU", "flags": ["avx2"]}
    (tmp_path / "report.json").write_text(json.dumps({"host": earlier, "args": vars(args)}))
    monkeypatch.setattr("tabp_vllm.hardware.cpu_info", lambda: {"model": "This CPU", "flags": []})
    rep = cv2.Report(tmp_path, args)
    assert rep.hosts == [earlier]
    rep.worked_here()
    rep.worked_here()
    assert [h["model"] for h in rep.hosts] == ["Earlier CPU", "This CPU"]
    # the cost table names the CPUs of the runs it averages (older records carry none: "?")
    rec = {"config": "tabp", "calibration": "arc_easy", "scored_at_k": 4, "samples": 256,
           "forward_passes": 900, "wall_s": 100.0}
    rep.scoring = {"a": {**rec, "seed": 0, "host": "Earlier CPU"}, "b": {**rec, "seed": 1}}
    (cost,) = rep.cost()
    assert cost["hosts"] == ["?", "Earlier CPU"] and cost["runs"] == 2


def test_model_and_arc_easy_split_are_recorded_and_a_resume_must_match(cv2, tmp_path):
    from tabp_vllm.errors import TabpError

    assert cv2.lm_tasks()["arc_easy"] == "tabp_arc_easy_validation"
    assert cv2.lm_tasks("test")["arc_easy"] == "tabp_arc_easy"  # the split that chose nothing
    base = dict(tasks=["piqa"], configs=["tabp"], protocols=["paper"], ks=[4], seeds=[0],
                samples=256, sleb_samples=32, limit=5)
    rep = cv2.Report(tmp_path, argparse.Namespace(**base, model="qwen1.5b", arc_easy_split="test"))
    assert rep.key("arc_easy", (3, 4)) == "tabp_arc_easy|3,4" and rep.model == "qwen1.5b"
    rep.save()
    doc = (tmp_path / "report.json").read_text()
    assert '"model": "qwen1.5b"' in doc and '"arc_easy_split": "test"' in doc
    assert (tmp_path / "report.md").read_text().startswith("# TaBP vs baselines on qwen1.5b")
    with pytest.raises(TabpError, match="--model qwen1.5b"):
        cv2.Report(tmp_path, argparse.Namespace(**base))  # the default model, llama
    # --limit shapes evaluations only: masks scored without one serve a run with one, but
    # once OUT holds evaluations a resume must keep it
    qwen = dict(base, model="qwen1.5b", arc_easy_split="test")
    assert cv2.Report(tmp_path, argparse.Namespace(**dict(qwen, limit=400))).args.limit == 400
    (tmp_path / "eval_cache.json").write_text('{"tabp_piqa|": {"n": 5}}\n')
    with pytest.raises(TabpError, match="--limit 5"):
        cv2.Report(tmp_path, argparse.Namespace(**dict(qwen, limit=400)))


def test_hierarchical_bootstrap_carries_seed_variance():
    from tabp_vllm.comparison import hierarchical_bootstrap, paired_bootstrap

    rng = np.random.default_rng(0)
    docs = 400
    static = (rng.random(docs) < 0.5).astype(float)
    # three fit seeds whose accuracy differs by +-0.05 around the static mask's
    seeds = np.stack([(rng.random(docs) < p).astype(float) for p in (0.45, 0.5, 0.55)])
    h = hierarchical_bootstrap(seeds, static, resamples=400)
    assert h["seeds"] == [3, 1] and h["documents"] == docs
    assert h["mean"] == pytest.approx(seeds.mean() - static.mean())
    lo, hi = h["interval"]
    assert lo < h["mean"] < hi
    # one seed's documents-only interval is narrower than the one that resamples seeds too
    one = paired_bootstrap(seeds[0], static, resamples=400)
    assert hi - lo > one["interval"][1] - one["interval"][0]
    # a single row each is the paired document bootstrap
    same = hierarchical_bootstrap(seeds[:1], static, resamples=400)
    assert same["interval"] == pytest.approx(one["interval"], abs=0.02)
    with pytest.raises(ValueError, match="documents"):
        hierarchical_bootstrap(seeds, static[:10])


def test_configs_dense_evaluates_only_the_dense_model_once(cv2, tmp_path, monkeypatch, capsys,
                                                          demo_model):
    """`bench/compare.py --configs dense`: one evaluation of the dense model (no mask, cached under
    compare_v2's dense key "lm-eval task|"), no mask scored; a rerun evaluates nothing. Selection
    only: the evaluator is a fake recording what it is asked."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "compare.py"
    spec = importlib.util.spec_from_file_location("compare", path)
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    asked = []

    def fake_evaluate(model, tasks, mask, limit=None):
        asked.append((tasks, mask))
        return {"samples": {t: [{"doc_id": i, "metrics": {"acc": 1.0, "acc_norm": float(i % 2)}}
                                for i in range(limit)] for t in tasks}}

    def no_masks(*_):
        raise AssertionError("--configs dense asked for a mask")

    monkeypatch.setattr("tabp_vllm.evaluation.evaluate.evaluate_variant", fake_evaluate)
    monkeypatch.setattr(cv2.Report, "masks", no_masks)
    monkeypatch.setattr(cv2, "task_answers", lambda task, limit: ([0, 1] * (limit // 2), [2] * limit))
    argv = ["compare.py", "--configs", "dense", "--tasks", "arc_easy,piqa", "--protocols", "paper",
            "--ks", "4", "--seeds", "0", "--limit", "4", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    compare.main()
    assert asked == [(["tabp_arc_easy_validation", "tabp_piqa"], None)]  # one engine, no mask
    cache = json.loads((tmp_path / "eval_cache.json").read_text())
    assert sorted(cache) == ["tabp_arc_easy_validation|", "tabp_piqa|"]
    assert cache["tabp_piqa|"]["acc_norm"] == 0.5
    assert not list((tmp_path / "masks").iterdir())
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["args"]["configs"] == ["tabp"]  # the reference, shown with what OUT has of it
    compare.main()  # resumed: dense is cached, nothing to evaluate
    assert len(asked) == 1
    # an unknown name is still refused (dense is the one name outside CONFIGS)
    monkeypatch.setattr(sys, "argv", argv[:2] + ["dense,densest"] + argv[3:])
    with pytest.raises(SystemExit) as refused:
        compare.main()
    assert refused.value.code == 2  # bad input exits 2, as the CLI does
    assert capsys.readouterr().err.strip() == \
        "error: unknown task, configuration or protocol: densest"
