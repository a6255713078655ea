"""Dense vs pruned at 7-8B scale on one GPU: three engines, one synthetic checkpoint.

    python3 bench/gpu.py OUTDIR --engine transformers|vllm|serve [--arch llama-3.1-8b] ...
    (or `[ENGINE=vllm|serve] bash bench/gpu_check.sh OUTDIR`, which maps env knobs onto these
    options and brings the packages a bare GPU machine lacks; docs/bench.md "At GPU scale")

Every engine shares the steps env (versions, device) and synth (`tabp_vllm.synth` writes a
random-weight checkpoint of the published shape, reused when it exists), the hand-made masks
(`tabp_vllm.timed_decode.removed_blocks`: k blocks spread over the latter half, final block kept)
and one runner (`Run`): each step in its own try/except (an error is recorded in the JSON and the
run goes on), all under one deadline (`--deadline-s`: steps that no longer fit are skipped and
recorded), OUTDIR/<engine's name>.json rewritten after every step.

- `--engine transformers` (gpu_scale.*; needs neither vLLM nor Ray): transformers (bf16, sdpa,
  eager, no CUDA graphs) loads the checkpoint once; variants dense, k=4, k=8 by deleting blocks
  (`tabp_vllm.timed_decode`); per batch size prefill time, then greedy decode with the KV cache,
  every step timed; variants interleaved over rounds. Then the scoring cost: the `score` CLI (tabp,
  block_influence; sleb if time is left) on ARC-Easy train. A lower bound on what serving gets.
- `--engine vllm` (gpu_vllm.*): one vLLM engine per variant as `tabp-vllm serve` builds it
  (`engine_args_for`, the `tabp_pruned` loader, compiled with CUDA graphs on a GPU), all on the
  GPU at once with `gpu_memory_utilization` from `gpu_memory_fractions`; per batch size one
  untimed warm-up, then interleaved rounds of offline `generate` of one token (prefill) and of
  `--new-tokens` (EOS ignored); TPOT = (full - prefill) / (new_tokens - 1).
- `--engine serve` (gpu_serve.*, the GPU setting of the serve-vs-bare study): one `tabp-vllm
  serve` (dense + the pruned variants) and one bare vLLM api_server of the dense model share the
  GPU (the card split once for all engines; they start one at a time under the node's
  engine-start lock), then `tabp-vllm bench` loads every variant and the bare server at each
  concurrency (`--batches`), interleaved in mirrored rounds. 8 files: gpu_serve.{json,log}, the
  bench's gpu_serve_bench.{json,md} + two plots, serve.log, bare.log.

Random weights time what real ones do (same shapes, same kernels); the masks and any generated
text mean nothing. Falls back to the CPU (recorded as `cpu_fallback`) where there is no CUDA, for
the tests (tests/test_synth.py, tiny shapes).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from pathlib import Path
from typing import Any

# A bare GPU machine runs this with its own python3, the package not installed: import it from the
# checkout (gpu_check.sh also puts it on PYTHONPATH).
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# The vLLM engines' model stats are read through `LLM.apply_model`, which pickles a function.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

from tabp_vllm.timed_decode import Variants, cuda_sync, generate_timed, removed_blocks  # noqa: E402

T0 = time.monotonic()
NOTE = ("transformers eager (sdpa, DynamicCache, no CUDA graphs) on synthetic random weights of "
        "the published shape; not vLLM. Speed does not depend on weight values; the masks made "
        "here carry no task signal.")


class Run:
    """The run's state: options, deadline, the JSON document, the log."""

    def __init__(self, args: argparse.Namespace, name: str = "gpu_scale", note: str = NOTE):
        self.args, self.name = args, name
        self.out = Path(args.outdir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / f"{name}.log"
        self.log_path.write_text("")
        self.doc: dict[str, Any] = {
            "schema": f"tabp-vllm/{name.replace('_', '-')}/1", "note": note,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "options": {k: v for k, v in vars(args).items()},
            "steps": {}, "skipped": [], "errors": {},
        }

    def elapsed(self) -> float:
        return time.monotonic() - T0

    def remaining(self) -> float:
        return self.args.deadline_s - self.elapsed()

    def log(self, msg: str) -> None:
        line = f"[{_dt.datetime.now().strftime('%H:%M:%S')} +{self.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        with self.log_path.open("a") as f:
            f.write(line + "\n")

    def skip(self, what: str, why: str) -> None:
        self.doc["skipped"].append({"what": what, "why": why})
        self.log(f"skip {what}: {why}")

    def save(self) -> None:
        self.doc["elapsed_s"] = round(self.elapsed(), 2)
        tmp = self.out / f"{self.name}.json.tmp"
        tmp.write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        tmp.replace(self.out / f"{self.name}.json")

    def finish(self) -> int:
        """Plot what was measured, write the final JSON; the exit code (0: no step failed)."""
        if self.doc.get("speed", {}).get("summary"):
            self.step("plot", step_plot)
        self.doc["ok"] = not self.doc["errors"]
        self.save()
        self.log(f"done: {len(self.doc['errors'])} error(s), {len(self.doc['skipped'])} skipped; "
                 f"{self.out / f'{self.name}.json'}")
        return 0 if self.doc["ok"] else 1

    def step(self, name: str, fn, *a, need_s: float = 0.0, **kw):
        """Run one step: time it, record its result or its error, never raise."""
        if self.remaining() < need_s:
            self.skip(name, f"deadline: {self.remaining():.0f} s left, step needs ~{need_s:.0f} s")
            self.save()
            return None
        self.log(f"step {name} ...")
        t = time.monotonic()
        try:
            res = fn(self, *a, **kw)
            ok = True
        except BaseException as exc:  # noqa: BLE001 - every failure is recorded, the run goes on
            if isinstance(exc, KeyboardInterrupt):
                raise
            res = None
            ok = False
            self.doc["errors"][name] = f"{type(exc).__name__}: {exc}"
            self.log(f"step {name} FAILED: {type(exc).__name__}: {exc}")
            with self.log_path.open("a") as f:
                f.write(traceback.format_exc())
        wall = round(time.monotonic() - t, 3)
        self.doc["steps"][name] = {"ok": ok, "wall_s": wall}
        self.log(f"step {name} {'done' if ok else 'failed'} in {wall:.1f} s")
        self.save()
        return res


# ---------------------------------------------------------------------------------- 0. env

def step_env(run: Run) -> dict[str, Any]:
    import torch
    import transformers

    cuda = torch.cuda.is_available() and run.args.device != "cpu"
    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda, "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "device": "cuda" if cuda else "cpu", "cpu_fallback": not cuda,
        # find_spec only: importing vLLM takes seconds and the path measured here does not need it
        "vllm_importable": importlib.util.find_spec("vllm") is not None,
        "pydantic_importable": importlib.util.find_spec("pydantic") is not None,
    }
    try:
        import safetensors
        env["safetensors"] = safetensors.__version__
    except Exception:  # noqa: BLE001
        pass
    if cuda:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu_name=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 2),
                   gpu_count=torch.cuda.device_count(), gpu_capability=f"{p.major}.{p.minor}",
                   cudnn=torch.backends.cudnn.version())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,"
                                  "power.limit", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip()
        except Exception as exc:  # noqa: BLE001
            env["nvidia_smi"] = f"unavailable: {exc}"
    run.doc["env"] = env
    run.log(f"device {env['device']} {env.get('gpu_name', env['cpu_model'])}; "
            f"torch {env['torch']}, transformers {env['transformers']}, vllm importable: "
            f"{env['vllm_importable']}")
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -------------------------------------------------------------------------------- 1. synth

