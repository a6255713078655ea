"""Zero-shot MCQA accuracy measured on the served engine (vLLM, the project's own loader).

lm-evaluation-harness conventions: context "Question: {q}\\nAnswer:", continuation " {choice}";
each choice is scored by the sum of its tokens' log-probabilities (prompt logprobs of one batched
`LLM.generate` call); acc takes the argmax of that sum, acc_norm the argmax of sum / number of
characters in the continuation. Each variant (dense, one per mask) runs in its own subprocess,
so every engine starts in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from typing import Any

from tabp_vllm.data import Dataset, MCQAItem, mcqa_context
from tabp_vllm.errors import TabpError


def build_requests(tok, items: list[MCQAItem]) -> list[tuple[int, int, list[int], int]]:
    """(item, choice, token ids, continuation start) per choice, lm-eval style tokenisation."""
    reqs = []
    for n, it in enumerate(items):
        ctx = mcqa_context(it)
        ctx_ids = tok.encode(ctx, add_special_tokens=False)
        for j, ch in enumerate(it.choices):
            whole = tok.encode(ctx + " " + ch, add_special_tokens=False)
            start = len(ctx_ids)
            if whole[:start] != ctx_ids:  # tokens merged across the boundary: encode apart
                whole = ctx_ids + tok.encode(" " + ch, add_special_tokens=False)
            reqs.append((n, j, whole, start))
    return reqs


def _logprob_at(pl, pos: int, token: int) -> float:
    entry = pl[pos]
    if entry is None:
        raise RuntimeError("prompt logprob missing at a scored position")
    return float(entry[token].logprob)


def accuracy(items: list[MCQAItem], loglik: dict[tuple[int, int], float]) -> dict[str, Any]:
    acc = acc_norm = 0
    for n, it in enumerate(items):
        ll = [loglik[(n, j)] for j in range(len(it.choices))]
        norm = [ll[j] / len(" " + c) for j, c in enumerate(it.choices)]
        acc += int(max(range(len(ll)), key=lambda j: ll[j]) == it.gold)
        acc_norm += int(max(range(len(norm)), key=lambda j: norm[j]) == it.gold)
    n = len(items)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}


def evaluate_in_process(model: str, items: list[MCQAItem], mask_path: str | None,
                        kv_cache_gib: float = 0.25, max_model_len: int = 2048) -> dict[str, Any]:
    """Build the engine for (model, mask) and score every choice; needs the __main__ guard."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tabp_vllm.engine import build_llm
    from tabp_vllm.mask import load_mask

    mask = load_mask(mask_path, model) if mask_path else None
    llm = build_llm(model, mask, kv_cache_gib=kv_cache_gib, max_model_len=max_model_len)
    tok = llm.get_tokenizer()
    reqs = build_requests(tok, items)
    too_long = [r for r in reqs if len(r[2]) >= max_model_len]
    if too_long:
        raise TabpError(f"{len(too_long)} prompts exceed max_model_len {max_model_len}")
    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=r[2]) for r in reqs], sp, use_tqdm=False)
    loglik = {}
    for (n, j, ids, start), out in zip(reqs, outs):
        pl = out.prompt_logprobs
        loglik[(n, j)] = sum(_logprob_at(pl, pos, ids[pos]) for pos in range(start, len(ids)))
    res = accuracy(items, loglik)
    res["blocks_kept"] = mask.num_kept if mask else None
    res["removed_layers"] = mask.removed_layers if mask else []
    res["requests"] = len(reqs)
    res["loglik"] = [[loglik[(n, j)] for j in range(len(it.choices))] for n, it in enumerate(items)]
    return res


def evaluate_variant(model: str, items: list[MCQAItem], mask_path: str | None,
                     kv_cache_gib: float = 0.25) -> dict[str, Any]:
    """Run `evaluate_in_process` in a fresh Python process (one engine per process)."""
    with tempfile.TemporaryDirectory(prefix="tabp-eval-") as tmp:
        spec = os.path.join(tmp, "spec.json")
        out = os.path.join(tmp, "out.json")
        with open(spec, "w") as f:
            json.dump({"model": model, "mask": mask_path, "kv_cache_gib": kv_cache_gib,
                       "items": [asdict(i) for i in items]}, f)
        proc = subprocess.run([sys.executable, "-m", "tabp_vllm.evaluate", spec, out],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or "").strip().splitlines()
            msg = next((l for l in reversed(tail) if l.strip()), f"exit code {proc.returncode}")
            raise TabpError(f"evaluation of {mask_path or 'dense'} failed: {msg}")
        with open(out) as f:
            return json.load(f)


def _main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    items = [MCQAItem(**d) for d in spec["items"]]
    try:
        res = evaluate_in_process(spec["model"], items, spec["mask"], spec["kv_cache_gib"])
    except TabpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with open(out_path, "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
