"""Weight memory of the pruned engine vs dense (issue: memory shrinks with the removed blocks).

Builds the real vLLM engine for dense and each mask, one at a time, and records what the loader
materialised (weight bytes, in the engine's dtype), the decoder depth the engine built, and the
engine worker's resident memory. Writes bench/results/weight_memory.{json,md}.

    python bench/weight_memory.py [--model llama] [--dtype auto] [--remove 15-22 --remove 8-11,20-23]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

OUT = Path(__file__).parent / "results"


def parse_ranges(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def main() -> None:
    from tabp_vllm.engine import build_llm, engine_model_stats
    from tabp_vllm.mask import make_mask
    from tabp_vllm.models import resolve_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--remove", action="append", default=None,
                    help="blocks to remove, e.g. 26-29 (repeatable; default: k=4 and k=8)")
    args = ap.parse_args()
    model = resolve_model(args.model)
    variants = {"dense": []}
    for spec in args.remove or ["26-29", "22-29"]:
        blocks = parse_ranges(spec)
        variants[f"k={len(blocks)} ({spec})"] = blocks

    rows = []
    for name, removed in variants.items():
        mask = make_mask(model, removed, task=name) if removed else None
        llm = build_llm(model, mask, dtype=args.dtype, kv_cache_gib=0.25, max_model_len=256)
        stats = engine_model_stats(llm)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        rows.append({"variant": name, "removed": removed, **stats})
        print(name, stats, flush=True)

    dense = rows[0]["weight_bytes"]
    for row in rows:
        row["weight_ratio"] = row["weight_bytes"] / dense
        row["kept_ratio"] = row["num_layers"] / rows[0]["num_layers"]
    result = {"model": args.model, "dtype": args.dtype, "host": platform.node(),
              "cpu_count": os.cpu_count(), "rows": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "weight_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| variant | blocks kept | weight bytes | vs dense | worker RSS (MiB) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['num_layers']} | {r['weight_bytes']:,} | "
                     f"{r['weight_ratio']:.3f} | {r['worker_rss_bytes'] / 2**20:,.0f} |")
    (OUT / "weight_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
