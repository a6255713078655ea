"""The routing report v2's pieces on synthetic data (no engine, no model forward pass but the tiny
random Llama's): the gap split where the answer is known by construction, the hierarchical
comparisons over tasks, the choice of the best static of equal FLOPs, the per-cluster oracle router
(built from a router and static masks, valid under the router checks), and write_report over
cached rows and per-document files."""

from __future__ import annotations


import numpy as np
import pytest

from tabp_vllm.errors import TabpError
from tabp_vllm.routing import report as rr

TASKS = ["t1", "t2"]
METRIC = {"t1": "acc_norm", "t2": "acc"}


def run_of(values: dict[str, list[float]], clusters: dict[str, list] | None = None):
    """A per-document run: every task's documents 0..n-1 with the task's metric value."""
    return {t: [{"doc_id": i, "cluster": str((clusters or {}).get(t, [0] * len(v))[i]),
                 METRIC[t]: float(x)} for i, x in enumerate(v)] for t, v in values.items()}


def test_gap_split_known_by_construction():
    # t1: 10 documents, home cluster "0" (oracle: static A); 3 of them routed to cluster "1"
    # (oracle: static B). A answers every t1 document, B none: routing costs 3/10. The routed
    # masks score 0.5 on average everywhere (alternating 1, 0), the oracle 1 on cluster 0 and 0
    # on cluster 1: masks = (7 * 1 + 3 * 0) / 10 - 0.5 = 0.2.
    c1 = [0, 1, 0, 0, 1, 0, 0, 1, 0, 0]
    routed_t1 = [1.0, 0.0] * 5
    oracle_t1 = [1.0 if c == 0 else 0.0 for c in c1]
    # t2: 4 documents, home "1" (B); all routed home: no routing error; B scores 1, 1, 0, 0 and
    # the routed masks 0, 0, 0, 1: masks = 0.5 - 0.25
    c2 = [1, 1, 1, 1]
    routed = run_of({"t1": routed_t1, "t2": [0, 0, 0, 1]}, {"t1": c1, "t2": c2})
    oracle = run_of({"t1": oracle_t1, "t2": [1, 1, 0, 0]}, {"t1": c1, "t2": c2})
    statics = {"A": run_of({"t1": [1.0] * 10, "t2": [0.0] * 4}),
               "B": run_of({"t1": [0.0] * 10, "t2": [1, 1, 0, 0]})}
    choices = {"0": "A", "1": "B", "fallback": "A"}
    home = {"t1": "0", "t2": "1"}
    g = rr.gap_split(routed, oracle, statics, choices, home, TASKS, METRIC, "cfg")
    t1, t2 = g["per_task"]["t1"], g["per_task"]["t2"]
    assert t1["misrouted"] == 3 and t1["routing"] == pytest.approx(0.3)
    assert t1["masks"] == pytest.approx(0.2) and t1["gap"] == pytest.approx(0.5)
    # the split adds up to the task-routed oracle minus routed
    assert t1["gap"] == pytest.approx(np.mean([1.0] * 10) - np.mean(routed_t1))
    assert t2 == {"documents": 4, "misrouted": 0, "routing": 0.0, "masks": pytest.approx(0.25),
                  "gap": pytest.approx(0.25)}
    assert g["mean"]["routing"] == pytest.approx(0.15) and g["mean"]["gap"] == pytest.approx(0.375)
    # a misrouted document whose cluster's static equals its task's is not misrouted
    same = rr.gap_split(routed, oracle, statics, {"0": "A", "1": "A"}, home, ["t1"], METRIC, "cfg")
    assert same["per_task"]["t1"]["misrouted"] == 0 and same["per_task"]["t1"]["routing"] == 0.0
    # averaged over two seeds
    m = rr.mean_gap([g, same], ["t1"])
    assert m["seeds"] == 2 and m["per_task"]["t1"]["routing"] == pytest.approx(0.15)
    assert m["per_task"]["t1"]["misrouted"] == 1.5


def test_gap_split_refuses_runs_that_do_not_match():
    routed = run_of({"t1": [1, 0, 1]}, {"t1": [0, 0, 1]})
    statics = {"A": run_of({"t1": [1, 1, 1]})}
    choices, home = {"0": "A", "1": "A"}, {"t1": "0"}
    with pytest.raises(TabpError, match="different documents"):
        rr.gap_split(routed, run_of({"t1": [1, 0]}), statics, choices, home, ["t1"], METRIC, "c")
    with pytest.raises(TabpError, match="not the same router"):
        rr.gap_split(routed, run_of({"t1": [1, 0, 1]}, {"t1": [0, 1, 1]}), statics, choices, home,
                     ["t1"], METRIC, "c")
    with pytest.raises(TabpError, match="no run of static"):
        rr.gap_split(routed, routed, {}, choices, home, ["t1"], METRIC, "c")
    with pytest.raises(TabpError, match="no cluster of its own"):
        rr.gap_split(routed, routed, statics, choices, {}, ["t1"], METRIC, "c")


def test_compare_mean_over_tasks_weighs_tasks_equally():
    rng = np.random.default_rng(1)
    # t1: 300 documents where x is 0.2 ahead; t2: 30 documents where x is 0.2 behind
    x1, y1 = (rng.random(300) < 0.7), (rng.random(300) < 0.5)
    x2, y2 = np.r_[np.ones(9), np.zeros(21)], np.r_[np.ones(15), np.zeros(15)]
    x = [run_of({"t1": x1, "t2": x2})]
    y = [run_of({"t1": y1, "t2": y2})]
    res = rr.compare(x, y, TASKS, METRIC, "c", resamples=300)
    d1, d2 = x1.mean() - y1.mean(), x2.mean() - y2.mean()
    assert res["per_task"]["t1"]["mean"] == pytest.approx(d1)
    assert res["mean"]["mean"] == pytest.approx((d1 + d2) / 2)  # not the pooled (300:30) mean
    lo, hi = res["mean"]["interval"]
    assert lo < (d1 + d2) / 2 < hi
    with pytest.raises(TabpError, match="different documents"):
        rr.compare(x, [run_of({"t1": y1[:-1], "t2": y2})], TASKS, METRIC, "c")


def test_stratified_bootstrap_is_the_plain_one_for_one_stratum():
    from tabp_vllm.comparison import hierarchical_bootstrap

    rng = np.random.default_rng(2)
    x, y = rng.random((3, 50)), rng.random(50)
    assert hierarchical_bootstrap(x, y, 200, strata=["a"] * 50) == hierarchical_bootstrap(x, y, 200)
    with pytest.raises(ValueError, match="strata"):
        hierarchical_bootstrap(x, y, 200, strata=["a"] * 49)


