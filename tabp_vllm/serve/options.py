"""The options of `tabp-vllm serve`: one pydantic model per group (top level, `engine:`,
`request_path:`, `variants:` entries), each holding its defaults once, and the YAML config file
that has the same keys (examples/serve.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field

from tabp_vllm.engine import DEFAULT_MAX_MODEL_LEN
from tabp_vllm.errors import TabpError
from tabp_vllm.memory import DEFAULT_CPU_KV_CACHE_GIB, GPU_USABLE_FRACTION
from tabp_vllm.options import REQUIRED, Options, build_options, option, read_config_file


class EngineOptions(Options):
    """Engine options every variant shares (passed through to `engine_args_for`)."""

    # None: the checkpoint's own
    max_model_len: Optional[int] = option(DEFAULT_MAX_MODEL_LEN, "Context length per engine.", ge=1)
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = option(
        "auto", "auto: on a CPU bfloat16 only with native bf16 (avx512_bf16/amx_bf16), else float32.")
    kv_cache_gib: Optional[float] = option(None, "KV cache space per engine, GiB.", gt=0,
                                           shown=f"engine default ({DEFAULT_CPU_KV_CACHE_GIB:g} GiB on CPU)")
    # None: engine.default_enforce_eager
    enforce_eager: Optional[bool] = option(None, "Eager mode (fast start) or torch.compile / graphs.",
                                           "--eager/--no-eager",
                                           shown="eager on CPU, compiled + CUDA graphs on GPU")
    tensor_parallel_size: int = option(1, "GPUs per engine (every variant).",
                                       "--tensor-parallel-size", "-tp", ge=1)
    cpu_uniproc: bool = option(True, "CPU: the worker in the engine core process.")
    cpu_engine_in_replica: bool = option(
        False, "CPU: each variant's vLLM engine core inside its Ray replica (one process per variant, "
        "~0.5 GiB less each; slower at low concurrency) or in a process of its own.",
        "--engine-in-replica/--no-engine-in-replica")
    gpu_memory_share: float = option(GPU_USABLE_FRACTION, "GPU: the share of the card all variants' "
                                     "engines split (the rest stays free for other processes).",
                                     gt=0, le=1)
    # any other vLLM engine argument: `extra:` in the file, --engine-arg KEY=VALUE on the command line
    extra: dict[str, Any] = option(REQUIRED, cli=False, default_factory=dict)


class VariantOptions(Options):
    """One pruned variant in a config file (`variants:` entries) or from `--task-mask`/`--task`."""

    mask: str
    task: Optional[str] = None   # None: the mask's task
    name: Optional[str] = None   # None: <alias>-<task>


# Ray Serve's environment settings for the per-request path, by profile (`request_path.ray_serve`;
# measured in bench/results/serve_vs_bare/levers/, docs/serving.md "Server overhead"). They are
# read by the Ray processes at start, so they apply to the local Ray that `serve` starts; a
# cluster joined with --address keeps the environment it was started with.
RAY_SERVE_PROFILES: dict[str, dict[str, str]] = {
    "default": {},  # Ray Serve's own
    # Ray Serve's bundle (serve/_private/constants.py): user code and the router on each replica's
    # main event loop, request-path logs buffered, gRPC from proxy to replicas, direct ingress.
    # Direct ingress holds the ingress replica open 30 s at shutdown for an external load
    # balancer to deregister it; a local `serve` is the whole server (no balancer keeps routing
    # to a sibling), so Ctrl-C would wait 30 s for nothing. In-flight requests still drain.
    "throughput-optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                             "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"},
    # the bundle, and the controller's background work made rarer (its loop and the replicas'
    # metric exports run every 0.1 s by default: ~10 CPU s per 6 minutes in the hop profile);
    # measured no better than the bundle alone, so not the default
    "lean": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
             "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"},
}


class RequestPathOptions(Options):
    """The per-request path between HTTP and the engines (docs/serving.md, "Server overhead"):
    None = Ray Serve LLM's own default, named in the comment."""

    ray_serve: Literal[tuple(RAY_SERVE_PROFILES)] = option(
        "throughput-optimized", "Ray Serve's request-path settings for the local Ray: "
        "throughput-optimized (Ray's bundle), lean (the bundle + a quieter controller) or default "
        "(Ray's own).")
    # None: Ray's default (autoscaled, from 1)
    ingress_replicas: Optional[int] = option(
        None, "Replicas of the HTTP ingress (a fixed count instead of Ray's autoscaling).", ge=1,
        shown="Ray Serve LLM's")
    ingress_max_ongoing_requests: Optional[int] = option(  # None: Ray's (1e9: no cap)
        None, "Requests one ingress replica takes at a time.", ge=1, shown="Ray Serve LLM's")
    stream_batching_interval_ms: Optional[float] = option(  # None: Ray's 50 ms
        None, "How long streamed tokens are gathered into one chunk (0: each token at once).", ge=0,
        shown="Ray Serve LLM's")
    # how streamed outputs are gathered: "leading-edge" (serve/streaming.py: at most one chunk per
    # interval, but the first output of a burst at once) or "ray" (Ray's fixed windows: every
    # output, the first too, waits for its window's end)
    stream_batching: Literal["leading-edge", "ray"] = option(
        "leading-edge", "leading-edge (the first token of a burst leaves at once) or ray (Ray Serve "
        "LLM's fixed windows: every token waits for its window's end).")


class ServeOptions(Options):
    """Every option of `tabp-vllm serve`; the YAML config file has the same keys
    (examples/serve.yaml). Precedence: CLI flag > file > the defaults below."""

    model: str = option("llama", "Alias, HF id or checkpoint path.", "--model", "-m")
    dense: bool = option(True, "Also serve the dense model.")
    dense_name: Optional[str] = option(None, "The dense variant's name.", shown="the alias")
    # pruned variants: `variants:` in the file, --task-mask (and --task) on the command line
    variants: list[VariantOptions] = option(REQUIRED, cli=False, default_factory=list)
    replicas: int = option(1, "Replicas per variant.", ge=1)
    host: str = option("127.0.0.1")
    port: int = option(8000)
    metrics_port: int = option(8090, "Ray's Prometheus export port (the one scrape target).")
    api_key: Optional[str] = option(None, "Require 'Authorization: Bearer <key>'.",
                                    envvar="TABP_VLLM_API_KEY")
    address: Optional[str] = option(None, "Join an existing Ray cluster (e.g. 'auto').")
    num_cpus: Optional[int] = option(None, "Logical CPUs for a local Ray.", ge=1,
                                     shown="2 per CPU replica + 1 for the ingress")
    memory_check: bool = option(True, "Refuse variants whose estimated memory exceeds what is "
                                "available (local CPU serve).")
    force: bool = option(False, "Serve masks keeping under half the blocks (refused otherwise); "
                         "still warns.", "--force")
    router: Optional[str] = option(None, "A router file (`route fit`): serve one variant per "
                                   "distinct cluster mask and a routed name whose requests each go "
                                   "to their input's cluster.")
    routed_name: Optional[str] = option(None, "The routed model's name.", shown="<alias>-auto")
    # the console (serve/console.py): our own lines here, Ray's and vLLM's records in a file
    verbose: bool = option(False, "Also show Ray's and vLLM's log records here (else they go to "
                           "the log file only).", "--verbose")
    log_file: Optional[str] = option(None, "Where Ray's and vLLM's log records go.",
                                     shown="<temp dir>/tabp-vllm/serve-<port>.log")
    engine: EngineOptions = Field(default_factory=EngineOptions)
    request_path: RequestPathOptions = Field(default_factory=RequestPathOptions)


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
