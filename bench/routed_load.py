"""Load test of the routed name (`llama-auto`) against a static variant of the same depth.

One `tabp-vllm serve --no-dense --router R --task-mask S` (S removes as many blocks as the
router's k), then `tabp-vllm bench` sends the same mixed prompts (both kinds the router splits)
to `llama-auto` and to the static variant, interleaved, at the given concurrencies. The routing
latency comes from the server's own histogram (`ray_tabp_routing_latency_seconds`), read before
and after the run, quantiles interpolated inside buckets as Prometheus' `histogram_quantile` does.

Targets (recorded, not asserted): routed / static output throughput >= 0.95 at concurrency 16;
routing p50 <= 10 ms.

    python bench/routed_load.py --router out/demo/router.json --static out/demo/demo.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tabp_vllm.hardware import cpu_info  # noqa: E402
from tabp_vllm.process import ManagedProcess, free_port, lists_models  # noqa: E402

THROUGHPUT_TARGET, P50_TARGET_S = 0.95, 0.010
HISTOGRAM = "ray_tabp_routing_latency_seconds"


def routing_histogram(metrics_url: str) -> dict[float, float]:
    """Cumulative bucket counts {le: count} of the routing latency, summed over series."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[float, float] = {}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=30).text):
        for s in family.samples:
            if s.name == f"{HISTOGRAM}_bucket":
                le = float(s.labels["le"])
                out[le] = out.get(le, 0.0) + s.value
    return out


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile on cumulative buckets (linear inside a bucket)."""
    les = sorted(buckets)
    if not les or buckets[les[-1]] <= 0:
        return None
    rank, prev_le, prev_count = q * buckets[les[-1]], 0.0, 0.0
    for le in les:
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-12)
        prev_le, prev_count = le, count
    return les[-2] if len(les) > 1 else None


def mixed_prompts(path: Path, max_tokens: int) -> Path:
    """The bundled demo questions (arithmetic and general), as a bench dataset."""
    from tabp_vllm.data import load_task, mcqa_context

    items = load_task("demo", "train").items + load_task("demo", "validation").items
    path.write_text("".join(json.dumps({"prompt": mcqa_context(i), "max_tokens": max_tokens}) + "\n"
                            for i in items))
    return path


def encoder_floor(router, dataset: Path, n: int = 40) -> dict:
    """The encoder's own time per routed text on an idle machine (before the server starts): what
    routing costs when it does not share the cores with the engines. One text at a time, as an
    idle server embeds them, with the torch threads the ingress gets."""
    import numpy as np
    import torch

    from tabp_vllm.serve.routed import _open_router_encoder

    encoder = _open_router_encoder(router)
    texts = [json.loads(line)["prompt"] for line in dataset.read_text().splitlines()][:n]
    encoder.encode(texts[:1])  # warm-up
    times = []
    for text in texts:
        t0 = time.perf_counter()
        router.nearest(encoder.encode([text]))
        times.append(time.perf_counter() - t0)
    return {"texts": len(times), "torch_threads": torch.get_num_threads(),
            "p50_s": float(np.percentile(times, 50)), "p99_s": float(np.percentile(times, 99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--router", required=True, type=Path)
    ap.add_argument("--static", required=True, type=Path, help="mask of the static variant")
    ap.add_argument("--levels", default="16")
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "routed")
    a = ap.parse_args()

    from tabp_vllm.mask import load_mask
    from tabp_vllm.models import resolve_model
    from tabp_vllm.routing.router import load_router

    model = resolve_model("llama")
    router, static = load_router(a.router, model), load_mask(a.static, model)
    if len(static.removed_layers) != router.k:
        sys.exit(f"error: the static mask removes {len(static.removed_layers)} blocks, the "
                 f"router's k is {router.k}: compare variants of the same depth")
    a.out.mkdir(parents=True, exist_ok=True)
    static_name = f"llama-{static.task}"
    port, mport = free_port(8200, 8300), free_port(8300, 8400)
    base, metrics_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics"
    dataset = mixed_prompts(a.out / "mixed_prompts.jsonl", a.output_len)
    floor = encoder_floor(router, dataset)
    server = ManagedProcess(
        [sys.executable, "-m", "tabp_vllm", "serve", "--model", "llama", "--no-dense",
         "--task-mask", str(a.static), "--router", str(a.router), "--port", str(port),
         "--metrics-port", str(mport), "--kv-cache-gib", "0.25", "--max-model-len", "1024"],
        a.out / "serve.log", name="tabp-vllm serve").start()
    t0 = time.time()
    try:
        server.wait_ready(f"{base}/v1/models", ready=lists_models([static_name, "llama-auto"]),
                          log_line="\nREADY", deadline_s=1200, interval_s=2)
        before = routing_histogram(metrics_url)
        cmd = [sys.executable, "-m", "tabp_vllm", "bench", "--url", base,
               "--variant", static_name, "--variant", "llama-auto", "--dense", static_name,
               "--mask", f"{static_name}={a.static}", "--levels", a.levels,
               "--duration", str(a.duration), "--rounds", str(a.rounds), "--dataset", str(dataset),
               "--out", str(a.out), "--name", "routed_vs_static"]
        subprocess.run(cmd, check=True)
        time.sleep(12)  # two of Ray's metric report intervals: the last routed requests counted
        after = routing_histogram(metrics_url)
    finally:
        server.stop(grace_s=120)
    delta = {le: after.get(le, 0) - before.get(le, 0) for le in after}
    bench = json.loads((a.out / "routed_vs_static.json").read_text())
    levels = []
    for level in sorted({m["level"] for m in bench["metrics"]}):
        by = {m["variant"]: m for m in bench["metrics"] if m["level"] == level}
        ratio = by["llama-auto"]["output_tokens_per_s"] / by[static_name]["output_tokens_per_s"]
        levels.append({"level": level, "routed_over_static_output_tokens_per_s": ratio,
                       "routed": {k: by["llama-auto"][k] for k in ("output_tokens_per_s", "completed", "errors")},
                       "static": {k: by[static_name][k] for k in ("output_tokens_per_s", "completed", "errors")},
                       "target": THROUGHPUT_TARGET if level == 16 else None,
                       "target_met": ratio >= THROUGHPUT_TARGET if level == 16 else None})
    p50, p99 = quantile(0.5, delta), quantile(0.99, delta)
    doc = {"router": str(a.router), "router_hash": router.content_hash(), "clusters": router.num_clusters,
           "distinct_masks": len(router.variants()), "k": router.k, "static_variant": static_name,
           "static_removed": static.removed_layers, "host": cpu_info(), "wall_s": time.time() - t0,
           "bench_command": cmd, "levels": levels,
           "routing_latency": {"requests": delta.get(float("inf"), 0), "p50_s": p50, "p99_s": p99,
                               "buckets_le_s": sorted(k for k in delta if k != float("inf")),
                               "p50_target_s": P50_TARGET_S,
                               "p50_target_met": p50 is not None and p50 <= P50_TARGET_S,
                               "encoder_alone": floor},
           "note": ("Every distinct cluster mask is one more engine: the routed traffic is spread "
                    "over the router's variants, the static traffic goes to one engine, on the "
                    "same CPU cores. Quantiles interpolated inside the histogram's buckets.")}
    (a.out / "routed_load.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({"levels": levels, "routing_latency": doc["routing_latency"]}, indent=2))


if __name__ == "__main__":
    main()
