"""Where lm-eval's log-likelihood scoring spends its time, offline (issue 12, item 7).

One engine (`lmeval.TabpVLLM`, i.e. `engine_args_for`), one fixed small set (the first N
documents of an offline task). Measured in one process, same engine, one after the other:
- engine start (TabpVLLM construction: vLLM engine + tokenizer),
- lm-eval's own scoring (`simple_evaluate` on the task: build requests, prompt logprobs, metrics),
- the same token sequences through the engine with `prompt_logprobs=1` (what lm-eval's vllm
  backend asks for) and with no prompt logprobs (plain prefill, `max_tokens=1`): the ratio of the
  two is what prompt logprobs cost; lm-eval's time over the first is its own overhead.
Prompts/s counts one request per (document, choice). Then lm-eval once more with
`one_token_shortcut` off (every request through lm-eval's own path): on a task whose choices are
one token each (BoolQ) that is what the shortcut saves. Writes bench/results/lmeval_speed.json
(`--out` for another task).

With `--server`, the same through `tabp-vllm serve` (started here, dense variant): lm-eval's
`local-completions` (echo + logprobs on /v1/completions, `--batch-size` prompts a request,
`--num-concurrent` requests in flight), then the same texts with echo + logprobs and as plain
prefill (`max_tokens=1`, no logprobs), same batching and concurrency, with the official `openai`
client. Written under the "server" key of the same file (the offline results stay).

    python bench/lmeval_speed.py [--model llama] [--task tabp_arc_easy] [--limit 50] [--mask M]
    python bench/lmeval_speed.py --server --limit 200 [--batch-size 16] [--num-concurrent 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results"


def main() -> None:
    from lm_eval import simple_evaluate
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tabp_vllm.hardware import choose_dtype, cpu_info
    from tabp_vllm.lmeval import TabpVLLM
    from tabp_vllm.lmeval_tasks import task_manager

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--task", default="tabp_arc_easy")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--mask", default=None)
    ap.add_argument("--out", type=Path, default=OUT / "lmeval_speed.json")
    ap.add_argument("--server", action="store_true", help="measure through `tabp-vllm serve`")
    ap.add_argument("--batch-size", type=int, default=16, help="--server: prompts per request")
    ap.add_argument("--num-concurrent", type=int, default=2, help="--server: requests in flight")
    a = ap.parse_args()
    if a.server:
        return measure_server(a)

    t0 = time.perf_counter()
    lm = TabpVLLM(pretrained=a.model, task_mask=a.mask)
    start_s = time.perf_counter() - t0
    try:
        tm = task_manager()
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
    from tabp_vllm.models import resolve_model
    from tabp_vllm.process import ManagedProcess, free_port, lists_models

    path, port = resolve_model(a.model), free_port(8000, 8100)
    cmd = [sys.executable, "-m", "tabp_vllm", "serve", "--model", a.model, "--port", str(port)]
    cmd += ["--task-mask", a.mask] if a.mask else []
    name = f"{a.model}-{Path(a.mask).stem}" if a.mask else a.model
    from tabp_vllm.models import cache_dir

    server = ManagedProcess(cmd, cache_dir() / "logs" / "lmeval_speed.serve.log",
                            name="tabp-vllm serve")
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        server.start().wait_ready(f"{base}/v1/models", ready=lists_models([name]),
                                  log_line="\nREADY", deadline_s=900, interval_s=2)
        start_s = time.perf_counter() - t0
        asyncio.run(send(base, name, ["Question: warm-up\nAnswer:"] * 8, a, echo=True))
        model_args = {"model": name, "base_url": f"{base}/v1/completions",
                      "tokenizer_backend": "huggingface", "tokenizer": path,
                      "num_concurrent": a.num_concurrent, "max_retries": 1}
        t0 = time.perf_counter()
        out = simple_evaluate(model="local-completions", model_args=model_args, tasks=[a.task],
                              limit=a.limit, batch_size=a.batch_size, log_samples=True,
                              task_manager=task_manager())
        lmeval_s = time.perf_counter() - t0
        texts = [arg[0] + arg[1] for s in out["samples"][a.task] for arg in s["arguments"]]
        echo_s = asyncio.run(send(base, name, texts, a, echo=True))
        prefill_s = asyncio.run(send(base, name, texts, a, echo=False))
    finally:
        server.stop(grace_s=120)
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


if __name__ == "__main__":
    main()
