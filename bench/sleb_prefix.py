"""SLEB / PPL sensitivity with prefix reuse against a full pass per candidate: wall time, and that
the scores, removal order and mask are identical (tabp_vllm/scoring/prefix.py).

    flock /tmp/tabp-heavy.lock timeout 900 python bench/sleb_prefix.py --samples 8 --k 4 \
        --method sleb-task --granularity block

Loads the model once and scores each method x granularity twice on the same calibration sample:
with `removal_nlls(reuse_prefix=False)` (one `calibration_nll` pass per candidate, what SLEB and
PPL ran before) and with prefix reuse (the default). Entries merge into OUT/sleb_prefix.json by
name (method, granularity, samples, k), with the CPU recorded.
"""

from __future__ import annotations

import argparse
import json
import platform
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

from tabp_vllm.data import load_task
from tabp_vllm.hardware import cpu_info
from tabp_vllm.models import resolve_model
from tabp_vllm.scoring import perplexity, run_scoring
from tabp_vllm.scoring.probe import load_model

OUT = Path(__file__).resolve().parent / "results" / "sleb_prefix"


@contextmanager
def full_passes():
    """SLEB and PPL as before: one full calibration pass per candidate."""
    reuse = perplexity.removal_nlls
    perplexity.removal_nlls = partial(reuse, reuse_prefix=False)
    try:
        yield
    finally:
        perplexity.removal_nlls = reuse


def measure(model_and_tokenizer, data, method: str, granularity: str, k: int) -> dict:
    def score():
        return run_scoring("unused", data, method, k=k, granularity=granularity,
                           model_and_tokenizer=model_and_tokenizer)

    with full_passes():
        old = score()
    new = score()
    same = (old.scores == new.scores and old.removed == new.removed
            and old.params.get("removal_order") == new.params.get("removal_order"))
    return {"method": method, "granularity": granularity, "k": k, "samples": len(data),
            "candidates": sum(s is not None for s in new.scores),  # all scored in round 1
            "forward_passes": new.forward_passes, "full_passes_s": round(old.wall_s, 2),
            "prefix_reuse_s": round(new.wall_s, 2), "speedup": round(old.wall_s / new.wall_s, 3),
            "identical": same, "removed": new.removed,
            "removal_order": new.params.get("removal_order"), "scores": new.scores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--method", action="append", choices=["sleb", "sleb-task", "ppl", "ppl-task"])
    ap.add_argument("--granularity", action="append", choices=["block", "sublayer"])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    model_path = resolve_model(args.model)
    model_and_tokenizer = load_model(model_path, "cpu")
    data = load_task(args.task).subset(args.samples, 0)
    # one pass over the data first, so that neither timed run pays the first call's set-up
    run_scoring("unused", data, "block_influence", k=1, model_and_tokenizer=model_and_tokenizer)
    path = args.out / "sleb_prefix.json"
    doc = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    for method in args.method or ["sleb-task"]:
        for granularity in args.granularity or ["block"]:
            entry = measure(model_and_tokenizer, data, method, granularity, args.k)
            entry.update(model=model_path, task=args.task, cpu=cpu_info(),
                         torch_threads=torch.get_num_threads(), python=platform.python_version(),
                         date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            name = f"{method}-{granularity}-n{args.samples}-k{args.k}"
            doc["runs"][name] = entry
            print(f"{name}: {entry['full_passes_s']} s -> {entry['prefix_reuse_s']} s "
                  f"(x{entry['speedup']}), identical: {entry['identical']}", flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
