"""Memory: of a served app per process and per variant (`serve`), and of the pruned engine's weights
against dense (`weights`).

    flock /tmp/tabp-heavy.lock python bench/memory.py serve --pruned 2 --kv-cache-gib 0.25 \
        --setting uni --setting mp:engine.cpu_uniproc=false
    python bench/memory.py weights [--model llama] [--dtype auto] [--remove 26-29 --remove 22-29]

`serve` starts `tabp-vllm serve` (dense + `--pruned` pruned variants of the demo model) once per
`--setting`, waits for READY, sends one request to each variant (the KV cache and the kernels get
touched), then walks the server's process tree and attributes every process:
- per variant: the Ray Serve replica actor (`ray::ServeReplica:tabp:LLMServer:<name>`) and every
  process below it (vLLM's engine core, the executor's worker where it is a process of its own);
- per app: the driver (`tabp-vllm serve`), the ingress replica, the proxy, the Serve controller and
  Ray's own processes (GCS, raylet, agents).
RSS counts pages shared between processes (the torch / vLLM libraries) once per process; PSS
divides them among the sharers, so summed PSS is what the machine actually spends. A setting is
`NAME:KEY=VAL,...`: `engine.KEY` / `request_path.KEY` serve options, anything else an environment
variable of the server. Results merge into OUT/serve_memory.json (one entry per setting name), with
the target "per-variant RSS <= weights + KV + 0.6 GiB" and the table docs/serving.md shows.

`weights` builds the real vLLM engine for dense and each mask, one at a time, and records what
the loader materialised (weight bytes, in the engine's dtype), the decoder depth the engine built,
and the engine worker's resident memory: OUT/weight_memory.{json,md}.

`phases` builds one engine as `serve` does (`engine_args_for`: bf16, eager, explicit KV cache), in
this process (engine core and worker in-process), and reads this process' memory
(/proc/self/smaps_rollup and glibc's mallinfo2) at each phase: after import, around the tokenizer,
around the weight load and the CPU GEMM packing (`process_weights_after_loading`), around the KV
cache allocation, once the engine is ready, after rounds of requests, and after `malloc_trim(0)`
(what glibc held freed but unreturned): OUT/engine_phases.json, one entry per --name.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml

from tabp_vllm.hardware import cpu_info
from tabp_vllm.memory import GiB
from tabp_vllm.serve.process_memory import smaps_rollup, snapshot

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # engine_model_stats pickles a function
OUT = Path(__file__).resolve().parent / "results" / "memory"


# ------------------------------------------------------------------------------------ serve

TARGET_OVERHEAD_GIB = 0.6


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


def run_setting(name: str, env: dict[str, str], options: dict, masks: list[Path], kv_gib: float,
                log_dir: Path, model: str = "llama") -> dict:
    """One server with this setting: ready time, then every process' memory."""
    from tabp_vllm.process import free_port
    from tabp_vllm.serve.launcher import ServeProcess
    from tabp_vllm.serve.options import ServeOptions

    doc = {"model": model, "port": free_port(8040, 8080), "metrics_port": free_port(8080, 8100),
           "memory_check": False, "variants": [{"mask": str(m)} for m in masks],
           "engine": {"kv_cache_gib": kv_gib, "max_model_len": 512}}
    for section, values in options.items():
        doc[section] = {**doc.get(section, {}), **values}
    server = ServeProcess(ServeOptions.model_validate(doc), log_dir / f"serve-{name}.log", env=env,
                          ready_timeout_s=1500)
    names = server.variant_names
    weights = {n.name: n.weight_bytes for n in server.spec.engine_needs(gpu=False)}
    t0 = time.monotonic()
    with server:  # returns once READY; leaving it stops the server
        ready_s = time.monotonic() - t0
        for n in names:  # touch the KV cache and the decode path of every engine
            httpx.post(f"{server.base_url}/v1/completions", timeout=300,
                       json={"model": n, "prompt": "The capital of France is", "max_tokens": 16})
        time.sleep(3)
        snap = snapshot(server.pid)
        progress = [ln for ln in server.log_text().splitlines() if ln.startswith("ready: ")]
    return {"setting": name, "env": env, "ready_s": round(ready_s, 1), "progress_lines": progress,
            **summarize(snap, weights, int(kv_gib * GiB)), "processes": snap}