def step_synth(run: Run) -> str:
    from tabp_vllm.synth import synth_model

    a = run.args
    model_dir = Path(a.model_dir or f"/tmp/synth-{a.arch}")
    cfg_path = model_dir / "config.json"
    if cfg_path.exists() and (model_dir / "model.safetensors.index.json").exists():
        meta = json.loads(cfg_path.read_text()).get("tabp_synthetic", {})
        if meta.get("arch") == a.arch and meta.get("seed") == a.seed:
            run.doc["synth"] = {"path": str(model_dir), "reused": True, **meta}
            run.log(f"reusing {model_dir} (same arch and seed)")
            return str(model_dir)
    res = synth_model(a.arch, model_dir, seed=a.seed, dtype=a.dtype,
                      device=run.doc["env"]["device"], tokenizer=a.tokenizer,
                      log=lambda m: run.log(f"  synth: {m}"))
    res["gb_per_s_written"] = round(res["bytes"] / 1e9 / max(res["write_s"], 1e-9), 2)
    run.doc["synth"] = {**res, "reused": False}
    run.log(f"synth {a.arch}: {res['params'] / 1e9:.3f} B params, {res['bytes'] / 2**30:.1f} GiB "
            f"in {res['shards']} shards, {res['wall_s']:.1f} s (generate {res['generate_s']:.1f} s, "
            f"write {res['write_s']:.1f} s)")
    return str(model_dir)


# -------------------------------------------------------------------------------- 2. speed

def variant_masks(run: Run, model_dir: str, num_layers: int) -> dict[str, list[int]]:
    variants: dict[str, list[int]] = {"dense": []}
    for k in run.args.ks:
        try:
            variants[f"k{k}"] = removed_blocks(num_layers, k)
        except ValueError as exc:
            run.skip(f"variant k{k}", str(exc))
    info = {}
    for name, removed in variants.items():
        entry: dict[str, Any] = {"removed_layers": removed, "kept": num_layers - len(removed)}
        if removed:  # validate through the project's mask contract when it imports here
            try:
                from tabp_vllm.mask import make_mask
                m = make_mask(model_dir, removed, task="gpu-scale", model_id=run.args.arch,
                              method="hand-made")
                entry["mask_hash"] = m.content_hash()
            except Exception as exc:  # noqa: BLE001
                entry["mask_note"] = f"tabp_vllm.mask not used: {type(exc).__name__}: {exc}"
        info[name] = entry
    run.doc["variants"] = info
    return variants


