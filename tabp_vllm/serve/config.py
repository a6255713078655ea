"""Variants (dense + one per mask) from `ServeOptions` (serve/options.py) -> Ray Serve `LLMConfig`s.

Everything here runs in the driver, before Ray starts: a bad mask or option fails with one line
(`TabpError`) and no process has been spawned yet.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tabp_vllm.engine import GPU_USABLE_FRACTION
from tabp_vllm.errors import TabpError
from tabp_vllm.serve.options import RAY_SERVE_PROFILES, EngineOptions, RequestPathOptions, ServeOptions

# Decode-step FLOPs ratio is quoted at this context length (prompt + generated so far).
SPEEDUP_CONTEXT = 256
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
# Every variant's LLMServer (serve/app.py: how it streams and starts its engine), and the
# variables of its runtime_env that say how.
TABP_SERVER_CLS = "tabp_vllm.serve.app.TabpLLMServer"
UNIPROC_ENV = "TABP_VLLM_CPU_UNIPROC"    # "1": the CPU worker inside the engine core process
ENGINE_IN_REPLICA_ENV = "TABP_VLLM_CPU_ENGINE_IN_REPLICA"  # "1": the engine core in the replica
SHARED_GPU_ENV = "TABP_VLLM_SHARED_GPU"  # "1": the engine shares its GPU: start one at a time
STREAM_BATCHING_ENV = "TABP_VLLM_STREAM_BATCHING"  # request_path.stream_batching


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

    def metadata(self) -> dict[str, Any]:
        """What `/v1/models` shows for this variant (under `metadata`)."""
        return {
            "variant": self.name,
            "dense": self.mask_path is None,
            "task": self.task,
            "blocks_kept": self.blocks_kept,
            "blocks_total": self.blocks_total,
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
                "cluster_variants": self.routed.cluster_variants}

    def ray_cpus_needed(self) -> int:
        # Each CPU LLMServer replica holds 2 logical CPUs (actor + placement bundle), each ingress
        # replica 1 (without a fixed count the ingress autoscales from 1 and stays there).
        return sum(2 * v.replicas for v in self.variants) + (self.request_path.ingress_replicas or 1)

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

    def ingress_options(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """The ingress deployment's options: Ray Serve LLM's `defaults`, with our request-path
        settings over them (a fixed replica count replaces its autoscaling)."""
        import copy

        options = copy.deepcopy(defaults)
        rp = self.request_path
        if rp.ingress_max_ongoing_requests is not None:
            options["max_ongoing_requests"] = rp.ingress_max_ongoing_requests
        if rp.ingress_replicas is not None:
            options.pop("autoscaling_config", None)
            options["num_replicas"] = rp.ingress_replicas
        return options


def apply_ray_serve_profile(profile: str, environ: dict[str, str]) -> dict[str, str]:
    """Put the profile's RAY_SERVE_* settings into `environ` (before the local Ray starts, whose
    processes inherit it) and return what now applies; a variable the user set already wins."""
    for key, value in RAY_SERVE_PROFILES[profile].items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in RAY_SERVE_PROFILES[profile]}


def theoretical_speedup(model: str, kept: int, context: int = SPEEDUP_CONTEXT) -> float:
    """Dense / pruned FLOPs of one decode step at `context` keys (LM head included)."""
    from tabp_vllm.flops import DecoderShape, flops_per_token
    from tabp_vllm.models import load_model_config

    shape = DecoderShape.from_config(load_model_config(model))
    dense = flops_per_token(shape, shape.num_hidden_layers, context)["total"]
    pruned = flops_per_token(shape, kept, context)["total"]
    return float(dense / pruned)


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
            task=task, blocks_kept=mask.num_kept, blocks_total=mask.num_hidden_layers,
            mask_hash=mask.content_hash(),
            theoretical_speedup=theoretical_speedup(resolved, mask.num_kept), replicas=replicas,
            mask=mask))
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
    from tabp_vllm.routing.router import load_router

    path = Path(router_path)
    router = load_router(path, resolved, check_encoder=True)
    _check_name(routed_name, "--routed-name")
    by_hash = {v.mask_hash: v for v in variants if v.mask_hash}
    cluster_variants: list[str] = [""] * router.num_clusters
    new = 0
    for mask, clusters in router.variants():
        v = by_hash.get(mask.content_hash())
        if v is None:
            warning = check_depth(mask, f"{path}: cluster {clusters[0]}", force)
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
            v = Variant(name=f"{routed_name}-{new}", model=resolved, mask_path=str(path.resolve()),
                        task=f"clusters {','.join(map(str, clusters))}",
                        blocks_kept=mask.num_kept, blocks_total=mask.num_hidden_layers,
                        mask_hash=mask.content_hash(),
                        theoretical_speedup=theoretical_speedup(resolved, mask.num_kept),
                        replicas=replicas, mask=mask)
            variants.append(v)
            by_hash[v.mask_hash] = v
            new += 1
        v.clusters = sorted(set(v.clusters) | set(clusters))
        for c in clusters:
            cluster_variants[c] = v.name
    if routed_name in {v.name for v in variants}:
        raise TabpError(f"--routed-name {routed_name!r} is also a variant's name")
    _check_unique_names(variants)
    return RoutedSpec(name=routed_name, router_path=str(path.resolve()), router_doc=router.to_json(),
                      cluster_variants=cluster_variants, encoder=str(router.encoder.get("id")))


def engine_needs(spec: ServeSpec, gpu: bool) -> list[Any]:
    """What each variant's engine holds (`engine.EngineNeed`), from the checkpoint's config:
    weights and KV bytes per token at its kept depth, in the dtype the engine will run."""
    from tabp_vllm.engine import EngineNeed, choose_dtype, dtype_bytes, kv_bytes_per_token, weight_bytes
    from tabp_vllm.models import load_model_config

    config = load_model_config(spec.model)
    nbytes = dtype_bytes(choose_dtype(spec.engine.dtype, gpu=gpu)[0], config, gpu)
    return [EngineNeed(v.name, weight_bytes(config, v.blocks_kept, nbytes),
                       kv_bytes_per_token(config, v.blocks_kept, nbytes),
                       spec.engine.tensor_parallel_size, v.replicas) for v in spec.variants]


# Measured per CPU engine beyond its weights and KV cache, as PSS (what the machine spends; RSS
# counts the shared torch/vLLM pages once per process), bench/serve_memory.py ->
# bench/results/serve_memory.json, 0.25 GiB weights and 0.25 GiB KV cache each: Ray replica actor +
# engine core process (with the worker in it, `cpu_uniproc`): 1.97 GiB PSS per variant ("uni";
# "mp" 2.49); the engine core inside the replica (`cpu_engine_in_replica`): 1.42 ("in-replica").
CPU_ENGINE_OVERHEAD_GIB = 1.5
CPU_ENGINE_IN_REPLICA_OVERHEAD_GIB = 1.0
# Once per app: driver, Ray's GCS, raylet, agents, the Serve controller, proxy and ingress
# (2.01-2.06 GiB PSS measured).
CPU_APP_OVERHEAD_GIB = 2.0


def cpu_memory_estimate(spec: ServeSpec) -> tuple[int, dict[str, int]]:
    """Host memory a local CPU serve of `spec` needs: (total bytes, bytes per variant, all its
    replicas). Weights at the variant's depth and dtype + its KV cache + the measured overhead."""
    from tabp_vllm.engine import DEFAULT_CPU_KV_CACHE_GIB, GiB

    kv = (spec.engine.kv_cache_gib or DEFAULT_CPU_KV_CACHE_GIB) * GiB
    overhead = (CPU_ENGINE_IN_REPLICA_OVERHEAD_GIB if spec.engine.cpu_engine_in_replica
                else CPU_ENGINE_OVERHEAD_GIB) * GiB
    per = {n.name: int(n.replicas * (n.weight_bytes + kv + overhead))
           for n in engine_needs(spec, gpu=False)}
    return int(CPU_APP_OVERHEAD_GIB * GiB) + sum(per.values()), per


