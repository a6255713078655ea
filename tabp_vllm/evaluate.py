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
from pathlib import Path
from typing import Any

from tabp_vllm.data import Dataset, MCQAItem, mcqa_context
from tabp_vllm.errors import TabpError
from tabp_vllm.process import ManagedProcess


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
                        kv_cache_gib: float | None = None, max_model_len: int = 2048) -> dict[str, Any]:
    """Build the engine for (model, mask) and score every choice; needs the __main__ guard."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tabp_vllm.engine import build_llm
    from tabp_vllm.mask import load_mask

    mask = load_mask(mask_path, model) if mask_path else None
    llm = build_llm(model, mask, kv_cache_gib=kv_cache_gib, max_model_len=max_model_len)
    try:
        reqs = build_requests(llm.get_tokenizer(), items)
        too_long = [r for r in reqs if len(r[2]) >= max_model_len]
        if too_long:
            raise TabpError(f"{len(too_long)} prompts exceed max_model_len {max_model_len}")
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=r[2]) for r in reqs], sp,
                            use_tqdm=False)
    finally:  # stop the engine core now rather than in interpreter teardown
        llm.llm_engine.engine_core.shutdown()
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


def _last_line(text: str) -> str:
    return next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "")


def _run_once(spec: str, out: str, err: str, log_path: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tabp_vllm.evaluate", spec, out, err]
    # Leaving the block stops what is left of the child's family: its engine core, when the
    # child was killed; the child too, when we are interrupted (it has its own session).
    with ManagedProcess(cmd, log_path, name="evaluation process") as proc:
        return subprocess.CompletedProcess(cmd, proc.wait())


def evaluate_variant(model: str, items: list[MCQAItem], mask_path: str | None,
                     kv_cache_gib: float | None = None) -> dict[str, Any]:
    """Run `evaluate_in_process` in a fresh Python process (one engine per process).

    The child writes its result file only once every choice is scored, then shuts the engine
    down and skips interpreter teardown (where vLLM's engine stack now and then aborts); a result
    that exists is complete and kept even if the child dies after writing it. A child killed by
    a signal before it finished is run once more; its output is kept under the cache directory
    and named in the error.
    """
    from tabp_vllm.models import cache_dir

    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    label = mask_path or "dense"
    with tempfile.TemporaryDirectory(prefix="tabp-eval-") as tmp:
        spec, out, err = (os.path.join(tmp, n) for n in ("spec.json", "out.json", "error.txt"))
        with open(spec, "w") as f:
            json.dump({"model": model, "mask": mask_path, "kv_cache_gib": kv_cache_gib,
                       "items": [asdict(i) for i in items]}, f)
        for attempt in (1, 2):
            log_path = str(logs / f"eval-{os.getpid()}-{Path(label).stem}-{attempt}.log")
            proc = _run_once(spec, out, err, log_path)
            if os.path.exists(out):
                if proc.returncode == 0:
                    os.remove(log_path)
                else:
                    print(f"note: the evaluation process of {label} exited with code "
                          f"{proc.returncode} after writing its results (log: {log_path})",
                          file=sys.stderr)
                with open(out) as f:
                    return json.load(f)
            if os.path.exists(err):  # the child caught the error and said what it was
                with open(err) as f:
                    raise TabpError(f"evaluation of {label} failed: {f.read().strip()}")
            if proc.returncode >= 0 or attempt == 2:
                with open(log_path) as f:
                    msg = _last_line(f.read()) or f"exit code {proc.returncode}"
                raise TabpError(f"evaluation of {label} failed (exit code {proc.returncode}): "
                                f"{msg} (log: {log_path})")
            print(f"note: the evaluation process of {label} was killed by signal "
                  f"{-proc.returncode} (log: {log_path}); running it once more", file=sys.stderr)
    raise AssertionError("unreachable")


def _main(argv: list[str]) -> int:
    spec_path, out_path, err_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    items = [MCQAItem(**d) for d in spec["items"]]
    try:
        res = evaluate_in_process(spec["model"], items, spec["mask"], spec["kv_cache_gib"])
    except TabpError as exc:
        with open(err_path, "w") as f:
            f.write(str(exc))
        return 2
    except Exception as exc:  # the parent shows one line; the traceback goes to the log
        import traceback

        traceback.print_exc()
        with open(err_path, "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")
        return 1
    # write then rename: the parent treats an existing result file as complete
    with open(out_path + ".tmp", "w") as f:
        json.dump(res, f)
    os.replace(out_path + ".tmp", out_path)
    return 0


if __name__ == "__main__":
    code = _main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # The engine core is already shut down; skip interpreter teardown, where a C++ thread of the
    # engine stack now and then aborts the process ("terminate called without an active exception").
    os._exit(code)
