"""`tabp-vllm serve` against a bare vLLM server on one GPU: the server's cost at the scale users run.

    python3 bench/gpu_serve.py OUTDIR [--arch llama-3.1-8b] [--batches 1,16,64] [--ks 4,8] ...
    (or `ENGINE=serve bash bench/gpu_check.sh OUTDIR`)

The server counterpart of `gpu_vllm.py` (same synthetic checkpoint, same hand-made k = 4 / k = 8
masks): one `tabp-vllm serve` (Ray Serve LLM, dense + the pruned variants, engines built by the
`tabp_pruned` loader, compiled with CUDA graphs) and one plain vLLM OpenAI server of the dense
model (vLLM's own loader, same engine arguments) share the GPU; `tabp-vllm bench` then loads every
served variant and the bare server at each concurrency (`--batches`: the closed loop's requests
in flight), interleaved in mirrored rounds, so that
server / bare and pruned / dense are ratios measured under one noise.

Memory: the card is split once for all four engines (`engine.gpu_memory_fractions`: weights +
KV cache for the same number of tokens each); `serve` gets the variants' share
(`--gpu-memory-share`) and computes the same split, the bare server the rest
(`--gpu-memory-utilization`). Engines that share a card start one at a time: the bare server
starts under the node's engine-start lock (`engine.engine_start_lock`), which the served engines
take too, so every engine profiles its memory alone.

Steps under one deadline (a step that no longer fits is skipped and recorded; the bench's length
shrinks to the time left): env, synth, masks, servers, bench. Writes OUTDIR/gpu_serve.{json,log},
the bench's OUTDIR/gpu_serve_bench.{json,md} + two plots, and the servers' logs (serve.log,
bare.log): 8 files, what one device call returns.
Falls back to vLLM's CPU engine where there is no CUDA (tests; tiny shapes).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench")) if p not in sys.path]

from gpu_scale import Run, common_args, step_env, step_synth, variant_masks  # noqa: E402
from gpu_vllm import engine_needs  # noqa: E402

NOTE = ("`tabp-vllm serve` (Ray Serve LLM, one engine per variant) against a bare vLLM OpenAI "
        "server of the dense model on the same GPU, loaded by `tabp-vllm bench`; synthetic random "
        "weights of the published shape. Speed does not depend on weight values; accuracy does.")
BENCH_STEM = "gpu_serve_bench"
CPU_KV_CACHE_GIB = 0.25  # per engine, CPU fallback only (a GPU sizes it from its fraction)
# vLLM's line per engine (a served engine's carries its replica's prefix: LLMServer:<variant>)
KV_LINE = re.compile(r"(?:LLMServer:(\S+) pid=.*)?KV cache size: ([\d,]+) tokens")


def step_masks(run: Run, model_dir: str) -> dict[str, Any]:
    """The pruned variants' mask files (hand-made, as gpu_vllm's engines use them)."""
    from tabp_vllm.mask import make_mask
    from tabp_vllm.models import load_model_config

    blocks = int(load_model_config(model_dir)["num_hidden_layers"])
    variants = variant_masks(run, model_dir, blocks)
    masks = {}
    # outside OUTDIR: a device run returns at most 8 files (the masks are in gpu_serve.json)
    folder = Path(tempfile.mkdtemp(prefix="gpu-serve-masks-"))
    for name, removed in variants.items():
        if removed:
            path = folder / f"{name}.json"
            make_mask(model_dir, removed, task=name, model_id=run.args.arch,
                      method="hand-made").save(path)
            masks[name] = str(path)
    return {"blocks": blocks, "variants": variants, "masks": masks}


def memory_plan(run: Run, model_dir: str, plan: dict[str, Any], max_model_len: int) -> dict[str, Any]:
    """GPU: one split of the card for the served engines and the bare one (same tokens cached
    each); CPU: a fixed KV cache per engine."""
    if run.doc["env"]["device"] != "cuda":
        return {"kv_cache_gib": CPU_KV_CACHE_GIB}
    from tabp_vllm.hardware import gpu_total_bytes
    from tabp_vllm.memory import gpu_memory_fractions

    engines = {**plan["variants"], "bare": []}
    needs = engine_needs(model_dir, engines, plan["blocks"])
    fractions = dict(zip(engines, gpu_memory_fractions(needs, gpu_total_bytes(), max_model_len)))
    served = sum(f for n, f in fractions.items() if n != "bare")
    return {"fractions": fractions, "serve_share": int(served * 1e4) / 1e4,
            "bare_gpu_memory_utilization": fractions["bare"]}


def kv_tokens(log_text: str) -> dict[str, int]:
    """The KV cache size (tokens) vLLM logged for each engine in a log: by served variant, or
    under "engine" for a bare server's one engine."""
    return {name or "engine": int(n.replace(",", "")) for name, n in KV_LINE.findall(log_text)}


