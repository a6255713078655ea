"""Where lm-eval's log-likelihood scoring spends its time, offline (issue 12, item 7).

One engine (`lmeval.TabpVLLM`, i.e. `engine_args_for`), one fixed small set (the first N
documents of an offline task). Measured in one process, same engine, one after the other:
- engine start (TabpVLLM construction: vLLM engine + tokenizer),
- lm-eval's own scoring (`simple_evaluate` on the task: build requests, prompt logprobs, metrics),
- the same token sequences through the engine with `prompt_logprobs=1` (what lm-eval's vllm
  backend asks for) and with no prompt logprobs (plain prefill, `max_tokens=1`): the ratio of the
  two is what prompt logprobs cost; lm-eval's time over the first is its own overhead.
Prompts/s counts one request per (document, choice). Writes bench/results/lmeval_speed.json.

    python bench/lmeval_speed.py [--model llama] [--task tabp_arc_easy] [--limit 50] [--mask M]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

OUT = Path(__file__).parent / "results"


def main() -> None:
    from lm_eval import simple_evaluate
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tabp_vllm.engine import choose_dtype, cpu_info
    from tabp_vllm.lmeval import TabpVLLM
    from tabp_vllm.lmeval_tasks import task_manager

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--task", default="tabp_arc_easy")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--mask", default=None)
    ap.add_argument("--out", type=Path, default=OUT / "lmeval_speed.json")
    a = ap.parse_args()

    t0 = time.perf_counter()
    lm = TabpVLLM(pretrained=a.model, task_mask=a.mask)
    start_s = time.perf_counter() - t0
    try:
        tm = task_manager()
        t0 = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=[a.task], limit=a.limit, log_samples=True,
                              task_manager=tm)
        lmeval_s = time.perf_counter() - t0
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
           "engine_prompt_logprobs": rate(timings["prompt_logprobs"]),
           "engine_plain_prefill": rate(timings["prefill"]),
           "scoring_vs_prefill": round(timings["prefill"] / lmeval_s, 3),
           "acc": out["results"][a.task].get("acc,none")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
