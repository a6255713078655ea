"""How the variants run on Ray: each variant's Ray Serve `LLMConfig` (engine arguments, GPU
share, the runtime_env variables that tell `serve/app.py` how to start its engine), the ingress
options, the Ray Serve profile's environment, and starting, watching and stopping the app.

Ray is imported only inside the functions: the replicas import the variable names from here.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from tabp_vllm.errors import TabpError, first_line
from tabp_vllm.memory import GPU_USABLE_FRACTION
from tabp_vllm.serve.options import RAY_SERVE_PROFILES

if TYPE_CHECKING:
    from tabp_vllm.serve.spec import ServeSpec

APP_NAME = "tabp"
# Every variant's LLMServer (serve/app.py: how it streams and starts its engine), and the
# variables of its runtime_env that say how.
TABP_SERVER_CLS = "tabp_vllm.serve.app.TabpLLMServer"
# Skips Ray Serve LLM's per-node download task for a local checkpoint (serve/app.py says why).
TABP_CALLBACK_CLS = "tabp_vllm.serve.app.LocalCheckpointCallback"
UNIPROC_ENV = "TABP_VLLM_CPU_UNIPROC"    # "1": the CPU worker inside the engine core process
ENGINE_IN_REPLICA_ENV = "TABP_VLLM_CPU_ENGINE_IN_REPLICA"  # "1": the engine core in the replica
SHARED_GPU_ENV = "TABP_VLLM_SHARED_GPU"  # "1": the engine shares its GPU: start one at a time
STREAM_BATCHING_ENV = "TABP_VLLM_STREAM_BATCHING"  # request_path.stream_batching


def apply_ray_serve_profile(profile: str, environ: dict[str, str]) -> dict[str, str]:
    """Put the profile's RAY_SERVE_* settings into `environ` (before the local Ray starts, whose
    processes inherit it) and return what now applies; a variable the user set already wins."""
    for key, value in RAY_SERVE_PROFILES[profile].items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in RAY_SERVE_PROFILES[profile]}


def ray_cpus_needed(spec: ServeSpec) -> int:
    """Logical CPUs a local Ray needs for `spec`: each CPU LLMServer replica holds 2 (actor +
    placement bundle), each ingress replica 1 (without a fixed count the ingress autoscales from 1
    and stays there)."""
    return sum(2 * v.replicas for v in spec.variants) + (spec.request_path.ingress_replicas or 1)


def ingress_options(spec: ServeSpec, defaults: dict[str, Any]) -> dict[str, Any]:
    """The ingress deployment's options: Ray Serve LLM's `defaults`, with our request-path
    settings over them (a fixed replica count replaces its autoscaling)."""
    import copy

    options = copy.deepcopy(defaults)
    rp = spec.request_path
    if rp.ingress_max_ongoing_requests is not None:
        options["max_ongoing_requests"] = rp.ingress_max_ongoing_requests
    if rp.ingress_replicas is not None:
        options.pop("autoscaling_config", None)
        options["num_replicas"] = rp.ingress_replicas
    return options


def gpu_fractions(spec: ServeSpec, gpu_bytes: int | None = None) -> dict[str, float] | None:
    """`gpu_memory_utilization` per variant when several engines share the GPU, splitting
    `engine.gpu_memory_share` of it (one engine: that share itself); None when vLLM's own default
    is right (one engine, the default share) or the user sized memory (`gpu_memory_utilization` in
    `engine.extra`, or `kv_cache_gib`)."""
    from tabp_vllm.hardware import gpu_total_bytes
    from tabp_vllm.memory import gpu_memory_fractions

    engines = sum(v.replicas for v in spec.variants)
    share = spec.engine.gpu_memory_share
    if "gpu_memory_utilization" in spec.engine.extra or spec.engine.kv_cache_gib:
        return None
    if engines < 2:
        return None if share == GPU_USABLE_FRACTION else {spec.variants[0].name: share}
    needs = spec.engine_needs(gpu=True)
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

    from tabp_vllm.engine import engine_args_for
    from tabp_vllm.hardware import on_gpu

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
            callback_config={"callback_class": TABP_CALLBACK_CLS},
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
            # engines on one card start one at a time (hardware.engine_start_lock says why)
            env[SHARED_GPU_ENV] = "1"
        configs.append(LLMConfig(**cfg))
    return configs


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on an address nobody listens on (ray.init would retry for minutes)."""
    import socket

    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise TabpError(f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise TabpError(f"--address {address}: no Ray cluster answers there ({exc})") from None


def start(spec, *, log=print) -> None:
    """Start (or join) Ray, deploy the app and wait until every variant is ready; `log` takes
    our own progress lines (None: silent, and the Ray processes' output not streamed here)."""
    import ray
    from ray import serve

    from tabp_vllm.serve.app import build_app

    if spec.address:
        if log and spec.request_path.ray_serve != "default":
            log(f"request path: ray_serve={spec.request_path.ray_serve} is not applied to a joined "
                f"cluster: its processes keep the RAY_SERVE_* environment of `ray start`")
        try:
            ray.init(address=spec.address, log_to_driver=log is not None)
        except ConnectionError as exc:
            raise TabpError(f"--address {spec.address}: cannot join the Ray cluster ({exc})") from None
    else:
        applied = apply_ray_serve_profile(spec.request_path.ray_serve, os.environ)
        if log:
            log(f"request path: ray_serve={spec.request_path.ray_serve}"
                + "".join(f" {k}={v}" for k, v in applied.items()))
        # "local": always a private Ray, even when a `ray start` cluster runs on this host (plain
        # ray.init() would join that one, and fail on num_cpus).
        try:
            ray.init(address="local", num_cpus=spec.num_cpus or ray_cpus_needed(spec),
                     include_dashboard=False, _metrics_export_port=spec.metrics_port,
                     log_to_driver=log is not None)
        except (RuntimeError, ConnectionError) as exc:  # e.g. GCS/raylet start timed out on a busy host
            raise TabpError(f"could not start a local Ray instance: {first_line(exc)} (is the machine "
                            f"overloaded, or out of memory?)") from None
    app = build_app(spec)
    serve.start(http_options={"host": spec.host, "port": spec.port})
    serve.run_many([serve.RunTarget(target=app, name=APP_NAME, route_prefix="/")],
                   wait_for_applications_running=False)
    wait_running(spec, log=log)


def wait_running(spec, log=print, poll_s: float = 2.0) -> None:
    """Wait until the app is RUNNING, printing one line per variant once all its replicas run
    (`serve.run` would wait silently: ten CPU variants take minutes)."""
    from tabp_vllm.serve.readiness import app_status, variant_states

    t0 = time.monotonic()
    wanted = {v.name: v.replicas for v in spec.variants}
    pending = dict(wanted)
    while True:
        app = app_status()
        if app is not None:
            for name, state in variant_states(app, wanted).items():
                if name in pending and state["replicas_running"] >= pending[name]:
                    del pending[name]
                    if log:
                        log(f"ready: {name} ({len(wanted) - len(pending)}/{len(wanted)} variants, "
                            f"{time.monotonic() - t0:.0f} s)")
            if app.status == "RUNNING" and not pending:
                return
            if app.status == "DEPLOY_FAILED":  # what serve.run raises
                raise RuntimeError(f"Deploying application {APP_NAME} failed: {app.message}")
        time.sleep(poll_s)


def stop(joined: bool = False, serve_timeout_s: float = 90.0) -> None:
    """Delete the app and Serve, then stop the local Ray (which kills every process it started).

    On a joined cluster (`--address`) only our app is deleted; Serve and Ray keep running.
    A terminal's Ctrl-C also reaches Ray's own processes (same process group), so Serve may be
    unable to answer: its shutdown gets a time limit and Ray is stopped regardless.
    """
    import threading

    import ray
    from ray import serve

    if ray.is_initialized():
        target = (lambda: serve.delete(APP_NAME)) if joined else serve.shutdown
        t = threading.Thread(target=target, name="serve-shutdown", daemon=True)
        t.start()
        t.join(serve_timeout_s)
    ray.shutdown()