def test_best_static_of_equal_flops_and_home_clusters():
    statics = {"cheap": {"accuracy": {"mean": 0.6}, "removed_flops": 0.05},
               "equal": {"accuracy": {"mean": 0.5}, "removed_flops": 0.107},
               "costly": {"accuracy": {"mean": 0.4}, "removed_flops": 0.2},
               "faster": {"accuracy": {"mean": 0.9}, "removed_flops": 0.12}}
    # a static removing more FLOPs than the routed configuration is not its comparator
    assert rr.best_static(statics, 0.107) == "cheap"
    assert rr.best_static(statics, 0.12) == "faster"
    assert rr.best_static(statics, 0.01) is None
    assert rr.home_clusters([{"a": 5, "b": 1}, {"a": 5, "b": 9, "c": 0}]) == {"a": "0", "b": "1"}


def test_routing_summary_over_seeds():
    n = 40
    rng = np.random.default_rng(3)
    runs = [run_of({"t1": rng.random(n) < p, "t2": rng.random(n) < p}) for p in (0.6, 0.7)]
    static = run_of({"t1": np.ones(n) * 0.5 > rng.random(n), "t2": rng.random(n) < 0.5})
    statics = {"static-a": {"k": 4, "run": static, "removed_flops": 0.107},
               "static-b": {"k": 4, "run": run_of({"t1": np.zeros(n), "t2": np.zeros(n)}),
                            "removed_flops": 0.107},
               "static-k8": {"k": 8, "run": run_of({"t1": np.ones(n), "t2": np.ones(n)}),
                             "removed_flops": 0.2}}
    group = {"name": "l0", "k": 4, "n": 2, "runs": runs, "removed_flops": [0.107, 0.107],
             "oracle": [static, static], "choices": [{"0": "static-a", "1": "static-a"}] * 2,
             "home": [{"t1": "0", "t2": "0"}] * 2}
    [rec] = rr.routing_summary([group], statics, TASKS, METRIC, resamples=200)
    assert rec["seeds"] == 2 and rec["best_static"]["name"] == "static-a"
    acc = np.mean([[np.mean([d[METRIC[t]] for d in r[t]]) for t in TASKS] for r in runs])
    assert rec["accuracy"]["mean"] == pytest.approx(acc)
    vs = rec["best_static"]["vs"]["mean"]
    assert vs["seeds"] == [2, 1] and vs["mean"] == pytest.approx(acc - rec["best_static"]["accuracy"]["mean"])
    assert rec["oracle"]["vs"]["mean"]["mean"] == pytest.approx(vs["mean"])
    # every document in its home cluster, the oracle's static for it: the gap is all masks
    assert rec["gap"]["mean"]["routing"] == 0.0
    assert rec["gap"]["mean"]["masks"] == pytest.approx(-vs["mean"])
    text = "\n".join(rr.summary_markdown([rec], TASKS, {"t1": "T1"}))
    assert "| l0 | 4 | 2 | 2 | 0.1070 |" in text and "static-a" in text and "T1 routing" in text
    with pytest.raises(TabpError, match="1 oracle runs for 2 fit seeds"):
        rr.routing_summary([{**group, "oracle": [static]}], statics, TASKS, METRIC)


def test_eval_oracle_takes_each_clusters_best_static_on_its_documents():
    # clusters 0, 1 and the fallback; by construction A is best on cluster 0, B on cluster 1, C
    # on the fallback; the KL oracle chose A everywhere (calibration said so)
    clusters = {"t1": [0, 0, 1, 1, "fallback"], "t2": [0, 1, 1, 1]}
    routed = run_of({"t1": [0] * 5, "t2": [0] * 4}, clusters)
    statics = {"A": run_of({"t1": [1, 1, 0, 0, 0], "t2": [1, 0, 0, 0]}),
               "B": run_of({"t1": [0, 0, 1, 1, 0], "t2": [0, 1, 1, 0]}),
               "C": run_of({"t1": [0, 0, 0, 0, 1], "t2": [0, 0, 0, 0]})}
    [choices], [ev] = rr.eval_oracle([routed], statics, TASKS, METRIC, "c")
    assert choices == {"0": "A", "1": "B", "fallback": "C"}
    assert [d[METRIC["t1"]] for d in ev["t1"]] == [1.0] * 5
    assert [d[METRIC["t2"]] for d in ev["t2"]] == [1.0, 1.0, 1.0, 0.0]
    assert [d["cluster"] for d in ev["t1"]] == ["0", "0", "1", "1", "fallback"]
    kl = rr.assembled_oracle(routed, statics, {"0": "A", "1": "A", "fallback": "A"}, "c")
    assert (rr.task_means([ev], TASKS, METRIC, "c")["mean"]
            > rr.task_means([kl], TASKS, METRIC, "c")["mean"])
    # ties go to the first static given
    assert rr.eval_choices(routed, {"B": statics["C"], "C": statics["C"]}, TASKS, METRIC,
                           "c")["0"] == "B"
    with pytest.raises(TabpError, match="missing from static B's run"):
        rr.eval_choices(routed, {"A": statics["A"], "B": run_of({"t1": [0] * 4, "t2": [0] * 4})},
                        TASKS, METRIC, "c")


