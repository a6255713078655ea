"""The per-cluster oracle of a fitted router: each cluster (and the fallback) served by the static
mask that is best on that cluster's own calibration inputs, everything else (centroids, fallback
radius, encoder, budget) the router's own, so that documents route exactly as they do under it.

    cal = router_calibration(router)                                  # the fit's inputs, checked
    costs = static_costs(router, statics, cal, encoder, model, tok)   # forward passes
    oracle = oracle_router(router, statics, costs)                    # pure: a valid router

"Best" is the lowest KL(dense || masked) over the next-token distributions of the group's inputs,
the measure `route fit` trains its gates on (the same texts, positions and lengths, from the
router's own hyperparameters) and records per cluster: one forward pass per input per static mask
plus one dense, where accuracy on the calibration items would need every choice scored and
gives one bit per item. A cluster's inputs are the calibration inputs the router itself sends it
(`Router.assign`: the nearest centroid, the fallback past its radius): the partition the oracle's
documents will see. A group with no input (a fallback no calibration input reaches) takes the
mask best on all the inputs.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from typing import Any

from tabp_vllm.errors import TabpError
from tabp_vllm.mask import TaskMask
from tabp_vllm.routing.router import FALLBACK, Router

MEASURE = "kl"


def group_name(group: int) -> str:
    return "fallback" if group == FALLBACK else str(group)


def router_calibration(router: Router):
    """The calibration inputs the router was fitted on, reloaded from its provenance (tasks,
    split, samples, seed) and checked against the hash it records."""
    from tabp_vllm.routing.fit import load_calibration

    p = router.provenance
    data = p.get("data") or []
    if not data or not p.get("data_sha256"):
        raise TabpError("the router records no calibration data (provenance.data): it was not "
                        "made by `route fit`")
    seeds = {d.get("seed") for d in data}
    samples = {d.get("samples") for d in data}
    if len(seeds) != 1 or len(samples) != 1:
        raise TabpError("the router's calibration tasks differ in seed or samples: not a "
                        "`route fit` calibration set")
    cal = load_calibration([d["data"] for d in data], data[0]["split"], samples.pop(), seeds.pop())
    if cal.data_hash() != p["data_sha256"]:
        raise TabpError(f"the calibration data differ from the router's (sha256 "
                        f"{cal.data_hash()} != {p['data_sha256']}): the task files changed")
    return cal


def calibration_groups(router: Router, cal, encoder) -> dict[int, list[int]]:
    """Per cluster (and FALLBACK when the router has one), the calibration inputs it serves."""
    from tabp_vllm.routing.router import route_text

    assigned = router.assign(encoder.encode([route_text(i) for i in cal.items]))
    groups = list(range(router.num_clusters)) + ([FALLBACK] if router.fallback else [])
    return {g: [i for i, a in enumerate(assigned) if int(a) == g] for g in groups}


def mask_kl(objective, mask: TaskMask) -> float:
    """Summed per-input KL to the dense model with `mask`'s units left out."""
    from tabp_vllm.routing.fit import Units
    from tabp_vllm.sublayers import mask_units

    if mask.is_sublayer:
        return objective.total_kl(mask_units(mask.removed_layers, mask.removed_attention,
                                             mask.removed_mlp), Units("sublayers", []))
    return objective.total_kl(mask.removed_layers, Units("blocks", []))


def static_costs(router: Router, statics: dict[str, TaskMask], cal, encoder, model, tokenizer
                 ) -> dict[str, Any]:
    """Each static mask's mean KL on each group's calibration inputs: {"groups": {name: {"inputs":
    n, "kl": {static: mean}}}, "forward_passes", "wall_s"}."""
    from tabp_vllm.routing.fit import Objective

    t0 = time.perf_counter()
    hp = router.params
    groups, forward = {}, 0
    for g, idx in calibration_groups(router, cal, encoder).items():
        kl = {}
        if idx:
            obj = Objective(model, tokenizer, [cal.items[i] for i in idx],
                            int(hp.get("batch_size", 8)), int(hp.get("max_length", 128)),
                            int(hp.get("kl_positions", 32)))
            kl = {name: mask_kl(obj, m) / len(idx) for name, m in statics.items()}
            forward += obj.forward_passes
        groups[group_name(g)] = {"inputs": len(idx), "kl": kl}
    return {"groups": groups, "forward_passes": forward,
            "wall_s": round(time.perf_counter() - t0, 3)}


def choose(costs: dict[str, Any], names: list[str]) -> dict[str, str]:
    """Per group, the static of lowest mean KL on its inputs (ties: the first in `names`); a group
    without inputs takes the static of lowest KL over all inputs."""
    groups = costs["groups"]
    total = {s: sum(g["inputs"] * g["kl"][s] for g in groups.values() if g["inputs"]) for s in names}
    overall = min(names, key=lambda s: (total[s], names.index(s)))
    return {g: (min(names, key=lambda s: (rec["kl"][s], names.index(s))) if rec["inputs"]
                else overall) for g, rec in groups.items()}


def oracle_router(router: Router, statics: dict[str, TaskMask], costs: dict[str, Any]) -> Router:
    """The router with every cluster's (and the fallback's) mask replaced by its chosen static.
    Statics with equal masks count once (the first name), so equal masks have one name."""
    if not statics:
        raise TabpError("no static mask to choose from")
    distinct: dict[tuple, str] = {}
    for name, m in statics.items():
        if m.fingerprint != router.fingerprint:
            raise TabpError(f"static {name}: made for another model than the router")
        fault = router.budget_fault(m)
        if fault:
            raise TabpError(f"static {name}: {fault}: the oracle must meet the router's budget")
        distinct.setdefault((tuple(m.removed_layers), tuple(m.removed_attention),
                             tuple(m.removed_mlp)), name)
    names = list(distinct.values())
    want = [group_name(c) for c in range(router.num_clusters)] + (
        ["fallback"] if router.fallback else [])
    if sorted(costs["groups"]) != sorted(want) or any(
            not set(names) <= set(g["kl"]) for g in costs["groups"].values() if g["inputs"]):
        raise TabpError("the costs are not of this router's groups and these statics")
    choice = choose(costs, names)
    fallback = None
    if router.fallback:
        fallback = dataclasses.replace(router.fallback, mask=statics[choice["fallback"]],
                                       source=f"oracle: static {choice['fallback']}")
    p = router.provenance
    return dataclasses.replace(
        router, masks=[statics[choice[group_name(c)]] for c in range(router.num_clusters)],
        fallback=fallback, method="oracle",
        params={"measure": MEASURE, "statics": names, "of_method": router.method,
                "of_params": router.params},
        provenance={"oracle_of": router.content_hash(), "choices": choice, "costs": costs,
                    **{key: p.get(key) for key in ("data", "data_sha256", "seed", "samples")}},
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), curves=[])
