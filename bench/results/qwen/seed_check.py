"""seed_check.json (and the table of seed_check.md, printed) from the masks compare.py made for
calibration seeds 0 and 1 and its scoring records: do a method's masks move with the seed?

    python bench/results/qwen/seed_check.py [block_influence,angular]
"""
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent


def main(methods: list[str]) -> None:
    scoring = json.loads((OUT / "report.json").read_text())["scoring"]
    rows = []
    for m in methods:
        for k in (4, 7):
            masks = {s: json.loads((OUT / "masks" / f"{m}-arc_easy-s{s}-k{k}.json").read_text())
                     for s in (0, 1)}
            # a method that ranks every k is scored once, at the largest k
            rec = {s: scoring.get(f"{m}|arc_easy|{s}|{k}") or scoring.get(f"{m}|arc_easy|{s}|7")
                   for s in (0, 1)}
            removed = {s: masks[s]["removed_layers"] for s in (0, 1)}
            scores = {s: masks[s]["scores"] for s in (0, 1)}
            cand = [i for i, v in enumerate(scores[0]) if v is not None]
            row = {"method": m, "k": k, "removed_seed0": removed[0], "removed_seed1": removed[1],
                   "same": removed[0] == removed[1],
                   "shared_blocks": len(set(removed[0]) & set(removed[1])),
                   "calibration_sha256": {s: masks[s]["calibration"]["sha256"] for s in (0, 1)},
                   "samples": {s: masks[s]["calibration"]["samples"] for s in (0, 1)},
                   "scoring": rec,
                   "max_abs_score_difference": max(abs(scores[0][i] - scores[1][i]) for i in cand)}
            for s in (0, 1):  # the lowest kept block's score minus the highest removed one's
                order = sorted(cand, key=lambda i: scores[s][i])
                row[f"margin_seed{s}"] = scores[s][order[k]] - scores[s][order[k - 1]]
            rows.append(row)
    doc = {"model": "qwen1.5b", "protocol": "paper: calibrate on ARC-Easy train, 256 samples",
           "note": "max_abs_score_difference: the largest change of one block's score between the "
                   "seeds; margin_seedS: the lowest kept block's score minus the highest removed "
                   "block's", "rows": rows}
    (OUT / "seed_check.json").write_text(json.dumps(doc, indent=1) + "\n")
    print("| method | k | seed 0 removes | seed 1 removes | same mask | blocks shared | "
          "wall s (seed 0 / 1) | forward passes |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        w = " / ".join(str(r["scoring"][s]["wall_s"]) if r["scoring"][s] else "?" for s in (0, 1))
        fp = " / ".join(str(r["scoring"][s]["forward_passes"]) if r["scoring"][s] else "?"
                        for s in (0, 1))
        print(f"| {r['method']} | {r['k']} | {r['removed_seed0']} | {r['removed_seed1']} | "
              f"{'yes' if r['same'] else 'no'} | {r['shared_blocks']} of {r['k']} | {w} | {fp} |")


if __name__ == "__main__":
    main((sys.argv[1] if len(sys.argv) > 1 else "block_influence").split(","))
