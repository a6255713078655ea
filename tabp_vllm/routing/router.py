"""The router file: which block mask each input gets, and routing an input to it.

A router is JSON, versioned and self-describing like the mask file (`mask.py`), which it embeds:

    {"format": "tabp-vllm-router", "version": 1,
     "model": {"id", "fingerprint"}, "num_hidden_layers",
     "budget": "units", "k",                       # each mask removes k units (older files: no
                                                   # "budget"), or
     "budget": "flops", "flops_ratio", "unit_flops",  # units until their FLOPs reach flops_ratio
     "encoder": {"name", "id", "source", "dimension", "pooling", "normalize", "max_length"},
     "clusters": [{"centroid": [...], "sizes": {task: n}, "mask": <TaskMask.to_json()>}, ...],
     "fallback": {"radius", "quantile", "source", "mask"},   # optional (older files: none)
     "method": {"name", "params"},       # l0 or a registered scorer; every hyperparameter
     "provenance": {...},                # data (per task and one hash), seed, wall time, passes
     "created_at"}

An input goes to the cluster of the nearest centroid (Euclidean, as k-means assigned the
calibration inputs), unless it is farther than the fallback radius from every centroid: then it
takes the fallback mask (cluster index FALLBACK). Clusters whose masks are equal share one served
variant. A FLOPs budget's masks remove different numbers of units: each must reach flops_ratio of
the dense FLOPs (`unit_flops`: each unit's share, per block or per sublayer unit as `units` says)
and need the units it removes (without its most expensive one it would fall short), as the cut
rule (`scoring/units.py: Budget.take`) gives. Every check happens
when the file is read, before anything starts, and fails with one `RouterError` line.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tabp_vllm.data import MCQAItem, TextItem, mcqa_context
from tabp_vllm.errors import TabpError, first_line
from tabp_vllm.mask import MaskError, TaskMask, check_envelope, parse_mask, read_json_artefact
from tabp_vllm.models import (FINGERPRINT_KEYS, fingerprint_diffs, load_model_config,
                              model_fingerprint, save_json_atomically)

ROUTER_FORMAT = "tabp-vllm-router"
ROUTER_VERSION = 1
ENCODER_KEYS = ("name", "id", "dimension", "pooling", "normalize")
UNITS = ("blocks", "sublayers")
FALLBACK = -1  # the "cluster" of an input far from every centroid: it takes the fallback mask


@dataclass
class Fallback:
    """Inputs farther than `radius` from every centroid take `mask` (the static mask)."""

    radius: float  # the `quantile` of the calibration inputs' nearest-centroid distances
    quantile: float
    source: str  # how the mask was made: fitted on every input (N = 1), or a given file
    mask: TaskMask
    # held-out: each calibration input against its cluster's mean without it (`route fit`);
    # in-sample: against the mean it is part of (routers written before; `route radius` renews)
    radius_kind: str = "held-out"

    def to_json(self) -> dict[str, Any]:
        return {"radius": self.radius, "quantile": self.quantile, "radius_kind": self.radius_kind,
                "source": self.source, "mask": self.mask.to_json()}


class RouterError(TabpError):
    """A router file that cannot be used: one line naming the file and the fault."""


def route_text(item: MCQAItem | TextItem) -> str:
    """What an input is routed by: the prompt a request would carry, never its answer. MCQA: the
    context and question as the evaluation prompts it; free text: everything before its last
    '\\nAnswer:' (GSM8K's worked answer), the whole text when there is none."""
    if isinstance(item, MCQAItem):
        return mcqa_context(item)
    head, sep, _ = item.text.rpartition("\nAnswer:")
    return head + sep if sep else item.text


BUDGETS = ("units", "flops")
RADIUS_KINDS = ("held-out", "in-sample")


@dataclass
class Router:
    model_id: str
    fingerprint: dict[str, Any]
    k: int | None  # units per mask; None under a FLOPs budget
    encoder: dict[str, Any]
    centroids: list[list[float]]
    masks: list[TaskMask]  # one per cluster
    sizes: list[dict[str, int]]  # per cluster: calibration inputs per source task
    method: str = "l0"
    params: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    fallback: Fallback | None = None
    units: str = "blocks"  # what k counts: whole blocks, or sublayers (2i attention, 2i+1 MLP)
    flops_ratio: float | None = None  # a FLOPs budget: the share of the dense FLOPs each mask removes
    unit_flops: list[float] = field(default_factory=list)  # with it: each unit's FLOPs share
    # the fit's per-step curves (`route fit` writes them beside the router; not in the file)
    curves: list[dict[str, Any]] = field(default_factory=list, repr=False, compare=False)

    @property
    def num_clusters(self) -> int:
        return len(self.centroids)

    @property
    def num_hidden_layers(self) -> int:
        return int(self.fingerprint["num_hidden_layers"])

    @property
    def dimension(self) -> int:
        return int(self.encoder["dimension"])

    @property
    def budget(self) -> str:
        return "units" if self.flops_ratio is None else "flops"

    def budget_text(self) -> str:
        """"k = 4 blocks", or "FLOPs 0.107 (sublayers)"."""
        if self.flops_ratio is None:
            return f"k = {self.k} {self.units}"
        return f"FLOPs {self.flops_ratio:g} ({self.units})"

    def budget_fault(self, mask: TaskMask) -> str | None:
        """Why `mask` does not meet the router's budget (None when it does)."""
        return budget_fault(mask, self.units, self.k, self.flops_ratio, self.unit_flops)

    def variants(self) -> list[tuple[TaskMask, list[int]]]:
        """The distinct masks (one served variant each) and the clusters that use each, in order
        of first use; the fallback mask's "cluster" is FALLBACK (last)."""
        seen: dict[str, tuple[TaskMask, list[int]]] = {}
        for c, m in enumerate(self.masks):
            seen.setdefault(m.content_hash(), (m, []))[1].append(c)
        if self.fallback is not None:
            seen.setdefault(self.fallback.mask.content_hash(), (self.fallback.mask, []))[1].append(FALLBACK)
        return list(seen.values())

    def mask_of(self, cluster: int) -> TaskMask:
        return self.fallback.mask if cluster == FALLBACK and self.fallback else self.masks[cluster]

    def _distances2(self, vectors: np.ndarray) -> np.ndarray:
        v = np.asarray(vectors, dtype=np.float64).reshape(-1, self.dimension)
        c = np.asarray(self.centroids, dtype=np.float64)
        return np.maximum((v * v).sum(1)[:, None] - 2.0 * v @ c.T + (c * c).sum(1)[None, :], 0.0)

    def nearest(self, vectors: np.ndarray) -> np.ndarray:
        """The cluster of each row of `vectors` (n, dimension): its nearest centroid."""
        return self._distances2(vectors).argmin(1)

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        """What serves each row of `vectors`: its nearest centroid's cluster, or FALLBACK when it
        is farther than the fallback radius from every centroid (no fallback: always nearest)."""
        d2 = self._distances2(vectors)
        out = d2.argmin(1)
        if self.fallback is not None:
            out = np.where(np.sqrt(d2.min(1)) > self.fallback.radius, FALLBACK, out)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": ROUTER_FORMAT,
            "version": ROUTER_VERSION,
            "model": {"id": self.model_id, "fingerprint": self.fingerprint},
            "num_hidden_layers": self.num_hidden_layers,
            "budget": self.budget,
            **({"k": self.k} if self.flops_ratio is None else
               {"flops_ratio": self.flops_ratio, "unit_flops": list(self.unit_flops)}),
            **({"units": self.units} if self.units != "blocks" else {}),
            "encoder": self.encoder,
            "clusters": [{"centroid": [float(x) for x in cen], "sizes": sizes, "mask": m.to_json()}
                         for cen, sizes, m in zip(self.centroids, self.sizes, self.masks)],
            **({"fallback": self.fallback.to_json()} if self.fallback else {}),
            "method": {"name": self.method, "params": self.params},
            "provenance": self.provenance,
            "created_at": self.created_at,
        }

    def content_hash(self) -> str:
        """Short hash of what decides routing and serving: model, encoder, centroids, masks."""
        parts = [self.fingerprint, [self.encoder.get(k) for k in ENCODER_KEYS], self.centroids,
                 [m.removed_layers for m in self.masks]]
        if self.units != "blocks":  # (block routers keep their hash)
            parts.append([[m.removed_attention, m.removed_mlp] for m in self.masks])
        if self.fallback is not None:  # (routers without one keep their hash)
            parts.append([self.fallback.radius, self.fallback.mask.removed_layers])
        key = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        parse_router(self.to_json(), str(path))  # never write a router we would refuse to read
        return save_json_atomically(path, self.to_json())

    def check_model(self, model_config: dict[str, Any], model_name: str, where: str) -> None:
        """Refuse a router made for a different model."""
        actual = model_fingerprint(model_config)
        diffs = fingerprint_diffs(self.fingerprint, actual)
        if diffs:
            raise RouterError(f"{where}: router was made for model {self.model_id!r}, not "
                              f"{model_name!r} ({'; '.join(diffs)})")