def test_eval_oracle_maximises_the_mean_over_tasks():
    """A document weighs 1 / its task's size, as in the report's mean over tasks; pooling documents
    or weighing tasks equally inside a cluster would choose otherwise here: the eval oracle is the
    best of every per-cluster assignment (brute force), on this case and on random runs."""
    # cluster 0: t1's only 2 documents (A answers both) and 3 of t2's 100 (B answers those)
    clusters = {"t1": [0, 0], "t2": [0] * 3 + [1] * 97}
    routed = run_of({"t1": [0, 0], "t2": [0] * 100}, clusters)
    statics = {"A": run_of({"t1": [1, 1], "t2": [0] * 100}),
               "B": run_of({"t1": [0, 0], "t2": [1] * 3 + [0] * 97})}
    assert rr.eval_choices(routed, statics, TASKS, METRIC, "c")["0"] == "A"  # pooled: B (3 > 2)
    # cluster 0: 1 of t1's 100 documents (A) and all 10 of t2's (B answers 3): equal task weight
    # inside the cluster says A (1 vs 0.3), the mean over tasks B (0.01 vs 0.3)
    clusters = {"t1": [0] + [1] * 99, "t2": [0] * 10}
    routed = run_of({"t1": [0] * 100, "t2": [0] * 10}, clusters)
    statics = {"A": run_of({"t1": [1] + [0] * 99, "t2": [0] * 10}),
               "B": run_of({"t1": [0] * 100, "t2": [1] * 3 + [0] * 7})}
    assert rr.eval_choices(routed, statics, TASKS, METRIC, "c")["0"] == "B"

    import itertools

    rng = np.random.default_rng(5)
    for _ in range(5):
        sizes = {"t1": 7, "t2": 40}
        clusters = {t: rng.choice([0, 1, "fallback"], n).tolist() for t, n in sizes.items()}
        routed = run_of({t: [0] * n for t, n in sizes.items()}, clusters)
        statics = {s: run_of({t: rng.random(n) < rng.random() for t, n in sizes.items()})
                   for s in "ABC"}
        [choices], [ev] = rr.eval_oracle([routed], statics, TASKS, METRIC, "c")
        best = max(rr.task_means([rr.assembled_oracle(routed, statics, dict(zip(
            ("0", "1", "fallback"), pick)), "c")], TASKS, METRIC, "c")["mean"]
                   for pick in itertools.product("ABC", repeat=3))
        assert rr.task_means([ev], TASKS, METRIC, "c")["mean"] == pytest.approx(best)


def test_routing_summary_eval_oracle_among_the_candidates():
    n = 30
    rng = np.random.default_rng(6)
    clusters = {t: [i % 2 for i in range(n)] for t in TASKS}
    runs = [run_of({t: rng.random(n) < 0.5 for t in TASKS}, clusters) for _ in range(2)]
    good, bad = (run_of({t: np.ones(n) for t in TASKS}), run_of({t: np.zeros(n) for t in TASKS}))
    statics = {"static-bad": {"k": 4, "run": bad, "removed_flops": 0.1},
               "static-good-sub": {"k": 4, "run": good, "removed_flops": 0.1}}
    group = {"name": "l0", "k": 4, "n": 2, "runs": runs, "removed_flops": [0.1, 0.1],
             "oracle": [run_of({t: np.zeros(n) for t in TASKS}, clusters)] * 2,
             "choices": [{"0": "static-bad", "1": "static-bad"}] * 2,
             "home": [{"t1": "0", "t2": "1"}] * 2}
    # every static of the k by default; only the candidates when given
    [rec] = rr.routing_summary([group], statics, TASKS, METRIC, resamples=100)
    ev = rec["eval_oracle"]
    assert ev["name"] == "eval-oracle-l0" and ev["accuracy"]["mean"] == 1.0
    assert ev["choices"] == [{"0": "static-good-sub", "1": "static-good-sub"}] * 2
    assert ev["vs"]["mean"]["mean"] == pytest.approx(rec["accuracy"]["mean"] - 1.0)
    assert rec["oracle"]["vs_eval"]["mean"]["mean"] == pytest.approx(-1.0)
    [rec] = rr.routing_summary([{**group, "candidates": ["static-bad"]}], statics, TASKS, METRIC,
                               resamples=100)
    assert rec["eval_oracle"]["accuracy"]["mean"] == 0.0
    text = "\n".join(rr.summary_markdown([rec], TASKS, {}))
    assert "## Routed vs its two per-cluster oracles" in text
    assert "| eval-oracle-l0 | 4 | 2 | 2 | 0.000 | 0.000 | 0.000 | - |" in text
    assert "| cluster-oracle-l0 | 4 | 2 | 2 | 0.000 | 0.000 | 0.000 | +0.000 [+0.000, +0.000] |" in text


# ------------------------------------------------------------------------- the oracle router

def _router(demo_model, masks, fallback=None, sizes=None):
    from tabp_vllm.mask import make_mask
    from tabp_vllm.models import load_model_config, model_fingerprint
    from tabp_vllm.routing.router import Fallback, Router

    mk = [make_mask(demo_model, m, task=f"cluster{c}", model_id="llama", method="l0")
          for c, m in enumerate(masks)]
    enc = {"name": "fake", "id": "fake", "dimension": 2, "pooling": "none", "normalize": "l2"}
    r = Router(model_id="llama", fingerprint=model_fingerprint(load_model_config(demo_model)),
               k=len(masks[0]), encoder=enc,
               centroids=[[1.0, 0.0], [0.0, 1.0]][:len(masks)], masks=mk,
               sizes=sizes or [{"a": 3}, {"b": 2}][:len(masks)], method="l0",
               provenance={"data": [{"data": "a"}], "data_sha256": "x", "seed": 1, "samples": 5,
                           "clusters": [{"converged": True}]})
    if fallback is not None:
        r.fallback = Fallback(radius=0.5, quantile=0.95, source="fit",
                              mask=make_mask(demo_model, fallback, task="fb", model_id="llama"))
    return r


def test_oracle_router_takes_each_groups_best_static(tmp_path, demo_model):
    from tabp_vllm.mask import make_mask
    from tabp_vllm.routing.oracle import oracle_router
    from tabp_vllm.routing.router import load_router

    router = _router(demo_model, [[1, 2], [3, 4]], fallback=[5, 6])
    statics = {n: make_mask(demo_model, m, task="cluster0", model_id="llama", method=n)
               for n, m in (("static-x", [10, 11]), ("static-y", [12, 13]),
                            ("static-z", [10, 11]))}  # z: x's mask again
    costs = {"groups": {"0": {"inputs": 3, "kl": {"static-x": 0.5, "static-y": 0.2, "static-z": 0.5}},
                        "1": {"inputs": 2, "kl": {"static-x": 0.1, "static-y": 0.3, "static-z": 0.1}},
                        # no calibration input past the radius: the best over all inputs
                        "fallback": {"inputs": 0, "kl": {}}},
             "forward_passes": 15, "wall_s": 1.0}
    oracle = oracle_router(router, statics, costs)
    path = oracle.save(tmp_path / "oracle.json")  # save() refuses a router the checks refuse
    back = load_router(path, demo_model)
    assert [m.removed_layers for m in back.masks] == [[12, 13], [10, 11]]
    # totals: x 3 * 0.5 + 2 * 0.1 = 1.7, y 0.6 + 0.6 = 1.2: y for the fallback
    assert back.fallback.mask.removed_layers == [12, 13] and back.fallback.radius == 0.5
    assert back.centroids == router.centroids and back.sizes == router.sizes
    assert back.method == "oracle" and back.params["statics"] == ["static-x", "static-y"]
    assert back.provenance["choices"] == {"0": "static-y", "1": "static-x", "fallback": "static-y"}
    assert back.provenance["oracle_of"] == router.content_hash()
    # a static that does not meet the router's budget is one line
    bad = {"static-k3": make_mask(demo_model, [1, 2, 3], task="s", model_id="llama")}
    with pytest.raises(TabpError, match="static static-k3: mask removes 3 blocks"):
        oracle_router(router, bad, costs)
    with pytest.raises(TabpError, match="not of this router's groups"):
        oracle_router(router, statics, {"groups": {"0": costs["groups"]["0"]}})