def summarize(batch: int, prompt_len: int, new_tokens: int, r: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    steps = np.asarray(r["steps_s"]) if r["steps_s"] else np.asarray([float("nan")])
    decode = float(np.nansum(steps))
    total = r["prefill_s"] + decode
    return {
        "prefill_ms": round(r["prefill_s"] * 1e3, 3),
        "prefill_tokens_per_s": round(batch * prompt_len / r["prefill_s"], 1),
        "tpot_p50_ms": round(float(np.nanpercentile(steps, 50)) * 1e3, 3),
        "tpot_p99_ms": round(float(np.nanpercentile(steps, 99)) * 1e3, 3),
        "tpot_mean_ms": round(float(np.nanmean(steps)) * 1e3, 3),
        "decode_steps": len(r["steps_s"]),
        "decode_tokens_per_s": round(batch * len(r["steps_s"]) / decode, 1) if decode else None,
        "output_tokens_per_s": round(batch * new_tokens / total, 1),
        "request_s": round(total, 4),
    }


def speed_summary(runs: list[dict[str, Any]], variants: dict[str, list[int]], num_layers: int,
                  shape, a: argparse.Namespace, tpot_key: str = "tpot_p50_ms",
                  keys: tuple[str, ...] = ("prefill_ms", "tpot_p50_ms", "tpot_p99_ms",
                                           "output_tokens_per_s", "decode_tokens_per_s"),
                  ) -> list[dict[str, Any]]:
    """Median over rounds per (variant, batch); speedup vs dense next to the FLOPs model's ideal."""
    import numpy as np

    from tabp_vllm.flops import ideal_speedup

    summary = []
    for b in a.batches:
        rows = {n: [r for r in runs if r["variant"] == n and r["batch"] == b] for n in variants}
        if not rows.get("dense"):
            continue
        med = {n: {key: float(np.median([r[key] for r in rs])) for key in keys}
               for n, rs in rows.items() if rs}
        d = med["dense"]
        for n, m in med.items():
            kept = num_layers - len(variants[n])
            ideal = ideal_speedup(shape, kept, a.prompt_len, a.new_tokens)
            tok_s = [r["output_tokens_per_s"] for r in rows[n]]
            summary.append({
                "variant": n, "batch": b, "kept": kept, "rounds": len(rows[n]), **m,
                "speedup_output_tokens_per_s": round(m["output_tokens_per_s"] /
                                                     d["output_tokens_per_s"], 4),
                f"speedup_{tpot_key[:-3]}": round(d[tpot_key] / m[tpot_key], 4),
                "speedup_prefill": round(d["prefill_ms"] / m["prefill_ms"], 4),
                "ideal_speedup": round(ideal["ideal_speedup"], 4),
                "ideal_decode_speedup": round(ideal["ideal_decode_speedup"], 4),
                "blocks_ratio": round(num_layers / kept, 4),
                "round_spread_output_tokens_per_s": round(
                    (max(tok_s) - min(tok_s)) / m["output_tokens_per_s"], 4)
                if len(tok_s) > 1 else None,
            })
    return summary


def step_speed(run: Run, model_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from tabp_vllm.flops import DecoderShape, shape_summary

    a = run.args
    device = run.doc["env"]["device"]
    t = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, a.dtype), attn_implementation="sdpa",
        device_map=device if device == "cuda" else None).eval()
    if device != "cuda":
        model = model.to(device)
    cuda_sync(device)
    load_s = time.monotonic() - t
    B = model.config.num_hidden_layers
    shape = DecoderShape.from_config(model.config)
    speed: dict[str, Any] = {
        "units": {"prefill_ms": "ms per batch", "tpot_*_ms": "ms per decode step (whole batch)",
                  "*_tokens_per_s": "tokens/s summed over the batch",
                  "output_tokens_per_s": "batch * new_tokens / (prefill + decode)"},
        "load_s": round(load_s, 2), "dtype": a.dtype, "attn_implementation": "sdpa",
        "cache": "DynamicCache", "cuda_graphs": False, "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens, "batches": a.batches, "rounds_planned": a.rounds,
        "shape": shape_summary(shape), "runs": [],
    }
    if device == "cuda":
        speed["weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    run.doc["speed"] = speed
    run.log(f"loaded in {load_s:.1f} s: {B} blocks" + (
        f", {speed['weights_gib']} GiB on the GPU" if device == "cuda" else ""))
    variants = variant_masks(run, model_dir, B)
    vs = Variants(model)
    vocab = min(model.config.vocab_size, 32000)
    gen = torch.Generator().manual_seed(a.seed)
    inputs = {b: torch.randint(0, vocab, (b, a.prompt_len), generator=gen).to(device)
              for b in a.batches}
    per_req = None
    failed_batches: set[int] = set()
    for rnd in range(1, a.rounds + 1):
        for b in a.batches:
            if b in failed_batches:
                continue
            # keep room for the scorers: later rounds go first, then batch sizes of round 1
            if run.remaining() < a.score_reserve_s + (per_req or 0) * len(variants):
                run.skip(f"speed round {rnd} batch {b}",
                         f"deadline: {run.remaining():.0f} s left, {a.score_reserve_s:.0f} s "
                         f"kept for scoring")
                continue
            if rnd == 1:  # warm-up per shape, every variant, full length, untimed: kernels,
                # cuBLAS heuristics, allocator, and GPU clocks ramping up from idle (a first run
                # on an idle GPU was 4x slower per token in an earlier run)
                try:
                    for removed in variants.values():
                        vs.use(removed)
                        generate_timed(model, inputs[b], a.new_tokens, device)
                    vs.use([])
                except torch.cuda.OutOfMemoryError as exc:
                    failed_batches.add(b)
                    run.doc["errors"][f"speed batch {b}"] = f"OOM in warm-up: {exc}"[:500]
                    run.log(f"batch {b}: OOM in warm-up, skipped")
                    gc.collect()
                    torch.cuda.empty_cache()
                    continue
            for name, removed in variants.items():
                vs.use(removed)
                try:
                    r = generate_timed(model, inputs[b], a.new_tokens, device)
                except torch.cuda.OutOfMemoryError as exc:
                    run.doc["errors"][f"speed {name} batch {b} round {rnd}"] = f"OOM: {exc}"[:500]
                    gc.collect()
                    torch.cuda.empty_cache()
                    continue
                s = summarize(b, a.prompt_len, a.new_tokens, r)
                per_req = max(per_req or 0, s["request_s"])
                row = {"variant": name, "batch": b, "round": rnd, "kept": B - len(removed), **s}
                if device == "cuda":
                    row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    torch.cuda.reset_peak_memory_stats()
                speed["runs"].append(row)
                run.log(f"round {rnd} batch {b:3d} {name:6s}: prefill {s['prefill_ms']:9.1f} ms, "
                        f"TPOT p50 {s['tpot_p50_ms']:7.2f} ms p99 {s['tpot_p99_ms']:7.2f} ms, "
                        f"{s['output_tokens_per_s']:9.1f} out tok/s")
            run.save()
    vs.use([])

    summary = speed_summary(speed["runs"], variants, B, shape, a)
    speed["summary"] = summary
    for s in summary:
        if s["variant"] != "dense":
            run.log(f"batch {s['batch']:3d} {s['variant']:6s}: speedup {s['speedup_output_tokens_per_s']:.3f}"
                    f" (TPOT {s['speedup_tpot_p50']:.3f}, prefill {s['speedup_prefill']:.3f}) vs "
                    f"ideal {s['ideal_speedup']:.3f}")
    del model, vs, inputs
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------- 3. score

def step_score(run: Run, model_dir: str, method: str, samples: int) -> dict[str, Any]:
    a = run.args
    out = run.out / f"mask_{method}.json"
    cmd = [sys.executable, "-m", "tabp_vllm.cli", "score", "--model", model_dir,
           "--task", "arc_easy", "--split", "train", "--samples", str(samples),
           "--method", method, "--k", str(a.score_k), "--device", run.doc["env"]["device"],
           "-o", str(out)]
    timeout = max(10.0, run.remaining() - 15)
    run.log(f"  $ {' '.join(cmd)}  (timeout {timeout:.0f} s)")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    t = time.monotonic()
    res: dict[str, Any] = {"method": method, "samples": samples, "k": a.score_k,
                           "command": " ".join(cmd)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=str(REPO))
        res["rc"] = proc.returncode
        tail = (proc.stdout + proc.stderr).strip().splitlines()
    except subprocess.TimeoutExpired as exc:
        res["rc"] = "timeout"
        tail = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes)
                else (exc.stdout or "")).splitlines()
    res["wall_s"] = round(time.monotonic() - t, 2)
    # rich progress bars redraw with \r: keep the last state of each line
    tail = [ln.split("\r")[-1] for ln in tail if ln.strip()][-15:]
    with run.log_path.open("a") as f:
        f.write("\n".join(f"    | {ln}" for ln in tail) + "\n")
    if res["rc"] != 0:
        raise RuntimeError(f"score {method} rc={res['rc']}: {tail[-1] if tail else ''}"[:600]
                           + f" (wall {res['wall_s']} s)")
    mask = json.loads(out.read_text())
    cal = mask.get("calibration", {})
    res.update(mask_file=out.name, removed_layers=mask.get("removed_layers"),
               candidate_range=_mask_params(mask).get("candidate_range"),
               num_hidden_layers=mask.get("num_hidden_layers"),
               scorer_wall_s=cal.get("wall_s"), forward_passes=cal.get("forward_passes"),
               device=cal.get("device"), startup_and_load_s=round(res["wall_s"] -
                                                                  (cal.get("wall_s") or 0), 2))
    run.doc.setdefault("scoring", {})[method] = res
    run.log(f"score {method}: {res['wall_s']:.1f} s wall (scoring {res['scorer_wall_s']} s, "
            f"{res['forward_passes']} forward passes), removed {res['removed_layers']}")
    return res


