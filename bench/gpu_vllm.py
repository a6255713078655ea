"""Dense vs pruned through vLLM and the project's loader: speed on the engine users serve with.

    python3 bench/gpu_vllm.py OUTDIR [--arch llama-3.1-8b] [--batches 1,16,64] ...
    (or `VLLM=1 bash bench/gpu_check.sh OUTDIR`)

The vLLM counterpart of `gpu_scale.py` (same synthetic checkpoint, same hand-made masks, same
JSON layout and plot), with the engines built as `tabp-vllm serve` builds them:
`tabp_vllm.engine.engine_args_for` (the `tabp_pruned` loader reads the original checkpoint minus
the removed blocks; on a GPU compiled mode with CUDA graphs), one engine per variant, all on the
one GPU at once with `gpu_memory_utilization` from `tabp_vllm.memory.gpu_memory_fractions`.

Per batch size B: every variant warms up once at full length (untimed), then rounds interleave
the variants (dense, k4, k8, dense, ...). Each measurement is two offline `generate` calls on B
fresh random prompts (prefix caching off): one output token (prefill) and `--new-tokens`
tokens (EOS ignored); TPOT = (full - prefill) / (new_tokens - 1), the mean decode step.
Not the HTTP server: `tabp-vllm serve` needs Ray Serve, which the measured machine lacked.
Falls back to vLLM's CPU engine where there is no CUDA (tests; tiny shapes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "bench")) if p not in sys.path]
# The engines' model stats are read through `LLM.apply_model`, which pickles a function.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

from gpu_scale import (Run, common_args, speed_summary, step_env, step_synth,  # noqa: E402
                       variant_masks)

NOTE = ("vLLM offline engines built by tabp_vllm.engine (the tabp_pruned loader), one per "
        "variant, sharing one GPU; synthetic random weights of the published shape. Speed does "
        "not depend on weight values; accuracy does.")


def engine_needs(model_dir: str, variants: dict[str, list[int]], num_layers: int) -> list[Any]:
    """What each variant's GPU engine holds, in the dtype it runs (as `serve` estimates it)."""
    from tabp_vllm.memory import engine_needs

    return engine_needs(model_dir, {n: num_layers - len(r) for n, r in variants.items()}, gpu=True)


def start_engine(run: Run, model_dir: str, name: str, removed: list[int], fraction: float | None,
                 max_model_len: int):
    """One engine as `serve` builds it; compiled first, eager if compiling fails (recorded)."""
    from vllm import LLM

    from tabp_vllm.engine import engine_args_for, engine_model_stats, offline_engine
    from tabp_vllm.mask import make_mask

    a = run.args
    mask = make_mask(model_dir, removed, task="gpu-vllm", model_id=a.arch,
                     method="hand-made") if removed else None
    extra: dict[str, Any] = {"enable_prefix_caching": False, "max_num_seqs": max(a.batches)}
    if fraction is not None:
        extra["gpu_memory_utilization"] = fraction
    gpu = run.doc["env"]["device"] == "cuda"
    info: dict[str, Any] = {"gpu_memory_utilization": fraction}
    for eager in ([None, True] if gpu else [None]):
        args = engine_args_for(model_dir, mask, max_model_len=max_model_len, gpu=gpu,
                               enforce_eager=eager, kv_cache_gib=None if gpu else 0.25,
                               extra=extra)
        t = time.monotonic()
        try:
            with offline_engine(args, gpu):  # in this process on a CPU, as every offline engine
                llm = LLM(**args)
        except Exception as exc:  # noqa: BLE001 - recorded; eager is tried next on a GPU
            info.setdefault("failed_starts", []).append(
                {"enforce_eager": args["enforce_eager"], "error": f"{type(exc).__name__}: {exc}"[:800]})
            run.log(f"engine {name} (enforce_eager={args['enforce_eager']}) failed: "
                    f"{type(exc).__name__}: {str(exc)[:300]}")
            continue
        info.update(start_s=round(time.monotonic() - t, 2), enforce_eager=args["enforce_eager"],
                    dtype=args["dtype"], removed_layers=removed)
        try:
            info["model_stats"] = engine_model_stats(llm)
        except Exception as exc:  # noqa: BLE001
            info["model_stats"] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
        run.log(f"engine {name}: started in {info['start_s']:.1f} s (enforce_eager="
                f"{info['enforce_eager']}, gpu_memory_utilization={fraction}); {info['model_stats']}")
        return llm, info
    return None, info