def test_static_costs_on_a_tiny_model(demo_model):
    """The KL each static mask costs on each group's inputs: zero for a mask that removes only the
    tiny model's identity block 3, more for one removing a real block; the groups are the router's
    own assignment (nearest centroid, fallback past the radius)."""
    import torch
    from tiny_llama import tiny_llama

    from tabp_vllm.data import TextItem
    from tabp_vllm.mask import make_mask
    from tabp_vllm.routing.fit import Calibration
    from tabp_vllm.routing.oracle import choose, static_costs
    from tabp_vllm.routing.router import Fallback

    model, tok = tiny_llama(demo_model)
    with torch.no_grad():  # as test_routing: every block but the identity block 3 matters
        for i, layer in enumerate(model.model.layers):
            if i != 3:
                layer.self_attn.o_proj.weight.mul_(20)
                layer.mlp.down_proj.weight.mul_(20)

    class Enc:  # "x..." texts on centroid 0, "y..." on centroid 1
        def encode(self, texts):
            return np.array([{"x": [1, 0], "y": [0, 1]}[t[0]] for t in texts], float)

    router = _router(demo_model, [[1, 2], [3, 4]])
    router.fallback = Fallback(radius=1.0, quantile=0.95, source="fit", mask=router.masks[0])
    cal = Calibration([TextItem(t) for t in ("x the cat sat", "y on the mat", "x a dog ran",
                                             "y far away", "x it rains")], ["a"] * 5)
    statics = {"identity": make_mask(demo_model, [3], task="s", model_id="llama"),
               "real": make_mask(demo_model, [1], task="s", model_id="llama")}
    router.params = {"batch_size": 2, "max_length": 16, "kl_positions": 4}
    costs = static_costs(router, statics, cal, Enc(), model, tok)
    g = costs["groups"]
    assert {k: v["inputs"] for k, v in g.items()} == {"0": 3, "1": 2, "fallback": 0}
    assert g["0"]["kl"]["identity"] == pytest.approx(0.0, abs=1e-4)
    assert g["0"]["kl"]["real"] > 1e-3
    assert g["1"]["kl"]["real"] > 1e-3 and g["fallback"]["kl"] == {}
    assert costs["forward_passes"] == 5 * 3  # dense + one per static, per input
    assert choose(costs, ["real", "identity"]) == {"0": "identity", "1": "identity",
                                                  "fallback": "identity"}


# ------------------------------------------------------------------ bench/routing.py's report