def _fail(where: str, msg: str) -> RouterError:
    return RouterError(f"{where}: {msg}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_router(data: Any, where: str = "<router>") -> Router:
    """Validate a decoded router document and build a Router; raise RouterError on any fault."""
    fp, n = check_envelope(data, where, ROUTER_FORMAT, ROUTER_VERSION, "router", _fail)
    units = data.get("units", "blocks")  # routers before sublayer units: blocks
    if units not in UNITS:
        raise _fail(where, f"'units' must be one of {', '.join(UNITS)} (got {units!r})")
    most = n if units == "blocks" else 2 * n
    budget = data.get("budget", "units")  # routers before FLOPs budgets: k units
    if budget not in BUDGETS:
        raise _fail(where, f"'budget' must be one of {', '.join(BUDGETS)} (got {budget!r})")
    k, flops_ratio, unit_flops = None, None, []
    if budget == "units":
        k = data.get("k")
        if not _is_int(k) or not 0 < k < most:
            raise _fail(where, f"'k' must be a {units[:-1]} count between 1 and {most - 1} (got {k!r})")
    else:
        flops_ratio, unit_flops = data.get("flops_ratio"), data.get("unit_flops")
        if not _is_number(flops_ratio) or not 0 < flops_ratio < 1:
            raise _fail(where, f"'flops_ratio' must be a number between 0 and 1 (got {flops_ratio!r})")
        if not isinstance(unit_flops, list) or len(unit_flops) != most or not all(
                _is_number(x) and x >= 0 for x in unit_flops):
            raise _fail(where, f"'unit_flops' must list {most} FLOPs shares >= 0, one per "
                               f"{units[:-1]}")
    enc = data.get("encoder")
    if not isinstance(enc, dict):
        raise _fail(where, "missing 'encoder'")
    lacks = [key for key in ENCODER_KEYS if key not in enc]
    if lacks:
        raise _fail(where, f"encoder record lacks {', '.join(lacks)}")
    dim = enc["dimension"]
    if not _is_int(dim) or dim <= 0:
        raise _fail(where, f"encoder dimension {dim!r} is not a positive integer")
    clusters = data.get("clusters")
    if not isinstance(clusters, list) or not clusters:
        raise _fail(where, "'clusters' must be a non-empty list")
    centroids, masks, sizes = [], [], []
    for c, cl in enumerate(clusters):
        if not isinstance(cl, dict):
            raise _fail(where, f"cluster {c} is not an object")
        cen = cl.get("centroid")
        if not isinstance(cen, list) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                for x in cen):
            raise _fail(where, f"cluster {c}: centroid must be a list of finite numbers")
        if len(cen) != dim:
            raise _fail(where, f"cluster {c}: centroid has dimension {len(cen)}, the encoder "
                               f"{enc['id']!r} gives {dim}")
        size = cl.get("sizes")
        if not isinstance(size, dict) or not all(_is_int(v) and v >= 0 for v in size.values()):
            raise _fail(where, f"cluster {c}: 'sizes' must map task names to counts")
        try:
            mask = parse_mask(cl.get("mask"), f"{where}: cluster {c} mask")
        except MaskError as exc:
            raise RouterError(str(exc)) from None
        _check_cluster_mask(mask, where, f"cluster {c}", fp, k, units, flops_ratio, unit_flops)
        centroids.append([float(x) for x in cen])
        masks.append(mask)
        sizes.append({str(t): int(v) for t, v in size.items()})
    fallback = _parse_fallback(data.get("fallback"), where, fp, k, units, flops_ratio, unit_flops)
    method = data.get("method") or {}
    return Router(model_id=str(data["model"].get("id", "")),
                  fingerprint={key: fp[key] for key in FINGERPRINT_KEYS}, k=k, encoder=dict(enc),
                  centroids=centroids, masks=masks, sizes=sizes,
                  method=str(method.get("name", "")), params=dict(method.get("params") or {}),
                  provenance=dict(data.get("provenance") or {}),
                  created_at=str(data.get("created_at", "")), fallback=fallback, units=units,
                  flops_ratio=None if flops_ratio is None else float(flops_ratio),
                  unit_flops=[float(x) for x in unit_flops])