def timed_generate(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    """Wall time of one offline `generate` (it returns when every output is done) and its tokens."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0,
                            ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - t
    return wall, sum(len(o.outputs[0].token_ids) for o in outs)


def measure(llm, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    b, p = len(prompts), len(prompts[0])
    prefill_s, _ = timed_generate(llm, prompts, 1)
    full_s, tokens = timed_generate(llm, prompts, new_tokens)
    decode_s = max(full_s - prefill_s, 1e-9)
    return {
        "prefill_ms": round(prefill_s * 1e3, 3),
        "prefill_tokens_per_s": round(b * p / prefill_s, 1),
        "tpot_mean_ms": round(decode_s / max(new_tokens - 1, 1) * 1e3, 3),
        "decode_tokens_per_s": round(b * (new_tokens - 1) / decode_s, 1),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / full_s, 1),
        "request_s": round(full_s, 4),
    }


def step_vllm_speed(run: Run, model_dir: str) -> None:
    import numpy as np

    import vllm
    from tabp_vllm.hardware import gpu_total_bytes
    from tabp_vllm.memory import gpu_memory_fractions
    from tabp_vllm.flops import DecoderShape, shape_summary
    from tabp_vllm.models import load_model_config

    a = run.args
    gpu = run.doc["env"]["device"] == "cuda"
    config = load_model_config(model_dir)
    B = int(config["num_hidden_layers"])
    shape = DecoderShape.from_config(config)
    variants = variant_masks(run, model_dir, B)
    max_model_len = a.prompt_len + a.new_tokens + 16
    fractions: dict[str, float | None] = {n: None for n in variants}
    if gpu:
        needs = engine_needs(model_dir, variants, B)
        fractions = dict(zip(variants, gpu_memory_fractions(needs, gpu_total_bytes(), max_model_len)))
    speed: dict[str, Any] = {
        "engine": f"vLLM {vllm.__version__} ({'CUDA graphs unless recorded eager' if gpu else 'CPU'})",
        "units": {"prefill_ms": "ms per batch (one output token)",
                  "tpot_mean_ms": "ms per decode step (whole batch), (full - prefill) / (new - 1)",
                  "*_tokens_per_s": "tokens/s summed over the batch",
                  "output_tokens_per_s": "output tokens / wall of the full generate call"},
        "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "batches": a.batches,
        "rounds_planned": a.rounds, "max_model_len": max_model_len, "prefix_caching": False,
        "shape": shape_summary(shape), "engines": {}, "runs": [],
    }
    run.doc["speed"] = speed
    engines = {}
    for name, removed in variants.items():
        if run.remaining() < 60:
            run.skip(f"engine {name}", f"deadline: {run.remaining():.0f} s left")
            continue
        llm, info = start_engine(run, model_dir, name, removed, fractions[name], max_model_len)
        speed["engines"][name] = info
        run.save()
        if llm is not None:
            engines[name] = llm
    if "dense" not in engines:
        raise RuntimeError("the dense engine did not start; nothing to compare")
    rng = np.random.default_rng(a.seed)
    vocab = min(int(config["vocab_size"]), 32000)
    prompts = lambda b: rng.integers(0, vocab, (b, a.prompt_len)).tolist()  # noqa: E731
    per_req: dict[int, float] = {}
    for b in a.batches:  # warm-up per shape, every variant, full length, untimed
        if run.remaining() < 30:
            run.skip(f"warm-up batch {b}", f"deadline: {run.remaining():.0f} s left")
            continue
        t = time.monotonic()
        for llm in engines.values():
            measure(llm, prompts(b), a.new_tokens)
        per_req[b] = (time.monotonic() - t) / len(engines)
    for rnd in range(1, a.rounds + 1):
        for b in a.batches:
            if b not in per_req:
                continue
            if run.remaining() < per_req[b] * len(engines) + 10:
                run.skip(f"round {rnd} batch {b}", f"deadline: {run.remaining():.0f} s left")
                continue
            for name, llm in engines.items():
                s = measure(llm, prompts(b), a.new_tokens)
                speed["runs"].append({"variant": name, "batch": b, "round": rnd,
                                      "kept": B - len(variants[name]), **s})
                run.log(f"round {rnd} batch {b:3d} {name:6s}: prefill {s['prefill_ms']:9.1f} ms, "
                        f"TPOT {s['tpot_mean_ms']:7.2f} ms, {s['output_tokens_per_s']:9.1f} out tok/s")
            run.save()
    live = {n: r for n, r in variants.items() if n in engines}
    speed["summary"] = speed_summary(
        speed["runs"], live, B, shape, a, tpot_key="tpot_mean_ms",
        keys=("prefill_ms", "tpot_mean_ms", "output_tokens_per_s", "decode_tokens_per_s"))
    for s in speed["summary"]:
        if s["variant"] != "dense":
            run.log(f"batch {s['batch']:3d} {s['variant']:6s}: speedup "
                    f"{s['speedup_output_tokens_per_s']:.3f} (TPOT {s['speedup_tpot_mean']:.3f}, "
                    f"prefill {s['speedup_prefill']:.3f}) vs ideal {s['ideal_speedup']:.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return common_args(__doc__.splitlines()[0], rounds=3, deadline_s=420.0).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    run = Run(parse_args(argv), name="gpu_vllm", note=NOTE)
    a = run.args
    run.log(f"gpu_vllm: arch {a.arch}, batches {a.batches}, prompt {a.prompt_len}, "
            f"{a.new_tokens} new tokens, deadline {a.deadline_s:.0f} s -> {run.out}")
    env = run.step("env", step_env)
    model_dir = run.step("synth", step_synth) if env else None
    if model_dir:
        run.step("vllm_speed", step_vllm_speed, model_dir, need_s=60)
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
