"""`tabp-vllm bench`: load-test pruned variants against dense (and the server against bare vLLM)."""

from __future__ import annotations

import asyncio
import datetime as _dt
import os
import platform
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import typer

from tabp_vllm.errors import TabpError, user_errors

DEFAULT_URL = "http://127.0.0.1:8000"


def _parse_levels(text: str, mode: str) -> list[float]:
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TabpError(f"--levels {text!r}: expected numbers separated by commas") from None
    if not levels or any(x <= 0 for x in levels):
        raise TabpError(f"--levels {text!r}: expected positive numbers")
    if mode == "closed" and any(x != int(x) for x in levels):
        raise TabpError(f"--levels {text!r}: closed-loop levels are whole concurrencies")
    return levels


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _masks_by_variant(masks: list[str], alias: str, model_path: str) -> dict[str, Any]:
    from tabp_vllm.mask import load_mask

    out = {}
    for spec in masks:
        name, sep, file = spec.rpartition("=")
        mask = load_mask(file, model_path)
        out[name if sep else f"{alias}-{mask.task}"] = mask
    return out


def _start_servers(stack: ExitStack, model_path: str, alias: str, masks: dict[str, Any],
                   port: int, with_bare: bool, log_dir: Path, kv_cache_gib: float,
                   max_model_len: int, say) -> tuple[list[str], str | None]:
    """One api_server per variant (dense first) and optionally a bare vLLM: variant specs."""
    from tabp_vllm.loadtest.servers import ApiServer, api_server_command

    plan = [(alias, None, False)] + [(n, m, False) for n, m in masks.items()]
    if with_bare:
        plan.append((alias, None, True))
    servers, specs, bare_spec = [], [], None
    for i, (name, mask, bare) in enumerate(plan):
        p = port + i
        cmd = api_server_command(model_path, p, name, mask=mask, bare=bare,
                                 kv_cache_gib=kv_cache_gib, max_model_len=max_model_len)
        label = "bare-vllm" if bare else name
        srv = ApiServer(cmd, p, log_dir / f"server-{label}.log")
        stack.callback(srv.stop)
        srv.start()
        servers.append(srv)
        if bare:
            bare_spec = f"{name}@{srv.url}"
        else:
            specs.append(f"{name}@{srv.url}")
    say(f"starting {len(servers)} api_server(s) on ports {port}-{port + len(servers) - 1} "
        f"(logs in {log_dir}) ...")
    for srv in servers:  # started together, so their engines load in parallel
        srv.wait_ready()
    return specs, bare_spec


