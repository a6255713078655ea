"""Time to first token through `tabp-vllm serve` with leading-edge vs Ray's windowed stream batching.

    python bench/stream_batching.py [--requests 40] [--max-tokens 16] [--interval-ms 50]

Ray Serve LLM sends a stream's outputs in fixed windows (50 ms by default), the first token too;
`--stream-batching leading-edge` (the default, `tabp_vllm/serve/streaming.py`) sends the first
output of a burst at once. Three servers of the dense demo model stay up side by side: `serve`
with leading-edge batching, `serve` with Ray's windows, and a bare vLLM api_server (the floor).
One streamed completion at a time goes to each in turn (the order shuffled per round), so the
three see the same machine state request by request; the per-request differences to the bare
server that follows or precedes it cancel the drift that load from other jobs brings.
Writes bench/results/NAME.{json,md} (`--name`, default stream_batching).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"


async def measure(targets, requests: int, max_tokens: int, seed: int):
    import httpx

    from tabp_vllm.loadtest.loadgen import RequestSpec, send_request

    rng = random.Random(seed)
    out = {t.label: [] for t in targets}
    async with httpx.AsyncClient() as client:
        for spec in [RequestSpec([rng.randrange(256, 40000) for _ in range(32)], max_tokens)
                     for _ in range(2)]:  # warm-up, not recorded
            for t in targets:
                await send_request(client, t, spec, timeout=120)
        for i in range(requests):
            spec = RequestSpec([rng.randrange(256, 40000) for _ in range(32)], max_tokens)
            order = list(targets)
            rng.shuffle(order)
            for t in order:
                r = await send_request(client, t, spec, timeout=120)
                if not r.ok:
                    raise RuntimeError(f"{t.label}: {r.error}")
                out[t.label].append({"round": i, "ttft_s": r.ttft, "e2e_s": r.e2e,
                                     "chunks": len(r.chunk_times), "tokens": r.output_tokens})
    return out


def main() -> None:
    from tabp_vllm.hardware import cpu_info
    from tabp_vllm.errors import TabpError
    from tabp_vllm.loadtest.loadgen import Target
    from tabp_vllm.loadtest.servers import api_server_command
    from tabp_vllm.models import resolve_model
    from tabp_vllm.process import ManagedProcess, free_port, lists_models

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40, help="per server")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--interval-ms", type=float, default=50.0, help="stream batching interval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="stream_batching", help="output file stem")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite NAME.md and the summary from NAME.json's per-request records")
    a = ap.parse_args()
    if a.report_only:
        write_report(json.loads((RESULTS / f"{a.name}.json").read_text()), a.name)
        return
    model = resolve_model("llama")
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = ["--model", "llama", "--kv-cache-gib", "0.25", "--max-model-len", "512",
              "--stream-batching-interval-ms", str(a.interval_ms)]
    with ExitStack() as stack:
        servers, targets = [], []
        for label, mode in (("leading-edge", "leading-edge"), ("ray-windows", "ray")):
            port, metrics = free_port(8000 + len(servers), 8100), free_port(8290 + len(servers), 8390)
            p = ManagedProcess([sys.executable, "-m", "tabp_vllm", "serve", *common, "--port",
                                str(port), "--metrics-port", str(metrics), "--stream-batching", mode],
                               logs / f"stream-{label}.log", name=f"serve ({label})")
            stack.callback(p.stop, grace_s=60)
            servers.append((p.start(), f"http://127.0.0.1:{port}"))
            targets.append(Target("llama", f"http://127.0.0.1:{port}", label=label))
            time.sleep(20)  # Ray's start takes both cores for a while: do not overlap them
        bare_port = free_port(8101, 8200)
        bare = ManagedProcess(api_server_command(model, bare_port, "llama", bare=True,
                                                 kv_cache_gib=0.25, max_model_len=512),
                              logs / "stream-bare.log", name="bare vLLM api_server")
        stack.callback(bare.stop, grace_s=30)
        targets.append(Target("llama", f"http://127.0.0.1:{bare_port}", label="bare-vllm"))
        try:
            bare.start().wait_ready(f"http://127.0.0.1:{bare_port}/v1/models", deadline_s=600,
                                    interval_s=2)
            for p, url in servers:
                p.wait_ready(f"{url}/v1/models", ready=lists_models(["llama"]),
                             log_line="\nREADY", deadline_s=900, interval_s=2)
        except TabpError as exc:
            sys.exit(f"error: {exc}")
        runs = asyncio.run(measure(targets, a.requests, a.max_tokens, a.seed))

    doc = {"host": cpu_info(), "date": time.strftime("%Y-%m-%d"), "seed": a.seed,
           "requests": a.requests, "max_tokens": a.max_tokens, "prompt_tokens": 32,
           "interval_ms": a.interval_ms, "runs": runs}
    write_report(doc, a.name)


def write_report(doc: dict, name: str) -> None:
    """Summarise the per-request records (TTFT percentiles, differences to the bare server's
    TTFT of the same round) into RESULTS/NAME.{json,md}."""
    import numpy as np

    runs = doc["runs"]
    bare_ttft = {r["round"]: r["ttft_s"] for r in runs["bare-vllm"]}
    summary = {}
    for label, rows in runs.items():
        ttft = [r["ttft_s"] * 1e3 for r in rows]
        diff = [(r["ttft_s"] - bare_ttft[r["round"]]) * 1e3 for r in rows]
        summary[label] = {
            "ttft_p50_ms": round(float(np.percentile(ttft, 50)), 1),
            "ttft_p90_ms": round(float(np.percentile(ttft, 90)), 1),
            "ttft_minus_bare_p50_ms": round(statistics.median(diff), 1),
            "ttft_minus_bare_mean_ms": round(statistics.fmean(diff), 1),
            "e2e_p50_s": round(statistics.median(r["e2e_s"] for r in rows), 3),
            "chunks_per_request": round(statistics.fmean(r["chunks"] for r in rows), 1),
            "tokens_per_request": round(statistics.fmean(r["tokens"] for r in rows), 1),
        }
    doc["summary"] = summary
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# Streamed TTFT: leading-edge vs Ray's windowed batching, through `tabp-vllm serve`", "",
             f"{doc['date']}, {doc['host'].get('model')}; dense demo model, one streamed completion "
             f"at a time ({doc['requests']} per server, prompt {doc['prompt_tokens']} tokens, "
             f"{doc['max_tokens']} new tokens, seed {doc['seed']}), servers in a shuffled order "
             f"each round; stream batching interval {doc['interval_ms']:g} ms.",
             "", "| server | TTFT p50 / p90 ms | TTFT - bare's, same round: median / mean ms | "
             "E2E p50 s | chunks per request |", "|---|---|---|---|---|"]
    for label, s in summary.items():
        lines.append(f"| {label} | {s['ttft_p50_ms']:.0f} / {s['ttft_p90_ms']:.0f} | "
                     f"{s['ttft_minus_bare_p50_ms']:.1f} / {s['ttft_minus_bare_mean_ms']:.1f} | "
                     f"{s['e2e_p50_s']:.2f} | {s['chunks_per_request']:.1f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