def gpu_fractions(spec: ServeSpec, gpu_bytes: int | None = None) -> dict[str, float] | None:
    """`gpu_memory_utilization` per variant when several engines share the GPU, splitting
    `engine.gpu_memory_share` of it (one engine: that share itself); None when vLLM's own default
    is right (one engine, the default share) or the user sized memory (`gpu_memory_utilization` in
    `engine.extra`, or `kv_cache_gib`)."""
    from tabp_vllm.engine import gpu_memory_fractions, gpu_total_bytes

    engines = sum(v.replicas for v in spec.variants)
    share = spec.engine.gpu_memory_share
    if "gpu_memory_utilization" in spec.engine.extra or spec.engine.kv_cache_gib:
        return None
    if engines < 2:
        return None if share == GPU_USABLE_FRACTION else {spec.variants[0].name: share}
    needs = engine_needs(spec, gpu=True)
    max_len = spec.engine.max_model_len or int(_max_positions(spec.model))
    fractions = gpu_memory_fractions(needs, gpu_bytes or gpu_total_bytes(), max_len, usable=share)
    return {n.name: f for n, f in zip(needs, fractions)}


def _max_positions(model: str) -> int:
    from tabp_vllm.models import load_model_config

    return load_model_config(model).get("max_position_embeddings", 2048)


