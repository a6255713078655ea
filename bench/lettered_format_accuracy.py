"""How well the dense demo model answers in the lettered format TaBP's MCQA mode probes.

TaBP reads the early-exit distribution over the option letters (" A", " B", ...) after the
lettered prompt; this prints how often the model's own final-layer letter choice is the gold one
(and the mean entropy of that distribution, normalised by log of the number of options), on 128
seeded train items per task. Used in the README's comparison section.

    python bench/lettered_format_accuracy.py [--tasks arc_easy boolq] [--samples 128]
"""

from __future__ import annotations

import argparse
import math

import torch


def main() -> None:
    from tabp_vllm.data import load_task, mcqa_lettered_prompt
    from tabp_vllm.models import resolve_model
    from tabp_vllm.scoring.probe import load_model, option_token_ids

    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["arc_easy", "boolq"])
    ap.add_argument("--samples", type=int, default=128)
    args = ap.parse_args()
    model, tok = load_model(resolve_model("llama"), "cpu")
    for task in args.tasks:
        items = load_task(task, "train").subset(args.samples, 0).items
        hits, entropy = 0, 0.0
        chance = sum(1 / len(i.choices) for i in items) / len(items)
        for start in range(0, len(items), 16):
            chunk = items[start:start + 16]
            enc = tok([mcqa_lettered_prompt(i) for i in chunk], return_tensors="pt", padding=True,
                      truncation=True, max_length=256)
            with torch.no_grad():
                last = model(**enc).logits[:, -1]  # left padded: the last position is the answer slot
            letters = last[:, option_token_ids(tok, max(len(i.choices) for i in chunk))]
            for row, item in zip(letters, chunk):
                p = row[:len(item.choices)].softmax(-1)
                hits += int(p.argmax()) == item.gold
                entropy += float(-(p * p.log()).sum()) / math.log(len(item.choices))
        print(f"{task}: lettered-format accuracy {hits / len(items):.3f} "
              f"(chance {chance:.2f}), "
              f"mean normalised option entropy {entropy / len(items):.3f}, n = {len(items)}")


if __name__ == "__main__":
    main()
