"""A `serve` invocation resolved: the variants (dense + one per mask, and a router's) from
`ServeOptions`, each mask validated against the model, named, and what they need in memory.

Everything here runs in the driver, before Ray starts: a bad mask or option fails with one line
(`TabpError`) and no process has been spawned yet. How the variants run on Ray is `deploy.py`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tabp_vllm.errors import TabpError
from tabp_vllm.flops import Kept
from tabp_vllm.memory import (CPU_KV_BLOCK_SIZE, DEFAULT_CPU_KV_CACHE_GIB, GPU_KV_BLOCK_SIZE, GiB,
                              EngineNeed, cpu_memory_estimate, engine_needs, kv_cache_tokens)
from tabp_vllm.serve.options import EngineOptions, RequestPathOptions, ServeOptions

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


@dataclass
class Variant:
    """One served model: the dense checkpoint or the checkpoint with a mask's blocks removed."""

    name: str
    model: str               # resolved checkpoint path / HF id
    mask_path: str | None
    task: str | None
    blocks_kept: int
    blocks_total: int
    mask_hash: str | None
    theoretical_speedup: float
    replicas: int = 1
    mask: Any = field(default=None, repr=False)  # the validated TaskMask (None: dense)
    clusters: list[int] = field(default_factory=list)  # router clusters it serves
    # sublayers served (of blocks_total each); None: those of the blocks kept
    attention_kept: int | None = None
    mlp_kept: int | None = None

    def __post_init__(self) -> None:
        if self.attention_kept is None:
            self.attention_kept = self.blocks_kept
        if self.mlp_kept is None:
            self.mlp_kept = self.blocks_kept

    @property
    def kept(self) -> Kept:
        return Kept(self.attention_kept, self.mlp_kept)

    def metadata(self) -> dict[str, Any]:
        """What `/v1/models` shows for this variant (under `metadata`), beside the KV cache
        numbers `ServeSpec.variant_metadata` adds."""
        return {
            "variant": self.name,
            "dense": self.mask_path is None,
            "task": self.task,
            "blocks_kept": self.blocks_kept,
            "blocks_total": self.blocks_total,
            "attention_kept": self.attention_kept,
            "mlp_kept": self.mlp_kept,
            "mask_hash": self.mask_hash,
            "theoretical_speedup": round(self.theoretical_speedup, 4),
            "replicas": self.replicas,
            **({"router_clusters": self.clusters} if self.clusters else {}),
        }


@dataclass
class RoutedSpec:
    """The routed name of `serve --router`: the router document and the variant of each cluster."""

    name: str
    router_path: str
    router_doc: dict[str, Any] = field(repr=False)
    cluster_variants: list[str]
    encoder: str
    fallback_variant: str | None = None  # serves inputs far from every centroid (router's fallback)


