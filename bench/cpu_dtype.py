"""Dense offline generation per engine dtype on this CPU (issue 13, item 1).

Each dtype runs in its own child process (a fresh vLLM engine): the demo model, eager, a batch of
BATCH greedy prompts x NEW_TOKENS new tokens (EOS ignored), one warm-up batch first; output
tokens/s of the timed batch; the settings of the AVX2-only EPYC measurement in issue 13 (float32
42.6 tok/s, bfloat16 9.4 tok/s there), so the two machines compare. An AVX2-only CPU cannot be
emulated here: with the instruction set capped (`ONEDNN_MAX_CPU_ISA=AVX2`,
`ATEN_CPU_CAPABILITY=avx2`) the bfloat16 engine's worker died on its first batch (vLLM's own CPU
kernels keep their AVX-512 paths), so only real machines count.
Writes bench/results/cpu_dtype.{json,md}: one record per CPU (model and flags), a run on another
CPU kept beside this one's, and what `--dtype auto` picks on each.

    python bench/cpu_dtype.py [--batch 8] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "results"
DTYPES = ("bfloat16", "float32")


def timed_batch(llm, batch: int, new_tokens: int) -> dict:
    """One warm-up batch, then one timed batch of `batch` greedy prompts x `new_tokens` new
    tokens (EOS ignored): output tokens, wall time, output tokens/s."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    prompts = [f"Question {i}: what is {i} plus {i + 1}? Answer:" for i in range(batch)]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2)}


def one_case(dtype: str, batch: int, new_tokens: int) -> dict:
    """In the child: build the engine, time a batch."""
    from tabp_vllm.engine import build_llm
    from tabp_vllm.models import resolve_model

    llm = build_llm(resolve_model("llama"), None, dtype=dtype, kv_cache_gib=0.25, max_model_len=256)
    return timed_batch(llm, batch, new_tokens)


def load_runs(path: Path) -> list[dict]:
    """The runs recorded so far, one per CPU (a file of the older one-run layout is one run)."""
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    return doc["runs"] if "runs" in doc else [doc]


def main() -> None:
    from tabp_vllm.hardware import choose_dtype, cpu_info

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # the child's side
    a = ap.parse_args()
    if a.case:
        print("RESULT " + json.dumps(one_case(a.case, a.batch, a.new_tokens)), flush=True)
        return
    rows = []
    for dtype in DTYPES:
        proc = subprocess.run([sys.executable, __file__, "--case", dtype, "--batch", str(a.batch),
                               "--new-tokens", str(a.new_tokens)],
                              capture_output=True, text=True, timeout=1800)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        row = {"dtype": dtype}
        row.update(json.loads(line[7:]) if line else {"error": proc.stderr.strip().splitlines()[-1:]})
        print(row, flush=True)
        rows.append(row)
    host = cpu_info()
    run = {"host": host, "batch": a.batch, "new_tokens": a.new_tokens,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    path = OUT / "cpu_dtype.json"
    runs = [r for r in load_runs(path) if r["host"] != host] + [run]  # this CPU's latest run
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    lines = ["# Dense offline generation per engine dtype, per CPU", "",
             "Demo model, eager, greedy, EOS ignored, after a warm-up batch; `auto` is what "
             "`--dtype auto` picks on that CPU.", ""]
    for r in runs:
        host = r["host"]
        auto = choose_dtype("auto", gpu=False, cpu_flags=host["flags"])[0]
        lines += [f"## {host['model']} (flags: {', '.join(host['flags']) or 'none recorded'})", "",
                  f"{r['date']}; batch {r['batch']} x {r['new_tokens']} new tokens; "
                  f"auto picks **{auto}**.", "",
                  "| dtype | output tokens/s | wall s |", "|---|---|---|"]
        lines += [f"| {x['dtype']} | {x.get('tokens_per_s', 'error')} | {x.get('wall_s', '')} |"
                  for x in r["rows"]]
        lines.append("")
    (OUT / "cpu_dtype.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
