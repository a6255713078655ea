"""The README's results table from eval_cache.json: acc_norm per variant with its 95 % normal
interval on n documents, minus dense and minus TaBP's mask of the same k (paired bootstrap over
the same documents, tabp_vllm.comparison.paired_bootstrap). Run from the repository root:

    python bench/results/qwen/rows.py
"""

import json
import math
from pathlib import Path

import numpy as np

from tabp_vllm.comparison import paired_bootstrap

HERE = Path(__file__).parent
TASKS = {"tabp_arc_easy": "ARC-Easy test", "tabp_piqa": "PIQA held-out"}
TABP = {4: "17,18,19,20", 7: "17,18,19,20,21,24,25"}  # every TaBP and tabp-64 seed's mask
VARIANTS = [  # (name, k, removed blocks)
    ("dense", 0, ""),
    ("TaBP default = tabp-64, seeds 0-2, k = 4 (17-20)", 4, TABP[4]),
    ("Block Influence = angular = SLEB seed 1, k = 4 (14-17)", 4, "14,15,16,17"),
    ("PPL = SLEB (WikiText-2), seed 0, k = 4 (14-16, 18)", 4, "14,15,16,18"),
    ("TaBP --preset paper (seedless), k = 4 (15, 16, 19, 27)", 4, "15,16,19,27"),
    ("TaBP default = tabp-64, seeds 0-2, k = 7 (17-21, 24, 25)", 7, TABP[7]),
    ("Block Influence, k = 7 (14-18, 24, 25)", 7, "14,15,16,17,18,24,25"),
    ("angular = PPL (WikiText-2, seed 0), k = 7 (14-20)", 7, "14,15,16,17,18,19,20"),
    ("SLEB (WikiText-2), seeds 0 and 1, k = 7 (14-19, 24)", 7, "14,15,16,17,18,19,24"),
    ("TaBP --preset paper (seedless), k = 7 (15, 16, 19, 21, 24, 26, 27)", 7, "15,16,19,21,24,26,27"),
]


def random_variants():
    """One row per random mask scored so far (masks/random-none-s{seed}-k{k}.json)."""
    rows = []
    for k in (4, 7):
        for path in sorted(HERE.glob(f"masks/random-none-s*-k{k}.json")):
            seed = path.stem.split("-s")[1].split("-")[0]
            removed = json.loads(path.read_text())["removed_layers"]
            rows.append((f"random, seed {seed}, k = {k} ({', '.join(map(str, removed))})", k,
                         ",".join(map(str, removed))))
    return rows


def docs(cache, task, removed):
    entry = cache.get(f"{task}|{removed}")
    return None if entry is None else np.asarray(entry["docs"]["acc_norm"], dtype=float)


def acc(m):
    """3 decimals, 4 where a 400-document mean needs them (0.7225)."""
    s = f"{m:.4f}"
    return s[:-1] if s.endswith("0") else s


def interval(d):
    return f"[{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]"


def main():
    cache = json.loads((HERE / "eval_cache.json").read_text())
    print("| variant (removed blocks) | " + " | ".join(TASKS.values()) + " |")
    print("|---|" + "---|" * len(TASKS))
    for name, k, removed in VARIANTS + random_variants():
        cells = []
        for task in TASKS:
            x = docs(cache, task, removed)
            if x is None:
                cells.append("not yet")
                continue
            m, half = x.mean(), 1.96 * math.sqrt(x.mean() * (1 - x.mean()) / len(x))
            cell = f"{acc(m)} [{m - half:.3f}, {m + half:.3f}]"
            if removed:
                d = paired_bootstrap(x, docs(cache, task, ""))
                cell += f"; minus dense {d['mean']:+.3f} {interval(d)}"
                if removed != TABP[k]:
                    t = paired_bootstrap(x, docs(cache, task, TABP[k]))
                    cell += f"; minus TaBP {t['mean']:+.3f} {interval(t)}"
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