def _mask_params(mask: dict[str, Any]) -> dict[str, Any]:
    method = mask.get("method")
    return (method.get("params") if isinstance(method, dict) else mask.get("params")) or {}


def sleb_plan(run: Run) -> dict[str, Any]:
    """How many samples SLEB can afford before the deadline.

    SLEB costs sum_{r<k} (C - r) passes per sample (C candidate blocks, k rounds); the time per
    sample pass is taken from the block-influence run (one forward with hidden states), x1.5 for
    SLEB's full-vocabulary log-softmax; process start and model load from the same run.
    """
    a = run.args
    sc = run.doc.get("scoring", {})
    ref = next((sc[m] for m in ("block_influence", "tabp") if sc.get(m, {}).get("forward_passes")),
               None)
    wanted = min(a.sleb_samples, a.score_samples)
    plan: dict[str, Any] = {"wanted_samples": wanted, "min_samples": min(16, wanted)}
    if ref is None:
        return {**plan, "samples": 0, "why": "no finished scorer run to estimate SLEB's cost from"}
    B = int(ref.get("num_hidden_layers") or 32)
    lo, hi = ref.get("candidate_range") or (B // 2, B)  # the scorer's default: the latter half
    C, k = hi - lo, a.score_k
    passes_per_sample = sum(max(C - r, 0) for r in range(k))
    per_pass = ref["scorer_wall_s"] / max(ref["forward_passes"], 1) * 1.5
    overhead = ref["startup_and_load_s"] + 10
    budget = run.remaining() - 20 - overhead
    fit = int(budget / max(per_pass * passes_per_sample, 1e-9)) if budget > 0 else 0
    samples = min(wanted, fit)
    if samples > 16:
        samples -= samples % 16  # whole batches of the scorer's default batch size
    need = overhead + per_pass * passes_per_sample * samples
    plan.update(samples=samples, candidates=C, passes_per_sample=passes_per_sample,
                est_s_per_sample_pass=round(per_pass, 5), est_overhead_s=round(overhead, 1),
                need_s=round(need, 1), left_s=round(run.remaining(), 1),
                why=f"{run.remaining():.0f} s left fits {fit} samples "
                    f"(~{per_pass * passes_per_sample:.2f} s each + {overhead:.0f} s load)")
    run.log(f"SLEB plan: {samples} samples ({plan['why']})")
    return plan


def scoring_reference(run: Run) -> None:
    run.doc.setdefault("scoring", {})["reference"] = {
        "paper": "TaBP, Llama-3-8B, one A100: TaBP 72 s vs SLEB 227.5 s (estimate cost)",
        "here": f"{run.args.arch} shape on {run.doc['env'].get('gpu_name', 'cpu')}; wall_s is the "
                f"whole CLI process (python start, model load, data), scorer_wall_s the "
                f"scoring loop alone",
    }


# -------------------------------------------------------------------------------- 4. plot

def step_plot(run: Run) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summary = run.doc.get("speed", {}).get("summary") or []
    if not summary:
        raise RuntimeError("no speed summary to plot")
    names = list(dict.fromkeys(s["variant"] for s in summary))
    batches = sorted({s["batch"] for s in summary})
    get = {(s["variant"], s["batch"]): s for s in summary}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    w = 0.8 / len(names)
    x = np.arange(len(batches))
    for i, n in enumerate(names):
        ys = [get[(n, b)]["output_tokens_per_s"] if (n, b) in get else 0 for b in batches]
        ax1.bar(x + i * w, ys, w, label=f"{n} ({get[(n, batches[0])]['kept']} blocks)"
                if (n, batches[0]) in get else n)
    ax1.set_xticks(x + w * (len(names) - 1) / 2, [str(b) for b in batches])
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("output tokens/s (prefill + decode)")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("throughput per variant")
    pruned = [n for n in names if n != "dense"]
    w2 = 0.8 / max(1, len(pruned))
    for i, n in enumerate(pruned):
        ach = [get[(n, b)]["speedup_output_tokens_per_s"] if (n, b) in get else 0 for b in batches]
        ideal = [get[(n, b)]["ideal_speedup"] if (n, b) in get else 0 for b in batches]
        ax2.bar(x + i * w2, ach, w2, label=f"{n} achieved")
        ax2.hlines(ideal, x + i * w2 - w2 / 2, x + i * w2 + w2 / 2, colors="black",
                   linestyles="--" if i % 2 else "-", zorder=3, label=f"{n} ideal (FLOPs model)")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_xticks(x + w2 * (len(pruned) - 1) / 2, [str(b) for b in batches])
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("speedup vs dense (output tokens/s)")
    ax2.set_title("achieved (bars) vs ideal (lines) speedup")
    top = max([s["ideal_speedup"] for s in summary] + [s["speedup_output_tokens_per_s"] for s in summary])
    ax2.set_ylim(0, top * 1.3)  # room above the bars for the legend
    ax2.legend(fontsize=8, loc="upper left", ncol=2)
    env = run.doc["env"]
    fig.suptitle(f"{run.args.arch} (synthetic weights), {env.get('gpu_name', 'CPU')}, "
                 f"{run.doc['speed'].get('engine', 'transformers eager bf16')}, prompt "
                 f"{run.args.prompt_len}, {run.args.new_tokens} new tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(run.out / f"{run.name}.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------- main

def common_args(description: str, rounds: int, deadline_s: float) -> argparse.ArgumentParser:
    """The options every GPU-scale script shares: shape, variants, lengths, deadline, checkpoint."""
    ints = lambda s: [int(x) for x in str(s).split(",") if x.strip()]  # noqa: E731
    p = argparse.ArgumentParser(description=description)
    p.add_argument("outdir")
    p.add_argument("--arch", default="llama-3.1-8b")
    p.add_argument("--batches", type=ints, default=[1, 16, 64])
    p.add_argument("--ks", type=ints, default=[4, 8], help="Blocks removed per pruned variant.")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--deadline-s", type=float, default=deadline_s)
    p.add_argument("--model-dir", default=None, help="Default /tmp/synth-ARCH.")
    p.add_argument("--tokenizer", default=None, help="Tokenizer folder for synth-model.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", help="Checkpoint dtype synth-model writes.")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    return p



# ---------------------------------------------------------------- ENGINE=vllm: vLLM engines


VLLM_NOTE = ("vLLM offline engines built by tabp_vllm.engine (the tabp_pruned loader), one per "
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



# ------------------------------------------------------- ENGINE=serve: serve against bare vLLM


SERVE_NOTE = ("`tabp-vllm serve` (Ray Serve LLM, one engine per variant) against a bare vLLM OpenAI "
        "server of the dense model on the same GPU, loaded by `tabp-vllm bench`; synthetic random "
        "weights of the published shape. Speed does not depend on weight values; accuracy does.")
BENCH_STEM = "gpu_serve_bench"
CPU_KV_CACHE_GIB = 0.25  # per engine, CPU fallback only (a GPU sizes it from its fraction)
# vLLM's line per engine (a served engine's carries its replica's prefix: LLMServer:<variant>)
KV_LINE = re.compile(r"(?:LLMServer:(\S+) pid=.*)?KV cache size: ([\d,]+) tokens")



def step_masks(run: Run, model_dir: str) -> dict[str, Any]:
    """The pruned variants' mask files (hand-made, as gpu_vllm's engines use them)."""
    from tabp_vllm.mask import make_mask
    from tabp_vllm.models import load_model_config

    blocks = int(load_model_config(model_dir)["num_hidden_layers"])
    variants = variant_masks(run, model_dir, blocks)
    masks = {}
    # outside OUTDIR: a device run returns at most 8 files (the masks are in gpu_serve.json)
    folder = Path(tempfile.mkdtemp(prefix="gpu-serve-masks-"))
    for name, removed in variants.items():
        if removed:
            path = folder / f"{name}.json"
            make_mask(model_dir, removed, task=name, model_id=run.args.arch,
                      method="hand-made").save(path)
            masks[name] = str(path)
    return {"blocks": blocks, "variants": variants, "masks": masks}


def memory_plan(run: Run, model_dir: str, plan: dict[str, Any], max_model_len: int) -> dict[str, Any]:
    """GPU: one split of the card for the served engines and the bare one (same tokens cached
    each); CPU: a fixed KV cache per engine."""
    if run.doc["env"]["device"] != "cuda":
        return {"kv_cache_gib": CPU_KV_CACHE_GIB}
    from tabp_vllm.hardware import gpu_total_bytes
    from tabp_vllm.memory import gpu_memory_fractions

    engines = {**plan["variants"], "bare": []}
    needs = engine_needs(model_dir, engines, plan["blocks"])
    fractions = dict(zip(engines, gpu_memory_fractions(needs, gpu_total_bytes(), max_model_len)))
    served = sum(f for n, f in fractions.items() if n != "bare")
    return {"fractions": fractions, "serve_share": int(served * 1e4) / 1e4,
            "bare_gpu_memory_utilization": fractions["bare"]}


def kv_tokens(log_text: str) -> dict[str, int]:
    """The KV cache size (tokens) vLLM logged for each engine in a log: by served variant, or
    under "engine" for a bare server's one engine."""
    return {name or "engine": int(n.replace(",", "")) for name, n in KV_LINE.findall(log_text)}


def gpu_processes() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {exc}"


def step_servers_and_bench(run: Run, model_dir: str, plan: dict[str, Any]) -> dict[str, Any]:
    from tabp_vllm.hardware import engine_start_lock
    from tabp_vllm.loadtest.commands import run_bench
    from tabp_vllm.loadtest.servers import api_server_command
    from tabp_vllm.process import ManagedProcess, free_port
    from tabp_vllm.serve.launcher import ServeProcess
    from tabp_vllm.serve.options import ServeOptions

    a = run.args
    gpu = run.doc["env"]["device"] == "cuda"
    max_model_len = a.prompt_len + a.new_tokens + 16
    mem = memory_plan(run, model_dir, plan, max_model_len)
    port, bare_port = free_port(8000, 8100), free_port(8101, 8200)
    metrics_port = free_port(8290, 8390)
    # batches up to the top concurrency, on both sides (fewer CUDA graphs to capture at start)
    seqs = max(a.batches)
    engine = {"max_model_len": max_model_len, "extra": {"max_num_seqs": seqs},
              **({"gpu_memory_share": mem["serve_share"]} if gpu
                 else {"kv_cache_gib": mem["kv_cache_gib"]})}
    options = ServeOptions.model_validate({
        "model": model_dir, "port": port, "metrics_port": metrics_port, "engine": engine,
        "variants": [{"mask": m} for m in plan["masks"].values()],
        "verbose": True})  # vLLM's records (the KV cache sizes read below) in serve.log too
    # every engine's log lines kept (Ray folds lines that differ only in numbers)
    serve = ServeProcess(options, run.out / "serve.log", env={"RAY_DEDUP_LOGS": "0"})
    # the names `serve` gives them (each mask's task is its variant's key here)
    names = {v.task or "dense": v.name for v in serve.spec.variants}
    alias = names["dense"]
    doc: dict[str, Any] = {"memory_plan": mem, "served_names": names, "max_model_len": max_model_len,
                           "ports": {"serve": port, "bare": bare_port, "metrics": metrics_port}}
    run.doc["serve"] = doc
    run.log(f"memory plan: {mem}")
    bare_extra = {"max_num_seqs": seqs}
    if gpu:
        bare_extra["gpu_memory_utilization"] = mem["bare_gpu_memory_utilization"]
    bare_cmd = api_server_command(model_dir, bare_port, alias, bare=True,
                                  max_model_len=max_model_len,
                                  kv_cache_gib=None if gpu else mem["kv_cache_gib"], extra=bare_extra)
    doc["commands"] = {"serve_options": options.model_dump(mode="json"), "bare": bare_cmd}
    with ExitStack() as stack:
        bare = ManagedProcess(bare_cmd, run.out / "bare.log", name="bare vLLM api_server")
        stack.callback(serve.stop)
        stack.callback(bare.stop, grace_s=30)
        t0 = time.monotonic()
        # The bare engine starts alone under the lock; the served engines queue behind it.
        with engine_start_lock(log=run.log):
            serve.start()
            bare.start().wait_ready(f"http://127.0.0.1:{bare_port}/v1/models",
                                    deadline_s=max(run.remaining() - 60, 30), interval_s=2)
            doc["bare_ready_s"] = round(time.monotonic() - t0, 1)
            run.log(f"bare vLLM ready after {doc['bare_ready_s']} s")
        serve.ready_timeout_s = max(run.remaining() - 30, 30)
        serve.wait_ready()
        # read at start; its content is in the JSON (doc["commands"]), and one device call
        # returns at most 8 files
        serve.config_path.unlink(missing_ok=True)
        doc["serve_ready_s"] = round(time.monotonic() - t0, 1)
        doc["serve_ready_lines"] = [ln.strip() for ln in serve.log_text().splitlines()
                                    if ln.startswith("ready: ")]
        run.log(f"tabp-vllm serve ready after {doc['serve_ready_s']} s: {doc['serve_ready_lines']}")
        import httpx

        cards = httpx.get(f"{serve.base_url}/v1/models", timeout=10).json()["data"]
        doc["models"] = {c["id"]: c.get("metadata", {}) for c in cards}
        if gpu:
            doc["gpu_processes"] = gpu_processes()
        run.save()

        targets = 1 + len(names)
        per_level = targets * (a.duration + a.ramp * a.rounds)
        duration = a.duration
        left = run.remaining() - 45 - targets * 10  # stop + warm-up
        if per_level * len(a.batches) > left:  # shrink to the time left, never below 2 s a round
            duration = max(2.0 * a.rounds, left / len(a.batches) / targets - a.ramp * a.rounds)
            run.log(f"deadline: bench duration {a.duration:g} -> {duration:.1f} s per variant per level")
        doc["bench_duration_s"] = duration
        result = run_bench(
            url=serve.base_url, variants=list(names.values()), model=model_dir,
            masks=list(plan["masks"].values()), bare_vllm=f"{alias}@http://127.0.0.1:{bare_port}",
            levels=",".join(str(x) for x in a.batches), duration=duration, rounds=a.rounds,
            ramp=a.ramp, warmup=2, input_len=a.prompt_len, output_len=a.new_tokens,
            range_ratio=0.0, out=str(run.out), stem=BENCH_STEM, progress=False,
            notes=SERVE_NOTE + f" Engines: {run.doc['env'].get('gpu_name', 'CPU')}.")
        # read after the load: Ray forwards the replicas' lines to the driver's log with a delay
        doc["kv_cache_tokens"] = {"serve": kv_tokens(serve.log_text()),
                                  "bare": kv_tokens(bare.log_text())}
        run.log(f"KV cache tokens per engine: {doc['kv_cache_tokens']}")
        doc["comparison"] = result["comparison"]
        doc["metrics"] = [{k: m[k] for k in ("variant", "level", "output_tokens_per_s",
                                             "ttft_s", "itl_s", "completed", "errors") if k in m}
                          for m in result["metrics"]]
    for row in result["comparison"]["server_overhead"]:
        run.log(f"concurrency {row['level']:g}: server / bare {row['throughput_ratio']:.3f}")
    for row in result["comparison"]["speedups"]:
        run.log(f"concurrency {row['level']:g} {row['variant']}: speedup "
                f"{row['achieved_speedup']:.3f} vs ideal {row['ideal_speedup']:.3f}")
    return doc



# --------------------------------------------------------------------------------- main


def transformers_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_args("gpu.py --engine transformers: speed in transformers, and the scoring cost",
                    rounds=2, deadline_s=480.0)
    p.add_argument("--score-samples", type=int, default=1024)
    p.add_argument("--score-k", type=int, default=8)
    p.add_argument("--sleb-samples", type=int, default=128)
    p.add_argument("--score-reserve-s", type=float, default=150.0,
                   help="Seconds the speed step leaves for the scorers.")
    p.add_argument("--skip", type=lambda s: set(filter(None, s.split(","))), default=set(),
                   help="Steps to skip: speed,score,sleb.")
    return p.parse_args(argv)



def vllm_args(argv: list[str] | None = None) -> argparse.Namespace:
    return common_args("gpu.py --engine vllm: speed of vLLM engines built by the loader",
                       rounds=3, deadline_s=420.0).parse_args(argv)



def serve_args(argv: list[str] | None = None):
    p = common_args("gpu.py --engine serve: `tabp-vllm serve` against a bare vLLM server",
                    rounds=2, deadline_s=480.0)  # --batches: concurrencies
    p.add_argument("--duration", type=float, default=16.0,
                   help="Measured seconds per variant per level (split over the rounds).")
    p.add_argument("--ramp", type=float, default=2.0, help="Unmeasured load before each slice.")
    return p.parse_args(argv)



def start(args: argparse.Namespace, name: str, note: str, levels: str = "batches"):
    """The run and its first two steps, the same for every engine: env, then the checkpoint
    (None when either failed)."""
    run = Run(args, name=name, note=note)
    a = run.args
    run.log(f"{name}: arch {a.arch}, {levels} {a.batches}, prompt {a.prompt_len}, "
            f"{a.new_tokens} new tokens, deadline {a.deadline_s:.0f} s -> {run.out}")
    env = run.step("env", step_env)
    return run, run.step("synth", step_synth) if env else None


def main_transformers(argv: list[str] | None = None) -> int:
    run, model_dir = start(transformers_args(argv), "gpu_scale", NOTE)
    a = run.args
    if model_dir:
        if "speed" in a.skip:
            run.skip("speed", "--skip")
        else:
            run.step("speed", step_speed, model_dir, need_s=30)
        scoring_reference(run)
        if "score" in a.skip:
            run.skip("score", "--skip")
        else:
            for method in ("tabp", "block_influence"):
                run.step(f"score_{method}", step_score, model_dir, method, a.score_samples,
                         need_s=30)
            if "sleb" in a.skip:
                run.skip("score_sleb", "--skip")
            else:
                plan = sleb_plan(run)
                run.doc["scoring"]["sleb_plan"] = plan
                if plan["samples"] < plan["min_samples"]:
                    run.skip("score_sleb", f"deadline: {plan['why']}")
                else:
                    run.step("score_sleb", step_score, model_dir, "sleb", plan["samples"],
                             need_s=plan["need_s"])
                if "sleb" in run.doc.get("scoring", {}):
                    run.doc["scoring"]["sleb"]["note"] = (
                        f"SLEB on {plan['samples']} samples only (time budget), the others on "
                        f"{a.score_samples}: compare cost per sample pass, not wall time")
    else:
        run.skip("speed, score", "no checkpoint (env or synth failed)")
    return run.finish()


def main_vllm(argv: list[str] | None = None) -> int:
    run, model_dir = start(vllm_args(argv), "gpu_vllm", VLLM_NOTE)
    if model_dir:
        run.step("vllm_speed", step_vllm_speed, model_dir, need_s=60)
    return run.finish()


def main_serve(argv: list[str] | None = None) -> int:
    run, model_dir = start(serve_args(argv), "gpu_serve", SERVE_NOTE, levels="concurrencies")
    plan = run.step("masks", step_masks, model_dir) if model_dir else None
    if plan:
        run.step("serve_vs_bare", step_servers_and_bench, model_dir, plan, need_s=90)
    return run.finish()  # the bench drew its own plots



ENGINES = {"transformers": main_transformers, "vllm": main_vllm, "serve": main_serve}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--engine", choices=list(ENGINES), default="transformers")
    known, rest = pick.parse_known_args(argv)
    if not any(a.startswith("--engine") for a in argv) and {"-h", "--help"} & set(rest):
        print(__doc__)  # the overview; `--engine E --help` shows one engine's options
        return 0
    return ENGINES[known.engine](rest)


if __name__ == "__main__":
    sys.exit(main())