def llm_configs(spec: ServeSpec, *, gpu: bool | None = None,
                gpu_bytes: int | None = None) -> list[Any]:
    """One `ray.serve.llm.LLMConfig` per variant, engine kwargs from `engine_args_for`.

    On a GPU several engines share the card: each gets a `gpu_memory_utilization` from
    `gpu_fractions` and asks Ray for that fraction of a GPU per tensor-parallel rank, so Ray
    packs them onto one GPU. `gpu`/`gpu_bytes` None: what this process sees (tests pass fakes).
    """
    from ray.serve.llm import LLMConfig

    from tabp_vllm.engine import engine_args_for, on_gpu

    gpu = on_gpu() if gpu is None else gpu
    fractions = gpu_fractions(spec, gpu_bytes) if gpu else None
    tp = spec.engine.tensor_parallel_size
    configs = []
    for v in spec.variants:
        kwargs = engine_args_for(
            v.model, v.mask, dtype=spec.engine.dtype, max_model_len=spec.engine.max_model_len,
            enforce_eager=spec.engine.enforce_eager, kv_cache_gib=spec.engine.kv_cache_gib,
            tensor_parallel_size=tp, gpu=gpu, extra=spec.engine.extra,
        )
        kwargs.pop("model", None)  # model_source below
        kwargs.pop("served_model_name", None)  # Ray Serve names the engine after model_id
        env = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
               STREAM_BATCHING_ENV: spec.request_path.stream_batching}
        cfg: dict[str, Any] = dict(
            model_loading_config={"model_id": v.name, "model_source": v.model},
            server_cls=TABP_SERVER_CLS,
            engine_kwargs=kwargs,
            deployment_config={"num_replicas": v.replicas},
            log_engine_metrics=True,
            runtime_env={"env_vars": env},
        )
        if spec.request_path.stream_batching_interval_ms is not None:
            # how long Ray Serve LLM gathers streamed tokens before sending them on as one chunk
            cfg["experimental_configs"] = {
                "stream_batching_interval_ms": spec.request_path.stream_batching_interval_ms}
        if not gpu:
            cfg["accelerator_config"] = {"kind": "cpu"}
            cfg["placement_group_config"] = {"bundles": [{"CPU": 1}]}
            if spec.engine.cpu_uniproc:
                env[UNIPROC_ENV] = "1"
            if spec.engine.cpu_engine_in_replica:
                env[ENGINE_IN_REPLICA_ENV] = "1"
        elif fractions:
            kwargs["gpu_memory_utilization"] = fractions[v.name]
            cfg["placement_group_config"] = {"bundles": [{"GPU": fractions[v.name], "CPU": 1}] * tp}
            # engines on one card start one at a time (engine.engine_start_lock says why)
            env[SHARED_GPU_ENV] = "1"
        configs.append(LLMConfig(**cfg))
    return configs