def gpu_processes() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {exc}"


def step_servers_and_bench(run: Run, model_dir: str, plan: dict[str, Any]) -> dict[str, Any]:
    from tabp_vllm.hardware import engine_start_lock
    from tabp_vllm.loadtest.commands import run_bench
    from tabp_vllm.loadtest.servers import api_server_command
    from tabp_vllm.process import ManagedProcess, free_port, lists_models
    from tabp_vllm.serve.commands import build_spec

    a = run.args
    gpu = run.doc["env"]["device"] == "cuda"
    max_model_len = a.prompt_len + a.new_tokens + 16
    mem = memory_plan(run, model_dir, plan, max_model_len)
    # the names `serve` gives them (each mask's task is its variant's key here)
    spec = build_spec(model=model_dir, task_mask=list(plan["masks"].values()))
    names = {v.task or "dense": v.name for v in spec.variants}
    alias = names["dense"]
    port, bare_port = free_port(8000, 8100), free_port(8101, 8200)
    metrics_port = free_port(8290, 8390)
    doc: dict[str, Any] = {"memory_plan": mem, "served_names": names, "max_model_len": max_model_len,
                           "ports": {"serve": port, "bare": bare_port, "metrics": metrics_port}}
    run.doc["serve"] = doc
    run.log(f"memory plan: {mem}")
    sizing = (["--gpu-memory-share", str(mem["serve_share"])] if gpu
              else ["--kv-cache-gib", str(mem["kv_cache_gib"])])
    # batches up to the top concurrency, on both sides (fewer CUDA graphs to capture at start)
    seqs = max(a.batches)
    serve_cmd = [sys.executable, "-m", "tabp_vllm", "serve", "--model", model_dir,
                 "--port", str(port), "--metrics-port", str(metrics_port),
                 "--max-model-len", str(max_model_len), *sizing,
                 "--engine-arg", f"max_num_seqs={seqs}",
                 *[x for m in plan["masks"].values() for x in ("--task-mask", m)]]
    bare_extra = {"max_num_seqs": seqs}
    if gpu:
        bare_extra["gpu_memory_utilization"] = mem["bare_gpu_memory_utilization"]
    bare_cmd = api_server_command(model_dir, bare_port, alias, bare=True,
                                  max_model_len=max_model_len,
                                  kv_cache_gib=None if gpu else mem["kv_cache_gib"], extra=bare_extra)
    doc["commands"] = {"serve": serve_cmd, "bare": bare_cmd}
    with ExitStack() as stack:
        # every engine's log lines kept (Ray folds lines that differ only in numbers)
        serve = ManagedProcess(serve_cmd, run.out / "serve.log", name="tabp-vllm serve",
                               env={"RAY_DEDUP_LOGS": "0"})
        bare = ManagedProcess(bare_cmd, run.out / "bare.log", name="bare vLLM api_server")
        stack.callback(serve.stop, grace_s=60)
        stack.callback(bare.stop, grace_s=30)
        t0 = time.monotonic()
        # The bare engine starts alone under the lock; the served engines queue behind it.
        with engine_start_lock(log=run.log):
            serve.start()
            bare.start().wait_ready(f"http://127.0.0.1:{bare_port}/v1/models",
                                    deadline_s=max(run.remaining() - 60, 30), interval_s=2)
            doc["bare_ready_s"] = round(time.monotonic() - t0, 1)
            run.log(f"bare vLLM ready after {doc['bare_ready_s']} s")
        serve.wait_ready(f"http://127.0.0.1:{port}/v1/models", ready=lists_models(names.values()),
                         log_line="\nREADY", deadline_s=max(run.remaining() - 30, 30), interval_s=2)
        doc["serve_ready_s"] = round(time.monotonic() - t0, 1)
        doc["serve_ready_lines"] = [ln.strip() for ln in serve.log_text().splitlines()
                                    if ln.startswith("ready: ")]
        run.log(f"tabp-vllm serve ready after {doc['serve_ready_s']} s: {doc['serve_ready_lines']}")
        import httpx

        cards = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]
        doc["models"] = {c["id"]: c.get("metadata", {}) for c in cards}
        if gpu:
            doc["gpu_processes"] = gpu_processes()
        run.save()

        targets = 1 + len(names)
        per_level = targets * (a.duration + a.ramp * a.rounds)
        duration = a.duration
        left = run.remaining() - 45 - targets * 10  # stop + warm-up
        if per_level * len(a.batches) > left:  # shrink to the time left, never below 2 s a round
            duration = max(2.0 * a.rounds, left / len(a.batches) / targets - a.ramp * a.rounds)
            run.log(f"deadline: bench duration {a.duration:g} -> {duration:.1f} s per variant per level")
        doc["bench_duration_s"] = duration
        result = run_bench(
            url=f"http://127.0.0.1:{port}", variants=list(names.values()), model=model_dir,
            masks=list(plan["masks"].values()), bare_vllm=f"{alias}@http://127.0.0.1:{bare_port}",
            levels=",".join(str(x) for x in a.batches), duration=duration, rounds=a.rounds,
            ramp=a.ramp, warmup=2, input_len=a.prompt_len, output_len=a.new_tokens,
            range_ratio=0.0, out=str(run.out), stem=BENCH_STEM, progress=False,
            notes=NOTE + f" Engines: {run.doc['env'].get('gpu_name', 'CPU')}.")
        # read after the load: Ray forwards the replicas' lines to the driver's log with a delay
        doc["kv_cache_tokens"] = {"serve": kv_tokens(serve.log_text()),
                                  "bare": kv_tokens(bare.log_text())}
        run.log(f"KV cache tokens per engine: {doc['kv_cache_tokens']}")
        doc["comparison"] = result["comparison"]
        doc["metrics"] = [{k: m[k] for k in ("variant", "level", "output_tokens_per_s",
                                             "ttft_s", "itl_s", "completed", "errors") if k in m}
                          for m in result["metrics"]]
    for row in result["comparison"]["server_overhead"]:
        run.log(f"concurrency {row['level']:g}: server / bare {row['throughput_ratio']:.3f}")
    for row in result["comparison"]["speedups"]:
        run.log(f"concurrency {row['level']:g} {row['variant']}: speedup "
                f"{row['achieved_speedup']:.3f} vs ideal {row['ideal_speedup']:.3f}")
    return doc


def parse_args(argv: list[str] | None = None):
    p = common_args(__doc__.splitlines()[0], rounds=2, deadline_s=480.0)  # --batches: concurrencies
    p.add_argument("--duration", type=float, default=16.0,
                   help="Measured seconds per variant per level (split over the rounds).")
    p.add_argument("--ramp", type=float, default=2.0, help="Unmeasured load before each slice.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    run = Run(parse_args(argv), name="gpu_serve", note=NOTE)
    a = run.args
    run.log(f"gpu_serve: arch {a.arch}, concurrencies {a.batches}, prompt {a.prompt_len}, "
            f"{a.new_tokens} new tokens, deadline {a.deadline_s:.0f} s -> {run.out}")
    env = run.step("env", step_env)
    model_dir = run.step("synth", step_synth) if env else None
    plan = run.step("masks", step_masks, model_dir) if model_dir else None
    if plan:
        run.step("serve_vs_bare", step_servers_and_bench, model_dir, plan, need_s=90)
    return run.finish()  # the bench drew its own plots


if __name__ == "__main__":
    sys.exit(main())
