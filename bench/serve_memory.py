"""Memory of a served app, per process and per variant: `tabp-vllm serve` + psutil.

Starts `tabp-vllm serve` (dense + the given number of pruned variants of the demo model), waits for
READY, sends one request to each variant (the KV cache and the kernels get touched), then walks the
server's process tree and attributes every process:

- per variant: the Ray Serve replica actor (`ray::ServeReplica:tabp:LLMServer:<name>`) and every
  process below it (vLLM's engine core, the executor's worker where it is a process of its own);
- per app: the driver (`tabp-vllm serve`), the ingress replica, the proxy, the Serve controller and
  Ray's own processes (GCS, raylet, agents).

RSS counts pages shared between processes (the torch / vLLM libraries) once per process; PSS
divides them among the sharers, so summed PSS is what the machine actually spends. Each setting
(`--setting NAME:KEY=VAL,...`: environment variables of the serve process) runs in turn; results go
to bench/results/serve_memory.json, with the target "per-variant RSS <= weights + KV + 0.6 GiB".

    flock /tmp/tabp-heavy.lock python bench/serve_memory.py --pruned 2 --kv-cache-gib 0.25
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tabp_vllm.hardware import cpu_info  # noqa: E402
from tabp_vllm.memory import GiB  # noqa: E402
from tabp_vllm.process import ManagedProcess, free_port, lists_models  # noqa: E402

TARGET_OVERHEAD_GIB = 0.6
LLM_REPLICA = "ray::ServeReplica:tabp:LLMServer:"


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return ""


def app_role(cmd: str) -> str:
    for key, role in (("TabpIngress", "ingress"), ("ProxyActor", "proxy"),
                      ("ServeController", "serve controller"), ("gcs_server", "ray gcs"),
                      ("raylet", "raylet"), ("dashboard", "ray dashboard/agent"),
                      ("agent", "ray dashboard/agent"), ("tabp_vllm serve", "driver")):
        if key in cmd:
            return role
    return "other ray"


def variant_role(cmd: str) -> str:
    if cmd.startswith(LLM_REPLICA):
        return "replica actor"
    if "EngineCore" in cmd:
        return "engine core"
    if "Worker" in cmd or "multiprocessing" in cmd:
        return "vllm worker"
    return "other"


def snapshot(root_pid: int) -> dict:
    """Every process under `root_pid`, attributed to a variant or to the app."""
    from tabp_vllm.process import _session

    root = psutil.Process(root_pid)
    procs = [root, *root.children(recursive=True)]
    seen = {p.pid for p in procs}
    for p in psutil.process_iter():  # re-parented ones: same session (serve is its leader)
        if p.pid not in seen and _session(p.pid) == root_pid:
            procs.append(p)
    by_pid = {p.pid: p for p in procs}
    variants: dict[str, list[dict]] = {}
    app: list[dict] = []
    for p in procs:
        try:
            mem = p.memory_full_info()
        except psutil.Error:
            continue
        cmd = _cmd(p)
        row = {"pid": p.pid, "cmd": cmd[:120], "rss": mem.rss, "pss": getattr(mem, "pss", mem.rss),
               "uss": mem.uss}
        owner, q = None, p
        while q is not None:  # the nearest LLMServer replica at or above this process
            qc = _cmd(q)
            if qc.startswith(LLM_REPLICA):
                owner = qc[len(LLM_REPLICA):].split()[0]
                break
            try:
                q = by_pid.get(q.ppid())
            except psutil.Error:
                q = None
        if owner:
            variants.setdefault(owner, []).append({**row, "role": variant_role(cmd)})
        else:
            app.append({**row, "role": app_role(cmd)})
    return {"variants": variants, "app": app}


def summarize(snap: dict, weights: dict[str, int], kv_bytes: int) -> dict:
    out = {}
    for name, rows in snap["variants"].items():
        roles: dict[str, dict[str, int]] = {}
        for r in rows:
            agg = roles.setdefault(r["role"], {"rss": 0, "pss": 0, "n": 0})
            agg["rss"] += r["rss"]
            agg["pss"] += r["pss"]
            agg["n"] += 1
        rss, pss = sum(r["rss"] for r in rows), sum(r["pss"] for r in rows)
        w = weights.get(name.replace("_", "."), weights.get(name, 0))
        target = w + kv_bytes + TARGET_OVERHEAD_GIB * GiB
        out[name] = {"rss_gib": rss / GiB, "pss_gib": pss / GiB, "processes": len(rows),
                     "by_role_rss_gib": {k: v["rss"] / GiB for k, v in roles.items()},
                     "by_role_pss_gib": {k: v["pss"] / GiB for k, v in roles.items()},
                     "weights_gib": w / GiB, "kv_cache_gib": kv_bytes / GiB,
                     "target_gib": target / GiB, "overhead_rss_gib": (rss - w - kv_bytes) / GiB,
                     "meets_target_rss": rss <= target}
    app_roles: dict[str, float] = {}
    for r in snap["app"]:
        app_roles[r["role"]] = app_roles.get(r["role"], 0) + r["rss"] / GiB
    return {"variants": out, "app_rss_gib": app_roles,
            "app_total_rss_gib": sum(app_roles.values()),
            "app_total_pss_gib": sum(r["pss"] for r in snap["app"]) / GiB,
            "total_pss_gib": (sum(r["pss"] for rows in snap["variants"].values() for r in rows)
                              + sum(r["pss"] for r in snap["app"])) / GiB}


def run_setting(name: str, env: dict[str, str], masks: list[Path], kv_gib: float, out_dir: Path,
                extra_args: list[str]) -> dict:
    from tabp_vllm.serve.commands import build_spec

    port, mport = free_port(8040, 8080), free_port(8080, 8100)
    cmd = [sys.executable, "-m", "tabp_vllm", "serve", "--model", "llama", "--port", str(port),
           "--metrics-port", str(mport), "--kv-cache-gib", str(kv_gib), "--max-model-len", "512",
           "--no-memory-check", *extra_args]
    for m in masks:
        cmd += ["--task-mask", str(m)]
    spec = build_spec(model="llama", task_mask=masks, kv_cache_gib=kv_gib)
    names = [v.name for v in spec.variants]
    weights = {n.name: n.weight_bytes for n in spec.engine_needs(gpu=False)}
    proc = ManagedProcess(cmd, out_dir / f"serve-{name}.log", env=env, cwd=REPO,
                          name=f"serve ({name})")
    t0 = time.monotonic()
    proc.start()
    try:
        proc.wait_ready(f"http://127.0.0.1:{port}/v1/models", ready=lists_models(names),
                        log_line="READY", deadline_s=1500, interval_s=3)
        ready_s = time.monotonic() - t0
        for n in names:  # touch the KV cache and the decode path of every engine
            httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=300,
                       json={"model": n, "prompt": "The capital of France is", "max_tokens": 16})
        time.sleep(3)
        snap = snapshot(proc.pid)
        progress = [ln for ln in proc.log_text().splitlines() if ln.startswith("ready: ")]
    finally:
        proc.stop(grace_s=120)
    return {"setting": name, "env": env, "ready_s": round(ready_s, 1), "progress_lines": progress,
            **summarize(snap, weights, int(kv_gib * GiB)), "processes": snap}


def markdown_table(doc: dict) -> str:
    """The docs/serving.md table: one row per setting, the dense variant's numbers."""
    rows = ["| setting | per-variant RSS (replica actor + engine core + worker) | per-variant PSS | "
            "target RSS (weights + KV + 0.6) | app PSS (driver, Ray, Serve, ingress) | total PSS | "
            "ready after |", "|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        v = r["variants"].get("llama") or next(iter(r["variants"].values()))
        parts = " + ".join(f"{v['by_role_rss_gib'].get(k, 0):.2f}"
                           for k in ("replica actor", "engine core", "vllm worker")
                           if k in v["by_role_rss_gib"])
        rows.append(f"| {r['setting']} | {v['rss_gib']:.2f} GiB ({parts}) | {v['pss_gib']:.2f} GiB | "
                    f"{v['target_gib']:.2f} GiB | {r['app_total_pss_gib']:.2f} GiB | "
                    f"{r['total_pss_gib']:.2f} GiB | {r['ready_s']:.0f} s |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pruned", type=int, default=2, help="pruned variants besides dense")
    ap.add_argument("--kv-cache-gib", type=float, default=0.25)
    ap.add_argument("--setting", action="append", default=[], help=(
        "NAME or NAME:KEY=VAL,KEY=VAL: environment variables of serve, or engine.KEY=VAL engine "
        "options (a YAML config); default: one setting, 'default'"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_memory.json")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `serve` argument")
    args = ap.parse_args()

    from tabp_vllm.mask import make_mask
    from tabp_vllm.models import resolve_model

    model = resolve_model("llama")
    work = args.out.parent / "serve_memory_work"
    work.mkdir(parents=True, exist_ok=True)
    masks = [make_mask(model, list(range(26 - 2 * i, 30 - 2 * i)), task=f"m{i}", model_id="llama")
             .save(work / f"m{i}.json") for i in range(args.pruned)]
    results = []
    for s in args.setting or ["default"]:
        name, _, kvs = s.partition(":")
        pairs = dict(kv.split("=", 1) for kv in kvs.split(",") if kv)
        env = {k: v for k, v in pairs.items() if not k.startswith("engine.")}
        engine = {k[len("engine."):]: yaml.safe_load(v) for k, v in pairs.items() if k.startswith("engine.")}
        extra = list(args.serve_arg)
        if engine:
            cfg = work / f"{name}.yaml"
            cfg.write_text(yaml.safe_dump({"engine": engine}))
            extra += ["--config", str(cfg)]
        res = run_setting(name, env, masks, args.kv_cache_gib, work, extra)
        res["engine"] = engine
        results.append(res)
        for v, m in res["variants"].items():
            print(f"{name:>14} {v:>10}: RSS {m['rss_gib']:.2f} GiB (PSS {m['pss_gib']:.2f}) "
                  f"target {m['target_gib']:.2f} "
                  + " ".join(f"{k}={x:.2f}" for k, x in m["by_role_rss_gib"].items()), flush=True)
        print(f"{name:>14} app: " + " ".join(f"{k}={x:.2f}" for k, x in res["app_rss_gib"].items())
              + f"  total PSS {res['total_pss_gib']:.2f} GiB, ready in {res['ready_s']} s", flush=True)
    doc = {"cpu": cpu_info(), "machine_memory_gib": psutil.virtual_memory().total / GiB,
           "kv_cache_gib": args.kv_cache_gib, "target": f"per-variant RSS <= weights + KV cache + "
           f"{TARGET_OVERHEAD_GIB} GiB", "results": results}
    prev = json.loads(args.out.read_text()) if args.out.exists() else {}
    done = {r["setting"]: r for r in prev.get("results", [])}
    done.update({r["setting"]: r for r in results})
    doc["results"] = list(done.values())
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")
    print(markdown_table(doc))


if __name__ == "__main__":
    main()