def removed_units(mask: TaskMask, units: str) -> int:
    """How many units `mask` removes, counted as a router of `units` counts them (a sublayer mask
    in a block router: -1, never equal to k)."""
    from tabp_vllm.sublayers import mask_units

    if units == "sublayers":
        return len(mask_units(mask.removed_layers, mask.removed_attention, mask.removed_mlp))
    return -1 if mask.is_sublayer else len(mask.removed_layers)


def budget_fault(mask: TaskMask, units: str, k: int | None, flops_ratio: float | None = None,
                 unit_flops: list[float] | None = None) -> str | None:
    """Why `mask` does not meet a router's budget, or None: k `units` exactly, or (`flops_ratio`
    given) units whose FLOPs shares (`unit_flops`, per block or per sublayer unit) reach it, and
    none more than needed. The cut is the shortest prefix of the gates' order that reaches it
    (`Budget.take`): without its last unit it falls short, so without its most expensive unit it
    does too (the order itself is not in the file; this is what can be checked without it)."""
    from tabp_vllm.scoring.units import Budget
    from tabp_vllm.sublayers import mask_units

    got = removed_units(mask, units)
    if flops_ratio is None:
        what = "removes sublayers" if got < 0 else f"removes {got} {units}"
        return None if got == k else f"mask {what}, the router's k is {k} {units}"
    if got < 0:
        return "mask removes sublayers, the router's units are blocks"
    removed = mask.removed_layers if units == "blocks" else mask_units(
        mask.removed_layers, mask.removed_attention, mask.removed_mlp)
    # the rule that cut the mask (Budget.take stops at the first prefix that `met`), its tolerance
    budget = Budget(flops_ratio=flops_ratio, shares=tuple(unit_flops))
    share = budget.removed_flops(removed)
    if not budget.met(removed):
        return (f"mask removes {share:.4f} of the FLOPs, short of the router's FLOPs budget "
                f"{flops_ratio:g}")
    if removed and budget.met(sorted(removed, key=lambda u: unit_flops[u])[:-1]):
        return (f"mask removes {share:.4f} of the FLOPs, more units than the router's FLOPs "
                f"budget {flops_ratio:g} needs")
    return None