def parse_setting(spec: str) -> tuple[str, dict[str, str], dict[str, dict]]:
    """NAME:KEY=VAL,... -> (name, environment, serve options by section)."""
    name, _, kvs = spec.partition(":")
    env, options = {}, {}
    for kv in filter(None, kvs.split(",")):
        key, _, value = kv.partition("=")
        section, dot, field = key.partition(".")
        if dot and section in ("engine", "request_path"):
            options.setdefault(section, {})[field] = yaml.safe_load(value)
        else:
            env[key] = value
    return name, env, options


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


def serve(argv: list[str]) -> None:
    """Memory of `tabp-vllm serve` per process and per variant, one server per setting."""
    ap = argparse.ArgumentParser(prog="memory.py serve", description=serve.__doc__)
    ap.add_argument("--model", default="llama")
    ap.add_argument("--pruned", type=int, default=2,
                    help="pruned variants besides dense (the demo model's blocks 26-29, 24-27, ...)")
    ap.add_argument("--kv-cache-gib", type=float, default=0.25)
    ap.add_argument("--setting", action="append", default=[], help=(
        "NAME or NAME:KEY=VAL,KEY=VAL: engine.KEY / request_path.KEY serve options, other keys "
        "environment variables of serve; default: one setting, 'default'"))
    ap.add_argument("--out", type=Path, default=OUT / "serve_memory.json")
    args = ap.parse_args(argv)

    from tabp_vllm.mask import make_mask
    from tabp_vllm.models import resolve_model

    if args.pruned and args.model != "llama":
        raise SystemExit("--pruned masks are the demo model's blocks: use --pruned 0 with --model")
    model = resolve_model(args.model)
    work = Path(__file__).resolve().parent / "results" / "logs" / "serve_memory"  # git-ignored
    work.mkdir(parents=True, exist_ok=True)
    masks = [make_mask(model, list(range(26 - 2 * i, 30 - 2 * i)), task=f"m{i}", model_id="llama")
             .save(work / f"m{i}.json") for i in range(args.pruned)]
    results = []
    for s in args.setting or ["default"]:
        name, env, options = parse_setting(s)
        res = run_setting(name, env, options, masks, args.kv_cache_gib, work, args.model)
        res["engine"] = options.get("engine", {})
        results.append(res)
        for v, m in res["variants"].items():
            print(f"{name:>14} {v:>10}: RSS {m['rss_gib']:.2f} GiB (PSS {m['pss_gib']:.2f}) "
                  f"target {m['target_gib']:.2f} "
                  + " ".join(f"{k}={x:.2f}" for k, x in m["by_role_rss_gib"].items()), flush=True)
        print(f"{name:>14} app: " + " ".join(f"{k}={x:.2f}" for k, x in res["app_rss_gib"].items())
              + f"  total PSS {res['total_pss_gib']:.2f} GiB, ready in {res['ready_s']} s", flush=True)
    doc = {"model": args.model, "cpu": cpu_info(), "machine_memory_gib": psutil.virtual_memory().total / GiB,
           "kv_cache_gib": args.kv_cache_gib, "target": f"per-variant RSS <= weights + KV cache + "
           f"{TARGET_OVERHEAD_GIB} GiB", "results": results}
    prev = json.loads(args.out.read_text()) if args.out.exists() else {}
    done = {r["setting"]: r for r in prev.get("results", [])}
    done.update({r["setting"]: r for r in results})
    doc["results"] = list(done.values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")
    print(markdown_table(doc))


# ---------------------------------------------------------------------------------- weights

def parse_ranges(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def weights(argv: list[str]) -> None:
    """Weight bytes, decoder depth and worker RSS of the offline engine, dense and per mask."""
    from tabp_vllm.engine import build_llm, engine_model_stats
    from tabp_vllm.mask import make_mask
    from tabp_vllm.models import resolve_model

    ap = argparse.ArgumentParser(prog="memory.py weights", description=weights.__doc__)
    ap.add_argument("--model", default="llama")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--remove", action="append", default=None,
                    help="blocks to remove, e.g. 26-29 (repeatable; default: k=4 and k=8)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    model = resolve_model(args.model)
    variants = {"dense": []}
    for spec in args.remove or ["26-29", "22-29"]:
        blocks = parse_ranges(spec)
        variants[f"k={len(blocks)} ({spec})"] = blocks

    rows = []
    for name, removed in variants.items():
        mask = make_mask(model, removed, task=name) if removed else None
        llm = build_llm(model, mask, dtype=args.dtype, kv_cache_gib=0.25, max_model_len=256)
        stats = engine_model_stats(llm)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        rows.append({"variant": name, "removed": removed, **stats})
        print(name, stats, flush=True)

    dense = rows[0]["weight_bytes"]
    for row in rows:
        row["weight_ratio"] = row["weight_bytes"] / dense
        row["kept_ratio"] = row["num_layers"] / rows[0]["num_layers"]
    result = {"model": args.model, "dtype": args.dtype, "host": platform.node(),
              "cpu_count": os.cpu_count(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "weight_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| variant | blocks kept | weight bytes | vs dense | worker RSS (MiB) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['num_layers']} | {r['weight_bytes']:,} | "
                     f"{r['weight_ratio']:.3f} | {r['worker_rss_bytes'] / 2**20:,.0f} |")
    (args.out / "weight_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ----------------------------------------------------------------------------------- phases

class _MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


_LIBC = ctypes.CDLL(None)
_LIBC.mallinfo2.restype = _MallInfo2


def memory_reading(label: str) -> dict:
    """This process' memory now: smaps_rollup (RSS, PSS, anonymous, USS, and `file`: the rest of
    RSS, shared memory included, where the serve sampler's excludes it: `parse_smaps_rollup`)
    and glibc's heap: in use by malloc (`malloc_used`: small blocks in its arenas + its own
    mmaps) and held free in the arenas (`malloc_free`: freed, not returned to the OS)."""
    rollup = smaps_rollup()
    mi = _LIBC.mallinfo2()
    out = {"phase": label, **rollup,
           "malloc_used": mi.uordblks + mi.hblkhd, "malloc_free": mi.fordblks,
           "malloc_mmapped": mi.hblkhd}
    print(f"{label:>28}: " + " ".join(f"{k} {v / GiB:.3f}" for k, v in out.items() if k != "phase"),
          flush=True)
    return out


def _around(owner, attr: str, label: str, readings: list[dict]) -> None:
    """Wrap owner.attr so that a reading is taken before and after each call."""
    inner = getattr(owner, attr)

    def wrapped(*a, **kw):
        readings.append(memory_reading(f"before {label}"))
        try:
            return inner(*a, **kw)
        finally:
            readings.append(memory_reading(f"after {label}"))
    setattr(owner, attr, wrapped)


def phases(argv: list[str]) -> None:
    """One engine as serve builds it, in this process, its memory read at each phase."""
    ap = argparse.ArgumentParser(prog="memory.py phases", description=phases.__doc__)
    ap.add_argument("--model", default="llama")
    ap.add_argument("--mask", type=Path, default=None, help="a mask file (default: dense)")
    ap.add_argument("--name", default=None, help="entry name (default: model, or model-mask)")
    ap.add_argument("--kv-cache-gib", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of requests")
    ap.add_argument("--batch", type=int, default=16, help="requests per round (serve's concurrency)")
    ap.add_argument("--out", type=Path, default=OUT / "engine_phases.json")
    args = ap.parse_args(argv)
    readings = [memory_reading("after python start")]

    import torch
    import vllm
    from vllm.model_executor.model_loader import base_loader
    from vllm.v1.worker import cpu_worker

    from tabp_vllm.engine import build_llm, engine_model_stats
    from tabp_vllm.flops import Kept
    from tabp_vllm.mask import load_mask
    from tabp_vllm.memory import engine_needs
    from tabp_vllm.models import load_model_config, resolve_model

    readings.append(memory_reading("after import torch, vllm"))
    model = resolve_model(args.model)
    mask = load_mask(args.mask, model) if args.mask else None
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model)
    readings.append(memory_reading("after a tokenizer"))
    _around(cpu_worker.CPUWorker, "load_model", "model load", readings)
    _around(base_loader, "process_weights_after_loading", "GEMM packing", readings)
    _around(cpu_worker.CPUWorker, "initialize_from_config", "KV cache", readings)
    llm = build_llm(model, mask, kv_cache_gib=args.kv_cache_gib)
    readings.append(memory_reading("engine ready"))
    stats = engine_model_stats(llm)

    # serve's load: random-token prompts of ~128 tokens, 32 output tokens, `batch` at a time
    rng = random.Random(0)
    vocab = load_model_config(model)["vocab_size"]
    params = vllm.SamplingParams(max_tokens=32, ignore_eos=True, temperature=0)
    for r in range(args.rounds):
        prompts = [{"prompt_token_ids": [rng.randrange(100, vocab - 100)
                                         for _ in range(rng.randint(64, 192))]}
                   for _ in range(args.batch)]
        llm.generate(prompts, params, use_tqdm=False)
        readings.append(memory_reading(f"after request round {r + 1}"))
    gc.collect()
    _LIBC.malloc_trim(0)
    readings.append(memory_reading("after gc + malloc_trim"))

    kept = Kept.of_mask(mask) if mask else stats["num_layers"]
    need = engine_needs(model, {"x": kept}, gpu=False)[0]
    name = args.name or (f"{args.model}-{args.mask.stem}" if args.mask else args.model)
    entry = {"model": args.model, "mask": str(args.mask) if args.mask else None,
             "torch": torch.__version__, "vllm": vllm.__version__,
             "kv_cache_gib": args.kv_cache_gib, "rounds": args.rounds, "batch": args.batch,
             "weight_bytes_loaded": stats["weight_bytes"], "weight_bytes_model": need.weight_bytes,
             "num_layers": stats["num_layers"], "readings": readings}
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc.setdefault("cpu", cpu_info())
    doc.setdefault("entries", {})[name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(phases_table(doc))
    print(f"wrote {args.out} and its .md [{name}]")


def phases_table(doc: dict) -> str:
    """Anonymous memory (GiB) at each phase, one column per entry, and the free chunks glibc's
    malloc holds in its arenas (freed by the program, not returned to the OS)."""
    names = list(doc["entries"])
    phases = [r["phase"] for r in doc["entries"][names[0]]["readings"]]
    rows = ["| phase (anonymous GiB / glibc's free chunks) | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names)]
    for i, ph in enumerate(phases):
        cells = [f"{e['readings'][i]['anon'] / GiB:.3f} / {e['readings'][i]['malloc_free'] / GiB:.3f}"
                 for e in doc["entries"].values()]
        rows.append(f"| {ph} | " + " | ".join(cells) + " |")
    rows.append("| weights (the loader's bytes) | " + " | ".join(
        f"{e['weight_bytes_loaded'] / GiB:.3f}" for e in doc["entries"].values()) + " |")
    return "\n".join(rows) + "\n"


COMMANDS = {"serve": serve, "weights": weights, "phases": phases}

if __name__ == "__main__":
    if sys.argv[1:2] not in ([c] for c in COMMANDS):  # none or an unknown one: the overview
        sys.exit(print(__doc__) or (0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2))
    COMMANDS[sys.argv[1]](sys.argv[2:])
