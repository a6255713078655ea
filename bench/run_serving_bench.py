"""The run that produced bench/results/serving.{json,md,png}: dense vs k=4 vs k=8 vs bare vLLM.

This measures the pruning alone, without Ray Serve in the path: each variant is its own
`python -m vllm.entrypoints.openai.api_server` (started by `--start`) with the served names that
`tabp-vllm serve` uses (`llama`, `llama-k4`, `llama-k8`), plus a plain vLLM server of the dense
model (default loader, no plugin). The same variants through `tabp-vllm serve`:
bench/run_server_overhead.py. The masks are fixed
hand-made ones: k = 4 removes blocks 26-29, k = 8 removes blocks 22-29 (the last blocks, the same
choice as bench/weight_memory.py; every block has the same shape, so which blocks go does not
change the FLOPs or the speed, only the answers).

    python bench/run_serving_bench.py                 # this machine: short levels 1,4,16
    python bench/run_serving_bench.py --levels 1,4,16,64 --duration 60   # the full issue run

Against a running `tabp-vllm serve` the same measurement is one command (see docs/bench.md):

    tabp-vllm bench --url http://HOST:8000 --variant llama --variant llama-k4 --variant llama-k8 \
        --mask masks/k4.json --mask masks/k8.json --bare-vllm http://HOST:8001
"""

from __future__ import annotations

import argparse
from pathlib import Path

OUT = Path(__file__).parent / "results"
MASKS = {"k4": [26, 27, 28, 29], "k8": list(range(22, 30))}


def main() -> None:
    from tabp_vllm.loadtest.commands import run_bench
    from tabp_vllm.loadtest.options import BenchOptions
    from tabp_vllm.mask import make_mask
    from tabp_vllm.models import resolve_model

    d = BenchOptions.default
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=d("model"))
    # Shorter than the bench's defaults (levels 1,4,16,64, 60 s), to fit this machine.
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=d("rounds"))
    ap.add_argument("--ramp", type=float, default=d("ramp"))
    ap.add_argument("--range-ratio", type=float, default=d("range_ratio"))
    ap.add_argument("--input-len", type=int, default=d("input_len"))
    ap.add_argument("--output-len", type=int, default=d("output_len"))
    ap.add_argument("--port", type=int, default=8110)
    # Four engines (dense, k4, k8, bare) on one 24 GiB machine: a small KV cache each.
    ap.add_argument("--kv-cache-gib", type=float, default=0.25, help="per engine")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--notes", default=None)
    args = ap.parse_args()

    model = resolve_model(args.model)
    mask_dir = Path(args.out) / "masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    mask_specs = []
    for task, removed in MASKS.items():
        path = mask_dir / f"{task}.json"
        make_mask(model, removed, task=task, model_id=args.model).save(path)
        mask_specs.append(str(path))
    run_bench(BenchOptions(
        model=args.model, masks=mask_specs, start=True, start_bare=True, port=args.port,
        kv_cache_gib=args.kv_cache_gib, levels=args.levels, duration=args.duration,
        rounds=args.rounds, ramp=args.ramp, range_ratio=args.range_ratio,
        input_len=args.input_len, output_len=args.output_len, out=args.out, stem="serving",
        notes=args.notes))

if __name__ == "__main__":
    main()