def _check_cluster_mask(mask: TaskMask, where: str, name: str, fp: dict, k: int | None,
                        units: str = "blocks", flops_ratio: float | None = None,
                        unit_flops: list[float] | None = None) -> None:
    if mask.fingerprint != {key: fp[key] for key in FINGERPRINT_KEYS}:
        raise _fail(where, f"{name}: mask was made for another model than the router "
                           f"({mask.fingerprint} != {fp})")
    fault = budget_fault(mask, units, k, flops_ratio, unit_flops)
    if fault:
        raise _fail(where, f"{name}: {fault}")


def _parse_fallback(doc: Any, where: str, fp: dict, k: int | None, units: str,
                    flops_ratio: float | None = None,
                    unit_flops: list[float] | None = None) -> Fallback | None:
    """The optional fallback record (routers written before it have none)."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise _fail(where, "'fallback' must be an object")
    radius, quantile = doc.get("radius"), doc.get("quantile")
    if not isinstance(radius, (int, float)) or isinstance(radius, bool) or not math.isfinite(radius) \
            or radius < 0:
        raise _fail(where, f"fallback radius must be a finite number >= 0 (got {radius!r})")
    try:
        mask = parse_mask(doc.get("mask"), f"{where}: fallback mask")
    except MaskError as exc:
        raise RouterError(str(exc)) from None
    _check_cluster_mask(mask, where, "fallback", fp, k, units, flops_ratio, unit_flops)
    kind = doc.get("radius_kind", "in-sample")
    if kind not in RADIUS_KINDS:
        raise _fail(where, f"fallback radius_kind must be one of {', '.join(RADIUS_KINDS)} (got {kind!r})")
    return Fallback(radius=float(radius), quantile=float(quantile or 0.0),
                    source=str(doc.get("source", "")), mask=mask, radius_kind=kind)


def _read_json(path: Path) -> Any:
    return read_json_artefact(path, "router", _fail)


def is_router_file(path: str | Path) -> bool:
    """Whether `path` holds a router document (by its format field); False for anything else,
    which the mask reader then reports."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == ROUTER_FORMAT


