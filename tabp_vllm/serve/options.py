"""The options of `tabp-vllm serve`: one pydantic model per group (top level, `engine:`,
`request_path:`, `variants:` entries), each holding its defaults once, and the YAML config file
that has the same keys (examples/serve.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field

from tabp_vllm.engine import GPU_USABLE_FRACTION
from tabp_vllm.errors import TabpError
from tabp_vllm.options import Options, build_options, read_config_file


class EngineOptions(Options):
    """Engine options every variant shares (passed through to `engine_args_for`)."""

    max_model_len: Optional[int] = Field(2048, ge=1)   # None: the checkpoint's own
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = "auto"  # auto: engine.choose_dtype
    kv_cache_gib: Optional[float] = Field(None, gt=0)  # None: engine.DEFAULT_CPU_KV_CACHE_GIB on CPU
    enforce_eager: Optional[bool] = None               # None: engine.default_enforce_eager (CPU eager, GPU graphs)
    tensor_parallel_size: int = Field(1, ge=1)         # GPUs per engine (each variant's replica)
    cpu_uniproc: bool = True                           # CPU: the worker in the engine core process
    cpu_engine_in_replica: bool = False                # CPU: engine core (and worker) in the replica
    gpu_memory_share: float = Field(GPU_USABLE_FRACTION, gt=0, le=1)  # GPU: card share they split
    extra: dict[str, Any] = Field(default_factory=dict)  # any other vLLM engine argument


class VariantOptions(Options):
    """One pruned variant in a config file (`variants:` entries) or from `--task-mask`/`--task`."""

    mask: str
    task: Optional[str] = None   # None: the mask's task
    name: Optional[str] = None   # None: <alias>-<task>


# Ray Serve's environment settings for the per-request path, by profile (`request_path.ray_serve`;
# measured in bench/results/server_levers/, docs/serving.md "Server overhead"). They are read by
# the Ray processes at start, so they apply to the local Ray that `serve` starts; a cluster joined
# with --address keeps the environment it was started with.
RAY_SERVE_PROFILES: dict[str, dict[str, str]] = {
    "default": {},  # Ray Serve's own
    # Ray Serve's bundle (serve/_private/constants.py): user code and the router on each replica's
    # main event loop, request-path logs buffered, gRPC from proxy to replicas, direct ingress
    "throughput-optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    # the bundle, and the controller's background work made rarer (its loop and the replicas'
    # metric exports run every 0.1 s by default: ~10 CPU s per 6 minutes in the hop profile);
    # measured no better than the bundle alone, so not the default
    "lean": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
             "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"},
}


class RequestPathOptions(Options):
    """The per-request path between HTTP and the engines (docs/serving.md, "Server overhead"):
    None = Ray Serve LLM's own default, named in the comment."""

    ray_serve: Literal[tuple(RAY_SERVE_PROFILES)] = "throughput-optimized"  # a RAY_SERVE_PROFILES key
    ingress_replicas: Optional[int] = Field(None, ge=1)  # None: Ray's default (autoscaled, from 1)
    ingress_max_ongoing_requests: Optional[int] = Field(None, ge=1)  # None: Ray's (1e9: no cap)
    stream_batching_interval_ms: Optional[float] = Field(None, ge=0)  # None: Ray's 50 ms
    # how streamed outputs are gathered: "leading-edge" (serve/streaming.py: at most one chunk per
    # interval, but the first output of a burst at once) or "ray" (Ray's fixed windows: every
    # output, the first too, waits for its window's end)
    stream_batching: Literal["leading-edge", "ray"] = "leading-edge"


class ServeOptions(Options):
    """Every option of `tabp-vllm serve`; the YAML config file has the same keys
    (examples/serve.yaml). Precedence: CLI flag > file > the defaults below."""

    model: str = "llama"                    # alias, HF id or checkpoint path
    dense: bool = True                      # also serve the dense model
    dense_name: Optional[str] = None        # None: the alias
    variants: list[VariantOptions] = Field(default_factory=list)
    replicas: int = Field(1, ge=1)          # per variant
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_port: int = 8090                # Ray's Prometheus export port
    api_key: Optional[str] = None           # require "Authorization: Bearer <key>"
    address: Optional[str] = None           # join this Ray cluster instead of starting one
    num_cpus: Optional[int] = Field(None, ge=1)  # None: ServeSpec.ray_cpus_needed()
    memory_check: bool = True               # refuse a local CPU serve that cannot fit in memory
    force: bool = False                     # serve masks keeping < mask.MIN_KEPT_FRACTION blocks
    router: Optional[str] = None            # a router file (`route fit`): serve its routed name
    routed_name: Optional[str] = None       # None: <alias>-auto
    engine: EngineOptions = Field(default_factory=EngineOptions)
    request_path: RequestPathOptions = Field(default_factory=RequestPathOptions)

    @classmethod
    def shown(cls, name: str) -> str:
        """The default of a top-level, `engine` or `request_path` option as the CLI help shows it."""
        owner = (cls if name in cls.model_fields else
                 EngineOptions if name in EngineOptions.model_fields else RequestPathOptions)
        value = owner.default(name)
        if owner is RequestPathOptions and value is None:
            return "Ray Serve LLM's"
        if name == "kv_cache_gib":
            return "engine default (1 GiB on CPU)"
        if name == "enforce_eager":
            return "eager on CPU, compiled + CUDA graphs on GPU"
        return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def merge_options(file: ServeOptions, cli: ServeOptions) -> ServeOptions:
    """CLI over file, field by field (also inside `engine`); only what each one set counts.
    The CLI's variants are appended to the file's, its `engine.extra` keys win over the file's."""
    f, c = file.model_dump(exclude_unset=True), cli.model_dump(exclude_unset=True)
    fe, ce = f.pop("engine", {}), c.pop("engine", {})
    engine = {**fe, **ce}
    if "extra" in fe or "extra" in ce:
        engine["extra"] = {**fe.get("extra", {}), **ce.get("extra", {})}
    request_path = {**f.pop("request_path", {}), **c.pop("request_path", {})}
    variants = f.pop("variants", []) + c.pop("variants", [])
    return ServeOptions.model_validate({**f, **c, "engine": engine, "request_path": request_path,
                                        "variants": variants})


def load_yaml_spec(path: str | Path) -> dict[str, Any]:
    """Read and validate a serve config file (see examples/serve.yaml); its top-level mapping,
    with mask and router paths made relative to the file. A bad key or value: one TabpError line."""
    p = Path(path)
    doc = read_config_file(p)
    unknown = sorted(set(doc) - set(ServeOptions.model_fields))
    if unknown:
        raise TabpError(f"{p}: unknown key(s) {unknown}; known: {sorted(ServeOptions.model_fields)}")
    for v in doc.get("variants") or []:
        if isinstance(v, dict) and isinstance(v.get("mask"), (str, Path)):
            mp = Path(str(v["mask"])).expanduser()
            v["mask"] = str(mp if mp.is_absolute() else (p.parent / mp))
    if isinstance(doc.get("router"), (str, Path)):
        rp = Path(str(doc["router"])).expanduser()
        doc["router"] = str(rp if rp.is_absolute() else (p.parent / rp))
    build_options(ServeOptions, file=p, file_doc=doc)
    return doc
