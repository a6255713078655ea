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
from typing import Any

from tabp_vllm.errors import TabpError, user_errors
from tabp_vllm.loadtest.options import BenchOptions
from tabp_vllm.progress import timed_bar
from tabp_vllm.options import build_options, options_command


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
                   port: int, with_bare: bool, log_dir: Path, kv_cache_gib: float | None,
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


def run_bench(options: BenchOptions | None = None, /, *, progress: bool = True,
              **fields: Any) -> dict[str, Any]:
    """The whole bench; returns the result document (also written to `options.out`).

    Takes a `BenchOptions`, or its fields as keyword arguments (`run_bench(url=..., levels="1,4")`),
    or both (the fields override); whatever is not given takes the `BenchOptions` default.
    """
    from rich.console import Console

    from tabp_vllm import flops
    from tabp_vllm.hardware import cpu_info
    from tabp_vllm.loadtest import loadgen, report
    from tabp_vllm.models import load_model_config
    from tabp_vllm.models import alias_of, resolve_model

    o = build_options(BenchOptions, fields,
                      file_doc=options.model_dump(exclude_unset=True) if options else None)
    console = Console(stderr=True)
    say = (lambda m: console.print(f"[tabp-vllm bench] {m}")) if progress else (lambda m: None)
    url = loadgen.normalize_url(o.url)
    model_path = resolve_model(o.model)
    alias = alias_of(o.model)
    config = load_model_config(model_path)
    shape = flops.DecoderShape.from_config(config)
    mask_map = _masks_by_variant(o.masks, alias, model_path)
    variants, bare_vllm = o.variants, o.bare_vllm

    with ExitStack() as stack:
        if o.start:
            log_dir = Path(o.out) / "logs"
            variants, started_bare = _start_servers(
                stack, model_path, alias, mask_map, o.port, o.start_bare, log_dir, o.kv_cache_gib,
                o.max_model_len, say)
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
        dense_name = o.dense or next((v.key for v in vlist if v.name == alias), vlist[0].key)
        if dense_name not in {v.key for v in vlist}:
            raise TabpError(f"--dense {dense_name!r} is not one of the variants "
                            f"({', '.join(v.key for v in vlist)})")

        plan = loadgen.BenchPlan.from_options(o, vlist, shape.vocab_size)
        rounds, ramp = o.rounds, o.ramp
        per_slice = o.duration / rounds
        total_s = (per_slice + ramp) * rounds * len(o.levels) * len(vlist)
        say(f"{len(vlist)} variants x {len(o.levels)} levels x {rounds} rounds of "
            f"{ramp:g} s ramp + {per_slice:.1f} s measured = {total_s:.0f} s of load (+ warm-up)")
        started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        t_start = time.time()
        counts = {"ok": 0, "err": 0}
        with timed_bar(console, disable=not progress) as bar:
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
    mean_prompt = (sum(r.prompt_tokens for r in done) / len(done)) if done else o.input_len
    mean_out = (sum(r.output_tokens for r in done) / len(done)) if done else o.output_len
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
                                "bare-vllm" if bare_variant else None, mode=o.mode)
    order = {v.key: i for i, v in enumerate(vlist)}
    result = {
        "model": alias, "model_path": model_path, "shape": flops.shape_summary(shape),
        "started_at": started_at, "wall_s": time.time() - t_start,
        "host": {"node": platform.node(), "cpu_count": os.cpu_count(),
                 "platform": platform.platform(), "python": sys.version.split()[0],
                 "cpu": cpu_info()},  # model + bf16/AVX flags: they decide the dtype and speed
        "git_commit": _git_commit(), "command": sys.argv, "notes": o.notes,
        "plan": {"mode": o.mode, "levels": list(o.levels), "duration": o.duration,
                 "rounds": o.rounds, "ramp": o.ramp, "warmup_requests": o.warmup, "seed": o.seed,
                 "input_len": o.input_len, "output_len": o.output_len,
                 "range_ratio": o.range_ratio, "dataset": o.dataset,
                 "max_concurrency": o.max_concurrency, "started_servers": o.start},
        "options": o.model_dump(mode="json"),
        "dense_variant": dense_name, "variants": variant_docs,
        "measured_mean_prompt_tokens": mean_prompt, "measured_mean_output_tokens": mean_out,
        "metrics": sorted(metrics.values(), key=lambda m: (m["level"], order.get(m["variant"], 99))),
        "comparison": comparison,
    }
    paths = report.write_all(result, o.out, o.stem)
    if progress:
        print(report.markdown(result), flush=True)
        say("wrote " + ", ".join(str(p) for p in paths))
    return result


@user_errors
@options_command(BenchOptions, config_help=(
    "YAML file of bench options (keys as the options below, with '_' for '-'; --name is 'stem'); "
    "flags given win."))
def bench(o: BenchOptions) -> None:
    """Load-test variants through the OpenAI API: throughput, TTFT, ITL, E2E; pruned vs dense."""
    run_bench(o)