def open_encoder(router: Router, where: str = "<router>", model_and_tokenizer: tuple | None = None,
                 model_path: str | None = None):
    """The router's encoder, loaded, with the dimension its centroids were made in; one line if it
    cannot be loaded or does not match. `self` uses the given model and tokenizer, or loads the
    model (`model_path`, else the router's model id) with transformers."""
    from tabp_vllm.routing.encoder import SELF, load_encoder

    name = router.encoder["name"]
    try:
        if name == SELF and model_and_tokenizer is None:
            from tabp_vllm.models import resolve_model
            from tabp_vllm.scoring.probe import load_model

            model_and_tokenizer = load_model(model_path or resolve_model(router.model_id), "cpu")
        enc = load_encoder(name, model_and_tokenizer=model_and_tokenizer, model_id=router.model_id)
    except TabpError as exc:
        raise _fail(where, f"encoder cannot be loaded: {exc}") from None
    except OSError as exc:  # transformers: no checkpoint at the path
        raise _fail(where, f"encoder cannot be loaded: {first_line(exc)}") from None
    if enc.dimension != router.dimension:
        raise _fail(where, f"encoder {name!r} gives {enc.dimension}-d vectors, the router's "
                           f"centroids are {router.dimension}-d")
    return enc


def load_router(path: str | Path, model: str | None = None, *, check_encoder: bool = False) -> Router:
    """Read and validate a router file; with `model` (a resolved checkpoint), check it fits; with
    `check_encoder`, check its encoder loads and gives vectors of the centroids' dimension (for
    `self`: the model's hidden size, read from its config, no weights loaded)."""
    path = Path(path)
    where = str(path)
    router = parse_router(_read_json(path), where)
    if model is not None:
        router.check_model(load_model_config(model), model, where)
    if check_encoder:
        from tabp_vllm.routing.encoder import SELF

        if router.encoder["name"] != SELF:
            open_encoder(router, where)
        else:
            try:
                from tabp_vllm.models import resolve_model

                config = load_model_config(model or resolve_model(router.model_id))
            except TabpError as exc:
                raise _fail(where, f"encoder 'self' cannot be loaded: {exc}") from None
            hidden = model_fingerprint(config)["hidden_size"]
            if hidden != router.dimension:
                raise _fail(where, f"encoder 'self' gives {hidden}-d vectors (the model's hidden "
                                   f"size), the router's centroids are {router.dimension}-d")
    return router


def route_input(router: Router, text: str | list[str], encoder=None) -> int | list[int]:
    """The cluster index of `text` (or of each text of a list): its nearest centroid."""
    texts = [text] if isinstance(text, str) else list(text)
    enc = encoder if encoder is not None else open_encoder(router)
    idx = [int(i) for i in router.nearest(enc.encode(texts))]
    return idx[0] if isinstance(text, str) else idx


# --------------------------------------------------------------------------- merging

def merge_variants(cost: list[list[float]], masks: list[list[int]], max_variants: int) -> list[int]:
    """Clusters onto at most `max_variants` distinct masks, losing the least: `cost[c][d]` is the
    loss of cluster c's inputs under cluster d's mask (size-weighted; the fit uses the summed KL to
    the dense model); `masks[c]` is cluster c's own mask (equal masks already share a variant).
    Greedy: merge the two groups whose union, under the better of their two masks, adds the least
    cost, until few enough remain. Returns, per cluster, the cluster whose mask it now uses."""
    n = len(masks)
    if max_variants < 1:
        raise TabpError(f"--max-variants {max_variants}: must be at least 1")
    owner: dict[tuple[int, ...], int] = {}
    groups: list[tuple[int, list[int]]] = []  # (cluster whose mask the group uses, its clusters)
    for c in range(n):
        key = tuple(sorted(masks[c]))
        if key in owner:
            groups[owner[key]][1].append(c)
        else:
            owner[key] = len(groups)
            groups.append((c, [c]))

    def group_cost(mask_of: int, members: list[int]) -> float:
        return sum(cost[c][mask_of] for c in members)

    while len(groups) > max_variants:
        best = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                members = groups[a][1] + groups[b][1]
                now = group_cost(*groups[a]) + group_cost(*groups[b])
                for m in (groups[a][0], groups[b][0]):
                    extra = group_cost(m, members) - now
                    if best is None or extra < best[0] - 1e-12:
                        best = (extra, a, b, m)
        _, a, b, m = best
        merged = (m, sorted(groups[a][1] + groups[b][1]))
        groups = [g for i, g in enumerate(groups) if i not in (a, b)] + [merged]
        groups.sort(key=lambda g: g[1][0])
    uses = [0] * n
    for m, members in groups:
        for c in members:
            uses[c] = m
    return uses


# --------------------------------------------------------------------------- masks show / validate

