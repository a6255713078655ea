"""A bounded soak of `tabp-vllm serve` on loopback (issue 14): does it hold up over time?

Starts dense `llama` + `llama-k4` + `llama-k8` (masks in bench/results/masks) on 127.0.0.1, then
for --minutes runs mixed load from --clients concurrent clients: completions and chat, streaming
and not, a share of clients hanging up early (streams after their first event, plain requests on
a short timeout), and every --malformed-every-th request a malformed one (bad JSON, unknown model,
missing field, max_tokens=-1). Every process of the server's session has its RSS sampled every
--sample-s seconds. Pass when:
- every valid request that was not hung up on succeeded (zero errors), every malformed one got a
  4xx OpenAI error object;
- no process with more than 100 MiB grew its RSS by more than 5 % from the end of the warm-up
  (mean of its first three samples after it) to the end (mean of its last three);
- after the load, one short request per variant (an engine step records vLLM's gauges) leaves
  `ray_vllm_num_requests_running` at 0 for every variant.

    python bench/soak.py                 # 15 minutes
    python bench/soak.py --minutes 2     # a short one

Writes bench/results/soak/soak.json and soak.png (or --out); exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

from tabp_vllm.loadtest.soak import (API_KEY, RSS_FLOOR_MIB, RSS_GROWTH_LIMIT, VARIANTS, Load,
                                     RssSampler, rss_report)
from tabp_vllm.prometheus import scrape, sum_by

RESULTS = Path(__file__).resolve().parent / "results"


def plot(samples, warmup_s: float, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6))
    for key, series in sorted(samples.items()):
        if max(v for _, v in series) < RSS_FLOOR_MIB:
            continue
        ax.plot([t / 60 for t, _ in series], [v for _, v in series], label=key, lw=1.2)
    ax.axvline(warmup_s / 60, color="grey", ls="--", lw=1, label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    c = summary["requests"]
    ax.set_title(f"tabp-vllm serve soak: {summary['minutes']} min, {c['ok'] + c['stream_ok']} ok, "
                 f"{c['hung_up']} hung up, {c['malformed_ok']} malformed, {c['errors']} errors; "
                 f"max RSS growth {summary['rss_max_growth']:.1%}", fontsize=9)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    from tabp_vllm.errors import TabpError
    from tabp_vllm.serve.launcher import ServeProcess
    from tabp_vllm.serve.options import EngineOptions, ServeOptions, VariantOptions

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--warmup-minutes", type=float, default=None,
                    help="default: a fifth of --minutes, at most 3")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--disconnect-share", type=float, default=0.2)
    ap.add_argument("--malformed-every", type=int, default=25)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--port", type=int, default=8061)
    ap.add_argument("--metrics-port", type=int, default=8092)
    ap.add_argument("--kv-cache-gib", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "soak"))
    args = ap.parse_args()
    warmup_s = 60 * (args.warmup_minutes if args.warmup_minutes is not None
                     else min(3.0, args.minutes / 5))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    serve = ServeProcess(ServeOptions(
        model="llama", host="127.0.0.1", port=args.port, metrics_port=args.metrics_port,
        api_key=API_KEY, engine=EngineOptions(kv_cache_gib=args.kv_cache_gib, max_model_len=512),
        variants=[VariantOptions(mask=str(RESULTS / "masks" / f"{k}.json")) for k in ("k4", "k8")]),
        out / "serve.log", env={"RAY_metrics_report_interval_ms": "2000"}, stop_grace_s=180)
    base = serve.base_url
    summary: dict = {}
    try:
        try:
            serve.start().wait_ready()
        except TabpError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        sampler = RssSampler(serve.pid, args.sample_s)
        sampler.start()
        load = Load(base, args.seed, args.disconnect_share, args.malformed_every)
        t0 = time.time()
        asyncio.run(load.run(args.clients, args.minutes * 60))
        load_s = time.time() - t0
        time.sleep(3)
        # An engine records its gauges on a step: one short request each, then read them.
        headers = {"Authorization": f"Bearer {API_KEY}"}
        for v in VARIANTS:
            httpx.post(f"{base}/v1/completions", headers=headers, timeout=120,
                       json={"model": v, "prompt": "Hi", "max_tokens": 2}).raise_for_status()
        running: dict = {}
        for _ in range(20):
            time.sleep(1.5)
            running = sum_by(scrape(serve.metrics_url), "ray_vllm_num_requests_running")
            if set(VARIANTS) <= set(running) and not any(running.values()):
                break
        sampler.stop_event.set()
        sampler.join(timeout=30)
        sampler.sample()
        rss = rss_report(sampler.samples, warmup_s)
        checked = {k: r for k, r in rss.items() if r["checked"]}
        max_growth = max((r["growth"] for r in checked.values()), default=0.0)
        summary = {
            "minutes": args.minutes, "load_s": round(load_s, 1), "warmup_s": warmup_s,
            "clients": args.clients, "disconnect_share": args.disconnect_share,
            "malformed_every": args.malformed_every, "sample_s": args.sample_s,
            "requests": load.counts, "completed_per_variant": load.per_variant,
            "errors": load.errors, "running_at_end": running,
            "rss_max_growth": max_growth, "rss": rss,
            "rss_samples": {k: [[round(t, 1), round(v, 1)] for t, v in s]
                            for k, s in sampler.samples.items()},
        }
        checks = {
            "zero_errors": load.counts["errors"] == 0,
            "rss_growth_within_5pct": max_growth <= RSS_GROWTH_LIMIT,
            "running_back_to_zero": set(VARIANTS) <= set(running) and not any(running.values()),
            "every_variant_served": all(load.per_variant.values()),
        }
        summary["checks"] = checks
        summary["passed"] = all(checks.values())
    finally:
        left = serve.stop()
        if summary:
            summary["orphans_after_stop"] = [list(p) for p in left]
    (out / "soak.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(sampler.samples, warmup_s, summary, out / "soak.png")
    c = summary["requests"]
    print(f"soak {args.minutes} min: {c}; max RSS growth {summary['rss_max_growth']:.2%}; "
          f"running at end {summary['running_at_end']}; checks {summary['checks']}")
    return 0 if summary["passed"] and not left else 1


if __name__ == "__main__":
    sys.exit(main())