def run_bench(
    url: str = DEFAULT_URL,
    variants: list[str] | None = None,
    model: str = "llama",
    masks: list[str] | None = None,
    dense: str | None = None,
    bare_vllm: str | None = None,
    mode: str = "closed",
    levels: str = "1,4,16",
    duration: float = 30.0,
    rounds: int = 3,
    ramp: float = 5.0,
    warmup: int = 4,
    seed: int = 0,
    input_len: int = 128,
    output_len: int = 64,
    range_ratio: float = 0.5,
    dataset: str | None = None,
    max_concurrency: int | None = None,
    out: str | Path = "bench/results",
    stem: str = "serving",
    start: bool = False,
    start_bare: bool = False,
    port: int = 8100,
    kv_cache_gib: float = 0.25,
    max_model_len: int = 1024,
    progress: bool = True,
    notes: str | None = None,
) -> dict[str, Any]:
    """The whole bench; returns the result document (also written to `out`)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from tabp_vllm import flops
    from tabp_vllm.loadtest import loadgen, report
    from tabp_vllm.models import load_model_config
    from tabp_vllm.models import alias_of, resolve_model

    console = Console(stderr=True)
    say = (lambda m: console.print(f"[tabp-vllm bench] {m}")) if progress else (lambda m: None)
    if mode not in ("closed", "open"):
        raise TabpError(f"--mode {mode!r}: expected 'closed' or 'open'")
    level_list = _parse_levels(levels, mode)
    if duration <= 0 or rounds < 1:
        raise TabpError("--duration must be > 0 and --rounds >= 1")
    url = loadgen.normalize_url(url)
    model_path = resolve_model(model)
    alias = alias_of(model)
    config = load_model_config(model_path)
    shape = flops.DecoderShape.from_config(config)
    mask_map = _masks_by_variant(masks or [], alias, model_path)

    with ExitStack() as stack:
        if start:
            log_dir = Path(out) / "logs"
            variants, started_bare = _start_servers(
                stack, model_path, alias, mask_map, port, start_bare, log_dir, kv_cache_gib,
                max_model_len, say)
            bare_vllm = bare_vllm or started_bare
        # Fail fast, before any load: every server reachable, every variant served.
        if not variants:
            variants = loadgen.served_models(url)
        vlist = [loadgen.parse_variant(v, url) for v in variants]
        bare_variant = None
        if bare_vllm:
            if "@" in bare_vllm:
                name, _, burl = bare_vllm.partition("@")
            else:
                burl = bare_vllm
                names = loadgen.served_models(loadgen.normalize_url(burl))
                if len(names) != 1:
                    raise TabpError(f"--bare-vllm {burl}: serves {len(names)} models "
                                    f"({', '.join(names)}); name one as NAME@URL")
                name = names[0]
            bare_variant = loadgen.Target(name, loadgen.normalize_url(burl), label="bare-vllm")
            vlist.append(bare_variant)
        loadgen.check_variants(vlist)
        dense_name = dense or next((v.key for v in vlist if v.name == alias), vlist[0].key)
        if dense_name not in {v.key for v in vlist}:
            raise TabpError(f"--dense {dense_name!r} is not one of the variants "
                            f"({', '.join(v.key for v in vlist)})")

        plan = loadgen.BenchPlan(
            variants=vlist, mode=mode, levels=level_list, duration=duration, rounds=rounds,
            ramp=ramp, warmup_requests=warmup, seed=seed, input_len=input_len, output_len=output_len,
            range_ratio=range_ratio, dataset=dataset, vocab_size=shape.vocab_size,
            max_concurrency=max_concurrency)
        per_slice = duration / rounds
        total_s = (per_slice + ramp) * rounds * len(level_list) * len(vlist)
        say(f"{len(vlist)} variants x {len(level_list)} levels x {rounds} rounds of "
            f"{ramp:g} s ramp + {per_slice:.1f} s measured = {total_s:.0f} s of load (+ warm-up)")
        started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        t_start = time.time()
        counts = {"ok": 0, "err": 0}
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                      TimeRemainingColumn(), console=console, disable=not progress,
                      transient=False) as bar:
            task = bar.add_task("warm-up", total=total_s, info="")

            def on_start(v: str, level: float, rnd: int) -> None:
                bar.update(task, description=f"{v} @ {level:g} (round {rnd + 1}/{rounds})")

            def on_request(r) -> None:
                counts["ok" if r.ok else "err"] += 1
                bar.update(task, info=f"{counts['ok']} ok, {counts['err']} errors")

            def on_end(_s) -> None:
                bar.advance(task, per_slice + ramp)

            slices = asyncio.run(loadgen.run_plan(plan, on_start, on_request, on_end))

    metrics = report.aggregate(slices)
    done = [r for s in slices for r in s.completed]
    mean_prompt = (sum(r.prompt_tokens for r in done) / len(done)) if done else input_len
    mean_out = (sum(r.output_tokens for r in done) / len(done)) if done else output_len
    ideals: dict[str, Any] = {}
    variant_docs = []
    for v in vlist:
        mask = mask_map.get(v.key) or mask_map.get(v.name) if v is not bare_variant else None
        kept = mask.num_kept if mask else (shape.num_hidden_layers
                                           if v.key in (dense_name, "bare-vllm") else None)
        ideals[v.key] = (flops.ideal_speedup(shape, kept, mean_prompt, mean_out)
                         if kept is not None else None)
        variant_docs.append({"key": v.key, "name": v.name, "url": v.url, "kept_blocks": kept,
                             "removed_layers": mask.removed_layers if mask else
                             ([] if kept == shape.num_hidden_layers else None),
                             "ideal": ideals[v.key]})
    comparison = report.compare(metrics, dense_name, ideals,
                                "bare-vllm" if bare_variant else None, mode=mode)
    order = {v.key: i for i, v in enumerate(vlist)}
    result = {
        "model": alias, "model_path": model_path, "shape": flops.shape_summary(shape),
        "started_at": started_at, "wall_s": time.time() - t_start,
        "host": {"node": platform.node(), "cpu_count": os.cpu_count(),
                 "platform": platform.platform(), "python": sys.version.split()[0]},
        "git_commit": _git_commit(), "command": sys.argv, "notes": notes,
        "plan": {"mode": mode, "levels": level_list, "duration": duration, "rounds": rounds,
                 "ramp": ramp,
                 "warmup_requests": warmup, "seed": seed, "input_len": input_len,
                 "output_len": output_len, "range_ratio": range_ratio, "dataset": dataset,
                 "max_concurrency": max_concurrency, "started_servers": start},
        "dense_variant": dense_name, "variants": variant_docs,
        "measured_mean_prompt_tokens": mean_prompt, "measured_mean_output_tokens": mean_out,
        "metrics": sorted(metrics.values(), key=lambda m: (m["level"], order.get(m["variant"], 99))),
        "comparison": comparison,
    }
    paths = report.write_all(result, out, stem)
    if progress:
        print(report.markdown(result), flush=True)
        say("wrote " + ", ".join(str(p) for p in paths))
    return result


@user_errors
def bench(
    url: str = typer.Option(DEFAULT_URL, "--url", help="The OpenAI endpoint (tabp-vllm serve)."),
    variant: Optional[list[str]] = typer.Option(
        None, "--variant", "-v",
        help="Variant to measure, as the request's `model` (repeatable): NAME, or NAME@URL for a "
             "variant on another server. Default: every model the server lists."),
    model: str = typer.Option("llama", "--model", "-m",
                              help="Base model (alias/path): its config gives the FLOPs model."),
    mask: Optional[list[str]] = typer.Option(
        None, "--mask", help="[VARIANT=]mask.json (repeatable): the kept blocks of a variant, for "
                             "the ideal speedup; default variant name <model>-<task>."),
    dense: Optional[str] = typer.Option(None, "--dense", help="The dense variant (default: the "
                                                              "one named like --model)."),
    bare_vllm: Optional[str] = typer.Option(
        None, "--bare-vllm", help="[NAME@]URL of a bare `vllm serve` of the dense model: measured "
                                  "interleaved too, for the server-overhead ratio."),
    mode: str = typer.Option("closed", "--mode", help="closed (fixed concurrency) or open "
                                                      "(Poisson request rate)."),
    levels: str = typer.Option("1,4,16,64", "--levels",
                               help="Concurrencies (closed) or request rates (open), comma-separated."),
    duration: float = typer.Option(60.0, "--duration",
                                   help="Measured seconds per variant per level (all rounds)."),
    rounds: int = typer.Option(4, "--rounds", help="Interleaved slices per variant per level "
                                                   "(even: mirrored pairs cancel drift)."),
    ramp: float = typer.Option(5.0, "--ramp", help="Unmeasured seconds of load before each "
                                                   "slice (closed loop: staggered start)."),
    warmup: int = typer.Option(4, "--warmup", help="Warm-up requests per variant."),
    seed: int = typer.Option(0, "--seed"),
    input_len: int = typer.Option(128, "--input-len", help="Synthetic prompt tokens (mean)."),
    output_len: int = typer.Option(64, "--output-len", help="Output tokens (mean; EOS ignored)."),
    range_ratio: float = typer.Option(0.5, "--range-ratio",
                                      help="Lengths uniform in len*(1 +- ratio)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset",
                                           help="JSONL {prompt, max_tokens?} instead of synthetic."),
    max_concurrency: Optional[int] = typer.Option(None, "--max-concurrency",
                                                  help="Open loop: cap on requests in flight."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Output directory."),
    stem: str = typer.Option("serving", "--name", help="Output file stem."),
    start: bool = typer.Option(False, "--start", help="Start one api_server per variant (dense + "
                                                      "each --mask) instead of using --url."),
    start_bare: bool = typer.Option(False, "--start-bare", help="With --start: also a bare vLLM."),
    port: int = typer.Option(8100, "--port", help="With --start: first port."),
    kv_cache_gib: float = typer.Option(0.25, "--kv-cache-gib", help="With --start (CPU)."),
    notes: Optional[str] = typer.Option(None, "--notes", help="Free text stored in the JSON."),
) -> None:
    """Load-test variants through the OpenAI API: throughput, TTFT, ITL, E2E; pruned vs dense."""
    run_bench(url=url, variants=variant, model=model, masks=mask, dense=dense,
              bare_vllm=bare_vllm, mode=mode, levels=levels, duration=duration, rounds=rounds,
              ramp=ramp, warmup=warmup, seed=seed, input_len=input_len, output_len=output_len,
              range_ratio=range_ratio, dataset=str(dataset) if dataset else None,
              max_concurrency=max_concurrency, out=out, stem=stem, start=start,
              start_bare=start_bare, port=port, kv_cache_gib=kv_cache_gib, notes=notes)