@dataclass
class ServeSpec:
    """A whole `serve` invocation, resolved: which variants, how they run, where they listen.
    Built from `ServeOptions` (`from_options`), which holds every default."""

    model_alias: str
    model: str
    variants: list[Variant]
    engine: EngineOptions
    host: str
    port: int
    metrics_port: int
    api_key: str | None
    address: str | None
    num_cpus: int | None
    memory_check: bool = True
    routed: RoutedSpec | None = None
    request_path: RequestPathOptions = field(default_factory=RequestPathOptions)

    @classmethod
    def from_options(cls, o: ServeOptions) -> "ServeSpec":
        """Resolve the model and validate every mask (`build_variants`) and the router."""
        alias, resolved, variants = build_variants(
            o.model, [v.mask for v in o.variants], tasks=[v.task for v in o.variants],
            names=[v.name for v in o.variants], dense=o.dense, replicas=o.replicas,
            dense_name=o.dense_name, force=o.force)
        routed = None
        if o.router:
            routed = add_router_variants(o.router, o.model, resolved, variants,
                                         o.routed_name or f"{alias}-auto", o.replicas, o.force)
        elif o.routed_name:
            raise TabpError("--routed-name needs --router")
        if not variants:
            raise TabpError("nothing to serve: --no-dense and no --task-mask or --router")
        return cls(model_alias=alias, model=resolved, variants=variants, engine=o.engine,
                   host=o.host, port=o.port, metrics_port=o.metrics_port, api_key=o.api_key,
                   address=o.address, num_cpus=o.num_cpus, memory_check=o.memory_check,
                   routed=routed, request_path=o.request_path)

    def routed_app_config(self) -> dict[str, Any] | None:
        """What the ingress needs to serve the routed name (shipped with the app)."""
        if self.routed is None:
            return None
        return {"name": self.routed.name, "router": self.routed.router_doc,
                "cluster_variants": self.routed.cluster_variants,
                "fallback_variant": self.routed.fallback_variant}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("api_key")
        for v in d["variants"]:
            v.pop("mask")
        if d["routed"]:
            d["routed"].pop("router_doc")
        d["engine"] = self.engine.model_dump()
        d["request_path"] = self.request_path.model_dump()
        return d

    def engine_needs(self, gpu: bool) -> list[EngineNeed]:
        """What each variant's engine holds (`memory.engine_needs`: the weights of the sublayers it
        serves, the KV bytes a token takes in its attention sublayers), in the dtype it will run."""
        return engine_needs(self.model, {v.name: v.kept for v in self.variants}, gpu=gpu,
                            dtype=self.engine.dtype,
                            tensor_parallel_size=self.engine.tensor_parallel_size,
                            replicas={v.name: v.replicas for v in self.variants})

    def kv_cache(self, gpu: bool) -> dict[str, dict[str, int | None]]:
        """Per variant: KV bytes per token and the tokens its KV cache holds (`kv_cache_tokens`:
        the cache size / KV bytes per token, in whole vLLM blocks). An estimate from the config,
        known before any engine starts; the engine's own number is vLLM's cache_config_info
        (num_gpu_blocks x block_size), in its log and on the metrics scrape. None on a GPU
        without --kv-cache-gib: there the engine sizes its cache from what the card has left."""
        cache = self.engine.kv_cache_gib or (None if gpu else DEFAULT_CPU_KV_CACHE_GIB)
        block = GPU_KV_BLOCK_SIZE if gpu else CPU_KV_BLOCK_SIZE
        return {n.name: {"kv_bytes_per_token": n.kv_bytes_per_token,
                         "kv_cache_tokens": kv_cache_tokens(cache * GiB, n.kv_bytes_per_token, block)
                         if cache else None}
                for n in self.engine_needs(gpu=gpu)}

    def variant_metadata(self, gpu: bool | None = None) -> dict[str, dict[str, Any]]:
        """What `/v1/models` and the tabp gauges show per variant: `Variant.metadata` and its KV
        cache (`kv_cache`). `gpu` None: whether this process sees a GPU."""
        from tabp_vllm.hardware import on_gpu

        kv = self.kv_cache(on_gpu() if gpu is None else gpu)
        return {v.name: {**v.metadata(), **kv[v.name]} for v in self.variants}

    def cpu_memory_estimate(self) -> tuple[int, dict[str, int]]:
        """Host memory a local CPU serve needs (`memory.cpu_memory_estimate`): (total bytes,
        bytes per variant, all its replicas)."""
        return cpu_memory_estimate(self.engine_needs(gpu=False), self.engine.kv_cache_gib,
                                   self.engine.cpu_engine_in_replica)


def theoretical_speedup(model: str, kept: int | Kept) -> float:
    """Dense / variant FLOPs of one decode step (`flops.decode_speedup`, LM head included)."""
    from tabp_vllm.flops import DecoderShape, decode_speedup
    from tabp_vllm.models import load_model_config

    return decode_speedup(DecoderShape.from_config(load_model_config(model)), kept)


def _of_mask(model: str, mask: Any) -> dict[str, Any]:
    """A masked variant's fields that its mask decides: what it keeps and its ideal speedup."""
    kept = Kept.of_mask(mask)
    return {"blocks_kept": mask.num_kept, "blocks_total": mask.num_hidden_layers,
            "attention_kept": kept.attention, "mlp_kept": kept.mlp, "mask": mask,
            "mask_hash": mask.content_hash(), "theoretical_speedup": theoretical_speedup(model, kept)}


def _check_name(name: str, where: str) -> str:
    if not _NAME_RE.match(name):
        raise TabpError(f"{where}: variant name {name!r} must be letters, digits, '.', '_', ':' or '-'")
    return name


