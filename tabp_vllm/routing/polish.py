"""`tabp-vllm route polish`: the swap search (`swap.py`) on a router already fitted, without
fitting its gates again.

Routers fitted before `route fit --polish swap` existed (or with `--polish none`) hold the gates'
own masks. This reloads the router's calibration inputs from its provenance, puts each in its
nearest centroid's cluster (the fit's k-means labels: checked against each mask's recorded
calibration hash and reported where they differ), rebuilds the fit's objective (its loss, batch,
length and positions, from the router's hyperparameters) and polishes every L0 mask, the fitted
fallback's on all inputs. Each polished mask records its swaps; the router records the search's
cost beside the fit's.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from tabp_vllm.errors import TabpError
from tabp_vllm.mask import TaskMask, parse_mask
from tabp_vllm.routing.options import L0
from tabp_vllm.routing.router import Router


def gate_values(mask: TaskMask, units) -> list[float]:
    """The mask's final log_alpha per candidate unit (the order the search tries swaps in)."""
    if units.kind == "sublayers":
        return [float(mask.params["unit_scores"][str(u)]) for u in units.candidates]
    return [float(mask.scores[b]) for b in units.candidates]


def mask_with(mask: TaskMask, units, removed: list[int], record: dict) -> TaskMask:
    """`mask` removing the units `removed` instead, its params naming the swaps."""
    layers, attention, mlp = units.mask_lists(removed)
    params = {**mask.params, "polish": {key: record[key] for key in ("kind", "swaps")}}
    new = dataclasses.replace(mask, removed_layers=layers, removed_attention=attention,
                              removed_mlp=mlp, params=params)
    return parse_mask(new.to_json(), where=f"polished mask of {mask.task!r}")


def polish_router(router: Router, max_swaps: int, model_and_tokenizer: tuple | None = None,
                  encoder=None, progress: Callable | None = None, where: str = "<router>",
                  calibration=None) -> Router:
    """The router with every L0 mask polished by single swaps on the fit's own loss; the model,
    the encoder and the calibration can be handed in (tests), else loaded as the router says."""
    import numpy as np

    from tabp_vllm.models import resolve_model
    from tabp_vllm.routing.fit import Objective, Units, polish_mask
    from tabp_vllm.routing.oracle import router_calibration
    from tabp_vllm.routing.router import open_encoder, route_text
    from tabp_vllm.scoring import parse_range
    from tabp_vllm.scoring.probe import load_model

    if router.method != L0:
        raise TabpError(f"{where}: its masks come from the scorer {router.method!r}, not from L0 "
                        f"gates: nothing to polish (the search starts from the gates' mask)")
    if any("polish" in m.params for m in router.masks):
        raise TabpError(f"{where}: its masks are polished already")
    if (router.provenance.get("merge") or {}).get("uses_mask_of"):
        # polished one by one, merged clusters would part again: the fit merges after polishing
        raise TabpError(f"{where}: its clusters were merged onto fewer masks (--max-variants): fit "
                        f"it again with --polish swap instead")
    t0 = time.perf_counter()
    hp = router.params
    cal = calibration or router_calibration(router)
    encoder = encoder or open_encoder(router, where)
    nearest = router.nearest(encoder.encode([route_text(i) for i in cal.items]))
    model, tok = model_and_tokenizer or load_model(resolve_model(router.model_id), "cpu")
    units = Units.of(router.units, parse_range(hp["block_range"], router.num_hidden_layers))
    shares = ({u: router.unit_flops[u] for u in units.candidates}
              if router.flops_ratio is not None else None)

    def polish(name: str, mask: TaskMask, idx: list[int]) -> tuple[TaskMask, dict[str, Any], float]:
        obj = Objective(model, tok, [cal.items[i] for i in idx], hp["batch_size"],
                        hp["max_length"], hp["kl_positions"], kind=hp["loss"])
        removed, record = polish_mask(obj, units, units.of_mask(mask), gate_values(mask, units),
                                      shares, max_swaps, progress, name)
        record["forward_passes"] = obj.forward_passes  # the dense reference's passes included
        record["fit_members"] = cal.dataset(idx, "").content_hash() == mask.calibration.get("sha256")
        # the mask's KL to dense on these inputs, as route fit records it (its objective's when
        # the loss is KL; measured for an LM-loss fit)
        kl = (record["loss_after"] if obj.kind == "kl"
              else obj.total(removed, units, "kl") / len(idx))
        return mask_with(mask, units, removed, record), record, round(kl, 6)

    p = router.provenance
    clusters = [dict(r) for r in p.get("clusters") or [{} for _ in router.masks]]
    masks, records = [], []
    for c, mask in enumerate(router.masks):
        idx = [int(i) for i in np.flatnonzero(nearest == c)]
        new, clusters[c]["polish"], clusters[c]["kl"] = polish(f"cluster {c}", mask, idx)
        masks.append(new)
        records.append(clusters[c]["polish"])
    fallback, fallback_record = router.fallback, p.get("fallback")
    if fallback is not None and fallback.source.startswith("fit"):
        if router.num_clusters == 1:  # N = 1: the fallback is the cluster's own mask
            fallback = dataclasses.replace(fallback, mask=masks[0])
        else:
            new, record, kl = polish("fallback", fallback.mask, list(range(len(cal.items))))
            fallback = dataclasses.replace(fallback, mask=new)
            fallback_record = {**(fallback_record or {}), "polish": record, "kl": kl}
            records.append(record)
    provenance = {**p, "clusters": clusters, "fallback": fallback_record,
                  "polish": {"command": "route polish", "max_swaps": max_swaps,
                             "wall_s": round(time.perf_counter() - t0, 3),
                             "forward_passes": sum(r["forward_passes"] for r in records)}}
    params = {**hp, "polish": "swap", "max_swaps": max_swaps}
    return dataclasses.replace(router, masks=masks, fallback=fallback, provenance=provenance,
                               params=params)