@pytest.fixture(scope="module")
def bench_routing():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "routing.py"
    spec = importlib.util.spec_from_file_location("bench_routing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cached_report(out, demo_model, oracle_docs=None):
    """A report directory as `report` leaves it: rows, eval files with per-document results and
    routers (only what the report reads of them), for k = 4, N = 2, fit seeds 0 and 1."""
    import json

    from tabp_vllm.mask import make_mask

    (out / "routers").mkdir(parents=True)
    rng = np.random.default_rng(4)
    n = {"arc_easy": 30, "piqa": 20}
    lm = {"arc_easy": "tabp_arc_easy", "piqa": "tabp_piqa"}

    def mask(removed, attention=()):
        return make_mask(demo_model, removed, task="c", model_id="llama",
                         removed_attention=list(attention)).to_json()

    rows = [{"config": "dense", "k": 0, "n": None, "fit_s": None,
             "accuracy": {t: {"acc": 0.6, "acc_norm": 0.6, "n": n[t]} for t in n}}]

    def add(config, masks, p, clusters, extra=None, docs=None):
        k, nc = 4, len(masks)
        routers = out / "routers" / f"{config.removeprefix('static-')}-k{k}-n{nc}.json"
        routers.write_text(json.dumps({"clusters": [
            {"sizes": {"arc_easy": 10, "piqa": 1} if c == 0 else {"piqa": 9}, "mask": m}
            for c, m in enumerate(masks)]}))
        per_doc = {lm[t]: [{"doc_id": i, "cluster": str(clusters(t, i)),
                            "acc": float(rng.random() < p), "acc_norm": float(rng.random() < p)}
                           for i in range(docs or n[t])] for t in n}
        (out / f"eval-{config}-k{k}-n{nc}.json").write_text(json.dumps(
            {"routed": {"per_document": per_doc}}))
        rows.append({"config": config, "k": k, "n": nc, "fit_s": 1.0, **(extra or {}),
                     "accuracy": {t: {"acc": p, "acc_norm": p, "n": n[t]} for t in n}})

    add("static-sleb", [mask([1, 2, 3, 4])], 0.55, lambda t, i: 0)
    add("static-random", [mask([5, 6, 7, 8])], 0.4, lambda t, i: 0)
    home = lambda t, i: 0 if t == "arc_easy" else (1 if i % 4 else 0)  # noqa: E731
    for seed, config in enumerate(("l0", "l0-s1")):
        add(config, [mask([1, 2, 3, 9]), mask([1, 2, 3, 10])], 0.5, home)
        add("cluster-oracle-" + config, [mask([1, 2, 3, 4]), mask([5, 6, 7, 8])], 0.5, home,
            {"choices": {"0": "static-sleb", "1": "static-random"}}, docs=oracle_docs)
    (out / "routing.json").write_text(json.dumps({
        "rows": rows, "calib": ["arc_easy", "piqa"], "eval": ["arc_easy", "piqa"], "samples": 8,
        "steps": None, "limit": 0, "host": {"model": "test"}}))


def test_report_only_rebuilds_the_seed_sections_from_cached_results(tmp_path, demo_model,
                                                                    bench_routing):
    import json

    _cached_report(tmp_path, demo_model)
    bench_routing.report(["--report-only", "--out", str(tmp_path)])
    md = (tmp_path / "routing.md").read_text()
    assert "## Routed vs the best static mask of equal average removed FLOPs" in md
    assert "## Gap to the oracle: routing vs masks" in md
    summary = json.loads((tmp_path / "routing_summary.json").read_text())
    [rec] = summary["configurations"]
    assert (rec["name"], rec["k"], rec["n"], rec["seeds"], rec["fit_seeds"]) == ("l0", 4, 2, 2, [0, 1])
    # 4 blocks removed by every mask: equal FLOPs, and the best static of them is the more
    # accurate one on the mean over tasks
    assert rec["removed_flops"] == pytest.approx(rec["best_static"]["removed_flops"])
    acc = {s: np.mean([np.mean([d["acc_norm"] for d in json.loads(
        (tmp_path / f"eval-{s}-k4-n1.json").read_text())["routed"]["per_document"][t]])
        for t in ("tabp_arc_easy", "tabp_piqa")]) for s in ("static-sleb", "static-random")}
    assert rec["best_static"]["name"] == max(acc, key=acc.get)
    # piqa's documents 1, 2, 3, 5, ... went to cluster 1 (oracle: random), its home is cluster 1
    # by calibration sizes (9 vs 1): the piqa documents in cluster 0 are the misrouted ones
    gap = rec["gap"]["per_task"]["tabp_piqa"]
    assert gap["misrouted"] == 5 and gap["documents"] == 20
    assert rec["gap"]["per_task"]["tabp_arc_easy"]["misrouted"] == 0
    assert rec["gap"]["mean"]["gap"] == pytest.approx(rec["gap"]["mean"]["routing"]
                                                      + rec["gap"]["mean"]["masks"])
    # the eval oracle: per seed and cluster the static of higher metric on the documents routed
    # there (every task here has its whole split: a document weighs 1 / its task's size)
    runs = {c: json.loads((tmp_path / f"eval-{c}-k4-n{1 if c.startswith('static') else 2}.json")
                          .read_text())["routed"]["per_document"]
            for c in ("static-sleb", "static-random", "l0", "l0-s1")}
    metric = {"tabp_arc_easy": "acc_norm", "tabp_piqa": "acc_norm"}

    def on(static, routed, cluster):
        return sum(runs[static][t][d["doc_id"]][metric[t]] / len(docs)
                   for t, docs in runs[routed].items() for d in docs if d["cluster"] == cluster)
    ev = rec["eval_oracle"]
    assert ev["choices"] == [{c: max(("static-sleb", "static-random"), key=lambda s: on(s, r, c))
                              for c in ("0", "1")} for r in ("l0", "l0-s1")]
    assert ev["accuracy"]["mean"] >= max(acc.values()) - 1e-12
    assert ev["vs"]["mean"]["mean"] == pytest.approx(rec["accuracy"]["mean"] - ev["accuracy"]["mean"])
    assert rec["oracle"]["vs_eval"]["mean"]["mean"] == pytest.approx(
        rec["oracle"]["accuracy"]["mean"] - ev["accuracy"]["mean"])
    assert "| eval-oracle-l0 | 4 | 2 | 2 |" in md and "| cluster-oracle-l0 | 4 | 2 | 2 |" in md


def test_report_only_refuses_runs_of_other_documents(tmp_path, demo_model, bench_routing, capsys):
    _cached_report(tmp_path, demo_model, oracle_docs=12)  # the oracle ran on fewer documents
    with pytest.raises(SystemExit) as e:
        bench_routing.report(["--report-only", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: l0 k=4 N=2") and "different" in err and "\n" not in err


def test_router_calibration_is_the_fits_own_or_refused(demo_model):
    from tabp_vllm.routing.fit import load_calibration
    from tabp_vllm.routing.oracle import router_calibration

    cal = load_calibration(["demo"], "train", 4, 0)
    router = _router(demo_model, [[1, 2]])
    router.provenance = {"data": cal.sources, "data_sha256": cal.data_hash()}
    again = router_calibration(router)
    assert [i for i in again.items] == cal.items and again.tasks == ["demo"] * 4
    router.provenance["data_sha256"] = "0" * 16
    with pytest.raises(TabpError, match="calibration data differ from the router's"):
        router_calibration(router)
    router.provenance = {"seed": 0}
    with pytest.raises(TabpError, match="records no calibration data"):
        router_calibration(router)


def test_oracle_command_bad_input_is_one_line(tmp_path, demo_model, bench_routing, capsys):
    router = _router(demo_model, [[1, 2], [3, 4]]).save(tmp_path / "r.json")
    for argv, says in ((["--router", str(tmp_path / "none.json")], "none.json"),
                       (["--router", str(router), "--static", "nofile"], "give NAME=PATH"),
                       (["--router", str(router), "--static", f"s={router}"],
                        "has 2 clusters, a static mask is an N = 1 router")):
        with pytest.raises(SystemExit) as e:
            bench_routing.oracle(argv + (["--static", "x=y"] if "--static" not in argv else [])
                                 + ["-o", str(tmp_path / "o.json")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and says in err and "\n" not in err


def test_assembled_oracle_reads_each_cluster_static(tmp_path, demo_model, bench_routing):
    import json

    routed = run_of({"t1": [0, 0, 0]}, {"t1": [0, 1, "fallback"]})
    statics = {"A": run_of({"t1": [1, 1, 1]}), "B": run_of({"t1": [0, 1, 0]})}
    got = rr.assembled_oracle(routed, statics, {"0": "A", "1": "B", "fallback": "B"}, "c")
    assert [(d["cluster"], d["acc_norm"]) for d in got["t1"]] == [("0", 1.0), ("1", 1.0),
                                                                  ("fallback", 0.0)]
    with pytest.raises(TabpError, match="no run of static 'C'"):
        rr.assembled_oracle(routed, statics, {"0": "A", "1": "C", "fallback": "A"}, "c")
    # bench: the oracle's eval file assembled from the cached static rows, as `eval --router`
    # writes it (what the report reads of it)
    _cached_report(tmp_path, demo_model)
    path = tmp_path / "eval-cluster-oracle-l0-k4-n2.json"
    path.unlink()
    choices = {"0": "static-sleb", "1": "static-random"}
    bench_routing.assemble_oracle_eval(tmp_path, "l0", 4, 2, choices, path)
    res = json.loads(path.read_text())["routed"]
    static = {s: json.loads((tmp_path / f"eval-{s}-k4-n1.json").read_text())["routed"]["per_document"]
              for s in choices.values()}
    for t, docs in res["per_document"].items():
        for d in docs:
            assert d["acc"] == static[choices[d["cluster"]]][t][d["doc_id"]]["acc"]
        assert res["results"][t]["acc"]["value"] == pytest.approx(np.mean([d["acc"] for d in docs]))
        assert sum(res["cluster_mix"][t].values()) == len(docs)
    assert res["from_statics"] is True


def _fake_commands(demo_model, calls):
    """`run` for the report's loop with every command faked (no fit, no engine): route fit writes
    a router of N masks, oracle one choosing the first static it is given, eval per-document
    results of 12 documents per task."""
    import json
    from pathlib import Path

    from tabp_vllm.mask import make_mask

    def mask(removed):
        return make_mask(demo_model, removed, task="c", model_id="llama").to_json()

    def arg(cmd, flag):
        return Path(cmd[cmd.index(flag) + 1])

    def fake_run(cmd, log):
        calls.append(cmd)
        if "route" in cmd and "fit" in cmd:
            n = int(str(arg(cmd, "--clusters")))
            arg(cmd, "-o").write_text(json.dumps({
                "clusters": [{"sizes": {"arc_easy": 5, "piqa": 1 if n > 1 else 5} if c == 0
                              else {"piqa": 4}, "mask": mask([2, 3, 4, 10 + c])}
                             for c in range(n)],
                "provenance": {"wall_s": 1.0, "forward_passes": 1, "backward_passes": 0}}))
        elif "route" in cmd and "polish" in cmd:  # the gates' router, its masks moved by one
            doc = json.loads(Path(cmd[cmd.index("polish") + 1]).read_text())
            for c in doc["clusters"]:
                c["mask"] = mask([2, 3, 4, 20])
            doc["provenance"]["polish"] = {"wall_s": 0.5, "forward_passes": 7}
            arg(cmd, "-o").write_text(json.dumps(doc))
        elif "oracle" in cmd:
            routed = json.loads(arg(cmd, "--router").read_text())
            statics = dict(cmd[i + 1].split("=", 1) for i, c in enumerate(cmd) if c == "--static")
            assert all(Path(f).exists() for f in statics.values())
            arg(cmd, "-o").write_text(json.dumps({
                "clusters": [{**c, "mask": mask([5, 6, 7, 8])} for c in routed["clusters"]],
                "provenance": {"wall_s": 2.0, "choices": {str(c): sorted(statics)[0] for c in
                                                          range(len(routed["clusters"]))}}}))
        elif "score" in cmd:
            arg(cmd, "-o").write_text(json.dumps({"calibration": {"wall_s": 1.0}}))
        elif "eval" in cmd:
            tasks = str(arg(cmd, "--task")).split(",")
            if "--router" in cmd:
                n = len(json.loads(arg(cmd, "--router").read_text())["clusters"])
                per = {t: [{"doc_id": i, "cluster": str(i % n), "acc": float(i % 3 == 0),
                            "acc_norm": float(i % 2 == 0)} for i in range(12)] for t in tasks}
                res = {"routed": {"per_document": per, "cluster_mix": {t: {} for t in tasks},
                                  "results": {t: {m: {"value": 0.5, "stderr": 0.1, "n": 12}
                                                  for m in ("acc", "acc_norm")} for t in tasks}}}
            else:
                res = {"results": [{"results": {t: {"acc,none": 0.5, "acc_norm,none": 0.5}
                                                for t in tasks},
                                    "n-samples": {t: {"effective": 12} for t in tasks}}]}
            arg(cmd, "-o").write_text(json.dumps(res))
        return 1.0
    return fake_run


# (L0 rows as the gates leave them: the swap rows have their own test)
REPORT_ARGS = ["--calib", "arc_easy,piqa", "--eval", "arc_easy,piqa", "--ks", "4", "--limit", "12",
               "--polishes", "none"]


def test_report_run_builds_an_oracle_for_every_routed_row(tmp_path, demo_model, bench_routing,
                                                          monkeypatch):
    """The report's run loop, every command faked: each routed row (both methods, every N and
    fit seed) gets its per-cluster oracle, built after its k's static masks were evaluated and
    from them; rows carry family and seed; the report has the seed sections; a rerun runs
    nothing."""
    import json

    calls = []
    monkeypatch.setattr(bench_routing, "run", _fake_commands(demo_model, calls))
    argv = ["--out", str(tmp_path), *REPORT_ARGS, "--clusters", "1,2", "--seeds", "0,1",
            "--static-methods", "sleb,random"]
    bench_routing.report(argv)
    doc = json.loads((tmp_path / "routing.json").read_text())
    rows = {(r["config"], r["n"]) for r in doc["rows"]}
    routed = {(c, n) for c in ("l0", "l0-s1", "tabp", "tabp-s1") for n in (1, 2)}
    assert routed <= rows
    assert {("cluster-oracle-" + c, n) for c, n in routed} <= rows
    # every oracle was built after both statics of its k were evaluated
    order = [" ".join(c) for c in calls]
    last_static = max(i for i, c in enumerate(order) if "eval" in c and "sleb-k4-n1" in c
                      or "eval" in c and "random-k4-n1" in c)
    assert all(i > last_static for i, c in enumerate(order) if " oracle " in c)
    # the run's order: the statics, then the L0 rows (the report's subject), then TaBP per
    # cluster: a run stopped by time has the rows that answer the report's question first
    fits = {m: [i for i, c in enumerate(order) if "route fit" in c and f"--mask-method {m}" in c]
            for m in ("sleb", "random", "l0", "tabp")}
    assert max(fits["sleb"] + fits["random"]) < min(fits["l0"])
    assert max(fits["l0"]) < min(fits["tabp"])
    assert sum(" oracle " in c for c in order) == len(routed)
    r = next(r for r in doc["rows"] if r["config"] == "tabp-s1")
    assert (r["family"], r["seed"]) == ("tabp", 1)
    md = (tmp_path / "routing.md").read_text()
    assert "| l0 | 4 | 2 | 2 |" in md and "| tabp | 4 | 1 | 2 |" in md
    calls.clear()
    bench_routing.report(argv)
    assert calls == []


def test_report_run_on_another_model_names_it_everywhere(tmp_path, demo_model, bench_routing,
                                                         monkeypatch, capsys):
    """`--model`: every fit, score and evaluation the report runs names that model, the report
    says which, and an OUT holding another model's rows is refused in one line."""
    import json

    calls = []
    monkeypatch.setattr(bench_routing, "run", _fake_commands(demo_model, calls))
    argv = ["--out", str(tmp_path), *REPORT_ARGS, "--clusters", "1", "--static-methods", "angular"]
    bench_routing.report(["--model", "qwen0.5b", *argv])
    heavy = [c for c in calls if ("route" in c and "fit" in c) or "score" in c or "eval" in c]
    assert {c[c.index("--model") + 1] for c in heavy} == {"qwen0.5b"}
    assert any("eval" in c and "--router" not in c and "--task-mask" not in c for c in heavy)
    assert json.loads((tmp_path / "routing.json").read_text())["model"] == "qwen0.5b"
    assert (tmp_path / "routing.md").read_text().startswith(
        "# Input-guided routing vs static masks (qwen0.5b)")
    with pytest.raises(SystemExit) as e:
        bench_routing.report(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "rows of model 'qwen0.5b', not 'llama'" in err
    assert "\n" not in err


def test_report_run_polishes_the_gates_router_it_has(tmp_path, demo_model, bench_routing,
                                                     monkeypatch):
    """`--polishes none,swap`: the swap row is `route polish` of the same fit's gates-only router
    (no second fit), its fit time the fit's plus the search's; `--polishes swap` alone fits with
    `--polish swap`; the gates-only row asks for `--polish none` (route fit's default is swap)."""
    import json

    calls = []
    monkeypatch.setattr(bench_routing, "run", _fake_commands(demo_model, calls))
    args = ["--calib", "arc_easy,piqa", "--eval", "arc_easy,piqa", "--ks", "4", "--limit", "12",
            "--clusters", "2", "--static-methods", "sleb"]
    bench_routing.report(["--out", str(tmp_path / "both"), *args, "--polishes", "none,swap"])
    order = [" ".join(c) for c in calls]
    l0_fits = [c for c in order if "route fit" in c and "--mask-method l0" in c]
    assert len(l0_fits) == 1 and "--polish none" in l0_fits[0]
    [polish] = [c for c in order if "route polish" in c]
    assert polish.split()[-3].endswith("routers/l0-k4-n2.json") and polish.endswith("l0-swap-k4-n2.json")
    doc = json.loads((tmp_path / "both" / "routing.json").read_text())
    row = next(r for r in doc["rows"] if r["config"] == "l0-swap")
    assert row["fit_s"] == 1.5 and row["polish_s"] == 0.5 and row["polish_forward_passes"] == 7
    assert any(r["config"] == "cluster-oracle-l0-swap" for r in doc["rows"])
    assert "| l0-swap | 4 | 2 |" in (tmp_path / "both" / "routing.md").read_text()
    calls.clear()
    bench_routing.report(["--out", str(tmp_path / "swap"), *args])  # the default: swap alone
    l0_fits = [" ".join(c) for c in calls if "route" in c and "--mask-method" in c
               and c[c.index("--mask-method") + 1] == "l0"]
    assert len(l0_fits) == 1 and "--polish swap" in l0_fits[0]
    assert not any("polish" in c and "route" in c and "fit" not in c for c in calls)
    assert "--kl-positions" not in l0_fits[0]
    # --positions P: the L0 fits' loss over the last P positions, rows named -pP (TaBP's unchanged)
    calls.clear()
    bench_routing.report(["--out", str(tmp_path / "swap"), *args, "--losses", "lm",
                          "--positions", "128"])
    l0_fits = [c for c in calls if "route" in c and "--mask-method" in c
               and c[c.index("--mask-method") + 1] == "l0"]
    assert len(l0_fits) == 1 and l0_fits[0][l0_fits[0].index("--kl-positions") + 1] == "128"
    assert l0_fits[0][-1].endswith("l0-lm-p128-swap-k4-n2.json")
    configs = {r["config"] for r in json.loads((tmp_path / "swap" / "routing.json").read_text())["rows"]}
    assert {"l0-swap", "l0-lm-p128-swap", "tabp"} <= configs


def test_report_run_sublayer_rows_get_sublayer_statics(tmp_path, demo_model, bench_routing,
                                                       monkeypatch):
    """With sublayer rows, each static method is also fitted at sublayer units under the same
    FLOPs budget; a sublayer row's oracle chooses among both kinds of statics, a block row's
    among the block statics only (a sublayer mask misses a k-block budget)."""
    import json

    calls = []
    monkeypatch.setattr(bench_routing, "run", _fake_commands(demo_model, calls))
    bench_routing.report(["--out", str(tmp_path), *REPORT_ARGS, "--clusters", "2",
                          "--units", "blocks,sublayers", "--static-methods", "sleb"])
    fits = [c for c in calls if "fit" in c]
    static_sub = next(c for c in fits if "sleb" in c and "sublayers" in c)
    assert "--flops-ratio" in static_sub and "--k" not in static_sub
    oracles = {c[c.index("--router") + 1].rsplit("/", 1)[1]: sorted(
        c[i + 1].split("=")[0] for i, x in enumerate(c) if x == "--static")
        for c in calls if "oracle" in c}
    assert oracles == {"l0-k4-n2.json": ["static-sleb"], "tabp-k4-n2.json": ["static-sleb"],
                       "l0-sub-k4-n2.json": ["static-sleb", "static-sleb-sub"]}
    # the eval oracle chooses among the same statics as the KL oracle
    summary = json.loads((tmp_path / "routing_summary.json").read_text())["configurations"]
    chosen = {r["name"]: {s for c in r["eval_oracle"]["choices"] for s in c.values()}
              for r in summary}
    assert chosen["l0"] == chosen["tabp"] == {"static-sleb"}
    assert chosen["l0-sub"] <= {"static-sleb", "static-sleb-sub"}


def test_report_run_takes_dense_and_statics_from_an_earlier_report(tmp_path, demo_model,
                                                                   bench_routing, monkeypatch, capsys):
    """`--statics-from DIR`: dense and the static masks come from DIR's report (rows, routers and
    evaluation files copied, nothing refitted or re-evaluated), the routed rows and their oracles
    are fitted on this run's calibration, and the header says whose statics they are and on how
    many inputs; an earlier report of other documents is one line, exit 2."""
    import json

    calls = []
    monkeypatch.setattr(bench_routing, "run", _fake_commands(demo_model, calls))
    first, second = tmp_path / "first", tmp_path / "second"
    common = [*REPORT_ARGS, "--clusters", "2", "--static-methods", "sleb,random"]
    bench_routing.report(["--out", str(first), *common])
    calls.clear()
    bench_routing.report(["--out", str(second), *common, "--samples", "64",
                          "--statics-from", str(first)])
    order = [" ".join(c) for c in calls]
    assert not any("--mask-method sleb" in c or "--mask-method random" in c for c in order)
    assert not any(" eval " in c and "--router" not in c and "--task-mask" not in c for c in order)
    assert any("--mask-method l0" in c and "--samples 64" in c for c in order)
    assert sum(" oracle " in c for c in order) == 2  # l0 and tabp at N = 2, from the copied statics
    doc = json.loads((second / "routing.json").read_text())
    reused = {r["config"] for r in doc["rows"] if r.get("reused_from") == "first"}
    assert reused == {"dense", "static-sleb", "static-random"}
    assert doc["statics_from"] == {"dir": "first", "samples": 32}
    for name in ("eval-static-sleb-k4-n1.json", "routers/sleb-k4-n1.json", "eval-dense-k0-nNone.json"):
        assert (second / name).read_bytes() == (first / name).read_bytes()
    md = (second / "routing.md").read_text()
    assert "Dense and the static masks are the report first's, fitted on 32 inputs per task" in md
    # of other documents: refused before anything runs
    calls.clear()
    with pytest.raises(SystemExit) as e:
        bench_routing.report(["--out", str(tmp_path / "third"), *common, "--limit", "40",
                              "--statics-from", str(first)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "is not this run's" in err and calls == []


def test_objective_section_puts_each_learned_mask_beside_the_best_static(tmp_path, bench_routing):
    """Per L0 cluster: the fit's own KL beside the lowest static KL of its per-cluster oracle's
    costs, and their difference; the fallback (fitted on every input, costed on the few past the
    radius), LM-loss fits (another objective) and rows without an oracle are left out."""
    import json

    (tmp_path / "routers").mkdir()
    fit = {"provenance": {"clusters": [{"cluster": 0, "inputs": 10, "kl": 0.5},
                                       {"cluster": 1, "inputs": 9, "kl": 0.9}],
                          "fallback": {"cluster": "fallback", "inputs": 19, "kl": 0.7}}}
    costs = {"groups": {"0": {"inputs": 10, "kl": {"static-a": 0.6, "static-b": 0.55}},
                        "1": {"inputs": 8, "kl": {"static-a": 0.4, "static-b": 0.45}},
                        "fallback": {"inputs": 1, "kl": {"static-a": 0.1, "static-b": 0.2}}}}
    (tmp_path / "routers" / "l0-k4-n2.json").write_text(json.dumps(fit))
    (tmp_path / "routers" / "cluster-oracle-l0-k4-n2.json").write_text(
        json.dumps({"provenance": {"costs": costs}}))
    (tmp_path / "routers" / "l0-s1-k4-n2.json").write_text(json.dumps(fit))  # no oracle yet
    lm = {"provenance": {"clusters": [dict(c, loss_kind="lm") for c in fit["provenance"]["clusters"]]}}
    (tmp_path / "routers" / "l0-lm-k4-n2.json").write_text(json.dumps(lm))  # not its objective
    (tmp_path / "routers" / "cluster-oracle-l0-lm-k4-n2.json").write_text(
        json.dumps({"provenance": {"costs": costs}}))
    doc = {"rows": [{"config": c, "k": 4, "n": n} for c, n in
                    (("dense", None), ("static-a", 1), ("l0", 2), ("l0-s1", 2), ("l0-lm", 2),
                     ("tabp", 2))]}
    lines = bench_routing.objective_section(doc, tmp_path)
    rows = [ln for ln in lines if ln.startswith("| l0")]
    assert rows == ["| l0 | 4 | 2 | 0 | 10 | 0.500 | b 0.550 | -0.050 |",
                    "| l0 | 4 | 2 | 1 | 9 | 0.900 | a 0.400 | +0.500 |"]
    assert lines[0] == "## The learned masks on their own objective"
    assert bench_routing.objective_section({"rows": doc["rows"][:2]}, tmp_path) == []


def test_prior_section_reads_boolq_answers_from_correctness(tmp_path, bench_routing):
    """BoolQ's yes/no prior: a two-choice answer is the gold when right and the other choice when
    wrong, so each row's share of "yes" follows from its per-document correctness and dense's gold
    labels; r across rows is Pearson's."""
    import json

    gold = [1, 1, 1, 0] * 3  # 9 of 12 "yes": answering yes to all scores 0.75
    samples = [{"doc_id": str(i), "target": str(g), "metrics": repr({"acc": float(g == 0)})}
               for i, g in enumerate(gold)]  # dense answers "no" to everything
    (tmp_path / "eval-dense-k0-nNone.json").write_text(json.dumps(
        {"results": [{"samples": {"tabp_boolq": samples}}]}))

    def routed(config, answers):  # answers: the choice each document got
        per = [{"doc_id": i, "cluster": "0", "acc": float(a == g)}
               for i, (a, g) in enumerate(zip(answers, gold))]
        (tmp_path / f"eval-{config}-k4-n1.json").write_text(json.dumps(
            {"routed": {"per_document": {"tabp_boolq": per}}}))

    routed("static-a", [1] * 12)  # always yes: 0.75
    routed("l0", [1, 0] * 6)  # half yes
    doc = {"eval": ["arc_easy", "boolq"], "rows": [
        {"config": "dense", "k": 0, "n": None}, {"config": "static-a", "k": 4, "n": 1},
        {"config": "l0", "k": 4, "n": 1}, {"config": "static-b", "k": 4, "n": 1}]}  # b: no file
    text = "\n".join(bench_routing.prior_section(doc, tmp_path))
    assert "| dense | 0.000 | 0.2500 |" in text
    assert "| static-a, 4, 1 | 1.000 | 0.7500 |" in text
    # l0: yes on even documents; gold yes on 0, 1, 2 of every 4 -> right on 0, 2 (yes) and 3 (no)
    assert "| l0, 4, 1 | 0.500 | 0.7500 |" in text and "static-b" not in text
    assert "scores 0.750" in text and "these 3 rows: **0.87**" in text
    assert bench_routing.prior_section({**doc, "eval": ["arc_easy"]}, tmp_path) == []