def build_variants(
    model: str,
    masks: list[str | Path],
    *,
    tasks: list[str | None] | None = None,
    names: list[str | None] | None = None,
    dense: bool = True,
    replicas: int = 1,
    dense_name: str | None = None,
    force: bool = False,
) -> tuple[str, str, list[Variant]]:
    """Resolve the model, validate every mask against it, name the variants.

    Returns (alias, resolved checkpoint, variants). Names: the alias for dense,
    `<alias>-<task>` per mask (task from the mask unless overridden). A mask removing no block is
    refused (serve dense as dense), one keeping under half the blocks unless `force` (then warned).
    """
    import sys

    from tabp_vllm.mask import check_depth, load_mask
    from tabp_vllm.models import load_model_config, model_fingerprint
    from tabp_vllm.models import alias_of, resolve_model

    if replicas < 1:
        raise TabpError(f"--replicas must be >= 1, got {replicas}")
    resolved = resolve_model(model)
    try:
        total = int(model_fingerprint(load_model_config(resolved))["num_hidden_layers"])
    except TabpError:
        raise
    except Exception as exc:  # noqa: BLE001 - a missing/unreadable config is a user error
        raise TabpError(f"model {model!r}: cannot read its config ({exc})") from None
    alias = alias_of(model)
    variants: list[Variant] = []
    if dense:
        variants.append(Variant(name=_check_name(dense_name or alias, "dense"), model=resolved,
                                mask_path=None, task=None, blocks_kept=total, blocks_total=total,
                                mask_hash=None, theoretical_speedup=1.0, replicas=replicas))
    tasks = list(tasks or [])
    names = list(names or [])
    for i, path in enumerate(masks):
        mask = load_mask(path, resolved, model_name=model)
        warning = check_depth(mask, str(path), force)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        task = (tasks[i] if i < len(tasks) else None) or mask.task
        name = (names[i] if i < len(names) else None) or f"{alias}-{task}"
        variants.append(Variant(
            name=_check_name(name, str(path)), model=resolved, mask_path=str(Path(path).resolve()),
            task=task, replicas=replicas, **_of_mask(resolved, mask)))
    _check_unique_names(variants)
    return alias, resolved, variants


def _check_unique_names(variants: list[Variant]) -> None:
    seen: dict[str, str] = {}
    for v in variants:
        if v.name in seen:
            raise TabpError(f"two variants are named {v.name!r} ({seen[v.name]} and "
                            f"{v.mask_path or 'dense'}): give one a different name")
        seen[v.name] = v.mask_path or "dense"


def add_router_variants(router_path: str, model: str, resolved: str, variants: list[Variant],
                        routed_name: str, replicas: int, force: bool) -> RoutedSpec:
    """Validate the router against the model (its encoder loaded once, as the ingress will), and
    give every cluster a variant: one already served with the same mask (a `--task-mask`), else one
    new variant per distinct mask,
    `<routed_name>-0`, `-1`, ... Appends the new variants to `variants`."""
    import sys

    from tabp_vllm.mask import check_depth
    from tabp_vllm.routing.router import FALLBACK, load_router

    path = Path(router_path)
    router = load_router(path, resolved, check_encoder=True)
    _check_name(routed_name, "--routed-name")
    by_hash = {v.mask_hash: v for v in variants if v.mask_hash}
    cluster_variants: list[str] = [""] * router.num_clusters
    fallback_variant = None
    new = 0
    for mask, members in router.variants():
        clusters = [c for c in members if c != FALLBACK]
        names = [str(c) for c in clusters] + (["fallback"] if FALLBACK in members else [])
        v = by_hash.get(mask.content_hash())
        if v is None:
            warning = check_depth(mask, f"{path}: cluster {names[0]}", force)
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
            v = Variant(name=f"{routed_name}-{new}", model=resolved, mask_path=str(path.resolve()),
                        task=f"clusters {','.join(names)}", replicas=replicas,
                        **_of_mask(resolved, mask))
            variants.append(v)
            by_hash[v.mask_hash] = v
            new += 1
        v.clusters = sorted(set(v.clusters) | set(clusters))
        for c in clusters:
            cluster_variants[c] = v.name
        if FALLBACK in members:
            fallback_variant = v.name
    if routed_name in {v.name for v in variants}:
        raise TabpError(f"--routed-name {routed_name!r} is also a variant's name")
    _check_unique_names(variants)
    return RoutedSpec(name=routed_name, router_path=str(path.resolve()), router_doc=router.to_json(),
                      cluster_variants=cluster_variants, encoder=str(router.encoder.get("id")),
                      fallback_variant=fallback_variant)


def check_memory(spec: ServeSpec, available_bytes: int | None = None) -> None:
    """Refuse, in one line and before Ray starts, a local CPU serve whose variants cannot fit
    the memory this machine has available (`ServeSpec.cpu_memory_estimate`)."""
    import psutil

    need, per_variant = spec.cpu_memory_estimate()
    avail = psutil.virtual_memory().available if available_bytes is None else available_bytes
    if need > avail:
        worst = max(per_variant.values())
        lean = "" if spec.engine.cpu_engine_in_replica else ", add --engine-in-replica"
        raise TabpError(
            f"{len(spec.variants)} variants need ~{need / GiB:.1f} GiB (up to {worst / GiB:.1f} GiB "
            f"each: weights + KV cache + engine and Ray processes), {avail / GiB:.1f} GiB is "
            f"available: serve fewer variants{lean} or lower --kv-cache-gib")