def show_router(path: Path, as_json: bool, console) -> None:
    """`tabp-vllm masks show` of a router file: the encoder, then one row per cluster."""
    from rich.table import Table

    router = load_router(path)
    if as_json:
        print(json.dumps(router.to_json(), indent=2))
        return
    enc = router.encoder
    prov = router.provenance
    console.print(
        f"[bold]{path}[/]  router  model={router.model_id}  method={router.method}  "
        f"{router.budget_text()}  {router.num_clusters} clusters  {len(router.variants())} variants  "
        f"hash={router.content_hash()}")
    console.print(f"encoder: {enc['id']} ({enc['dimension']}-d, pooling {enc['pooling']}, "
                  f"normalize {enc['normalize']})")
    if prov:
        keys = ("data_sha256", "seed", "samples", "wall_s", "forward_passes", "backward_passes")
        console.print("provenance: " + ", ".join(f"{k}={prov[k]}" for k in keys if k in prov))
    if router.params:
        console.print("params: " + ", ".join(f"{k}={v}" for k, v in router.params.items()))
    table = Table("cluster", "inputs per task", "removed", "variant (mask hash)", "fit")
    fits = prov.get("clusters") or []
    for c, (m, sizes) in enumerate(zip(router.masks, router.sizes)):
        table.add_row(str(c), ", ".join(f"{t} {v}" for t, v in sizes.items() if v),
                      removed_text(m), m.content_hash(), fit_summary(fits[c] if c < len(fits) else {}))
    if router.fallback is not None:
        fb = router.fallback
        table.add_row(f"fallback (> {fb.radius:.3f})", fb.source, removed_text(fb.mask),
                      fb.mask.content_hash(), fit_summary(prov.get("fallback") or {}))
    console.print(table)
    if prov.get("not_converged"):
        console.print(f"[yellow]warning: the L0 fit did not converge for cluster(s) "
                      f"{', '.join(map(str, prov['not_converged']))}")


def removed_text(mask: TaskMask) -> str:
    """A mask's removed blocks, and its removed sublayers when it has any."""
    text = str(mask.removed_layers)
    if mask.is_sublayer:
        text += f" attention {mask.removed_attention} mlp {mask.removed_mlp}"
    return text


def fit_summary(record: dict[str, Any]) -> str:
    """One cell of a cluster's L0 fit record: steps, convergence, sparsity vs target, cost."""
    if "converged" not in record:
        return "-"
    state = "converged" if record["converged"] else f"NOT converged ({', '.join(record.get('unmet', []))})"
    what = "FLOPs" if record.get("budget") == "flops" else "s"  # the constrained share
    return (f"{state}, {record['steps']} steps, {what} {record['expected_sparsity']:.3f}/"
            f"{record['target']:.3f}, {record.get('loss_kind', 'kl')} {record['loss']:.3f}, "
            f"{record.get('wall_s', 0):.0f} s, {record.get('forward_passes', 0)} fwd + "
            f"{record.get('backward_passes', 0)} bwd" + resumed_summary(record.get("resumed"))
            + polish_summary(record.get("polish")))


def resumed_summary(resumed: dict[str, Any] | None) -> str:
    """A resumed fit's part of a fit cell: where it went on from (its time counts both runs)."""
    if not resumed:
        return ""
    return f" (resumed at step {resumed['from_step']} after {resumed['earlier_wall_s']:.0f} s)"


def polish_summary(polish: dict[str, Any] | None) -> str:
    """The swap search's part of a fit cell: swaps made and the loss they took off."""
    if not polish:
        return ""
    end = "" if polish["local_optimum"] else f", stopped at {len(polish['swaps'])} swaps"
    return (f"; swaps {len(polish['swaps'])}: {polish['loss']} {polish['loss_before']:.3f} -> "
            f"{polish['loss_after']:.3f} ({polish['evaluations']} masks measured, "
            f"{polish['wall_s']:.0f} s{end})")


def validate_router_file(path: Path, model: str | None) -> str:
    """`tabp-vllm masks validate` of a router file: every check, the encoder loaded; the ok line."""
    router = load_router(path, model, check_encoder=True)
    units = "blocks" if router.units == "blocks" else f"sublayers (of {2 * router.num_hidden_layers})"
    budget = (f"k = {router.k} {units}" if router.flops_ratio is None
              else f"FLOPs {router.flops_ratio:g} in {units}")
    return (f"ok: {path} (router: {router.num_clusters} clusters, {len(router.variants())} "
            f"distinct masks of {budget} of {router.num_hidden_layers} blocks, encoder "
            f"{router.encoder['id']} {router.dimension}-d)")
