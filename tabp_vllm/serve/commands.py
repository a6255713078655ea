"""`tabp-vllm serve`: validate everything, start Ray + Serve, print the variants, wait for Ctrl-C."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

import typer

from tabp_vllm.errors import TabpError, user_errors
from tabp_vllm.options import options_command
from tabp_vllm.serve.options import ServeOptions


def _parse_extra(items: list[str]) -> dict:
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TabpError(f"--engine-arg: expected KEY=VALUE, got {item!r}")
        try:
            extra[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            extra[key.replace("-", "_")] = value
    return extra


def serve_options(config: Optional[Path] = None, task_mask: Optional[List[Path]] = None,
                  task: Optional[List[str]] = None, engine_arg: Optional[List[str]] = None,
                  **given: Any):
    """`ServeOptions` from the CLI's values, by flag name (None: not given; `engine` and
    `request_path` flags too, flattened as on the command line) and a YAML config file."""
    from tabp_vllm.options import cli_flags, cli_values
    from tabp_vllm.serve.options import ServeOptions

    flags = cli_flags(ServeOptions)
    unknown = sorted(set(given) - {f.name for f in flags})
    if unknown:
        raise TypeError(f"serve_options: no serve option named {unknown}")
    return _merged_options(cli_values(flags, given), config, task_mask=task_mask, task=task,
                           engine_arg=engine_arg)


def _merged_options(cli: dict[str, Any], config: Optional[Path], *,
                    task_mask: Optional[List[Path]], task: Optional[List[str]],
                    engine_arg: Optional[List[str]]):
    """CLI flag > file > default, key by key (also inside `engine`); `--task-mask` variants are
    appended to the file's. Each source is validated on its own first, so a bad value is
    reported against the file or the command line it came from."""
    from tabp_vllm.options import build_options
    from tabp_vllm.serve.options import ServeOptions, load_yaml_spec, merge_options

    masks = [str(p) for p in task_mask or []]
    tasks = list(task or [])
    if len(tasks) > len(masks):
        raise TabpError(f"{len(tasks)} --task given for {len(masks)} --task-mask")
    if engine_arg:
        cli.setdefault("engine", {})["extra"] = _parse_extra(engine_arg)
    if masks:
        cli["variants"] = [{"mask": m, "task": tasks[i] if i < len(tasks) else None}
                           for i, m in enumerate(masks)]
    from_cli = build_options(ServeOptions, cli)
    if config is None:
        return from_cli
    from_file = build_options(ServeOptions, file=config, file_doc=load_yaml_spec(config))
    return merge_options(from_file, from_cli)


def build_spec(**cli):
    """A validated `ServeSpec` from CLI options, a YAML config file, or both (`serve_options`)."""
    from tabp_vllm.serve.spec import ServeSpec

    return ServeSpec.from_options(serve_options(**cli))


def print_table(spec) -> None:
    from rich.console import Console
    from rich.table import Table

    from tabp_vllm.hardware import on_gpu
    from tabp_vllm.memory import GiB

    base = f"http://{spec.host}:{spec.port}"
    gpu = on_gpu()
    memory = {} if gpu else spec.cpu_memory_estimate()[1]
    weights = {n.name: n.weight_bytes * n.replicas for n in spec.engine_needs(gpu=gpu)}
    table = Table("variant", "task", "blocks kept", "speedup*", "mask hash", "replicas", "weights",
                  *(["memory**"] if memory else []),
                  title=f"tabp-vllm serve: {spec.model_alias} ({spec.model})")
    for v in spec.variants:
        table.add_row(v.name, v.task or "(dense)", f"{v.blocks_kept}/{v.blocks_total}",
                      f"{v.theoretical_speedup:.3f}", v.mask_hash or "-", str(v.replicas),
                      f"{weights[v.name] / GiB:.2f} GiB",
                      *([f"{memory[v.name] / GiB:.2f} GiB"] if memory else []))
    total = spec.cpu_memory_estimate()[0] if memory else None
    table.add_section()
    table.add_row("total", "", "", "", "", str(sum(v.replicas for v in spec.variants)),
                  f"{sum(weights.values()) / GiB:.2f} GiB",
                  *([f"{total / GiB:.2f} GiB"] if memory else []))
    console = Console(width=None if sys.stdout.isatty() else 150)  # a log file: no wrapped cells
    console.print(table)
    if spec.routed:
        r = spec.routed
        routes = ", ".join(f"cluster {c} -> {name}" for c, name in enumerate(r.cluster_variants))
        print(f"routed:    {r.name} ({len(r.cluster_variants)} clusters, encoder {r.encoder}): {routes}")
    print(f"endpoints: {base}/v1/models  {base}/v1/completions  {base}/v1/chat/completions"
                  + ("  (Bearer API key required)" if spec.api_key else ""))
    metrics = (f"http://127.0.0.1:{spec.metrics_port}/metrics" if not spec.address
               else "the Ray cluster's metrics export port(s)")
    print(f"metrics:   {metrics}")
    console.print("* ideal speedup: dense / variant FLOPs per decode step. Ctrl-C to stop.")
    if memory:
        console.print("** host memory per variant: weights + KV cache + the measured engine and "
                      "Ray overhead (bench/memory.py serve); the total adds Ray's own processes")
    sys.stdout.flush()


@user_errors
@options_command(ServeOptions, config_help=(
    "YAML file with many variants (examples/serve.yaml); flags given win over its keys, "
    "--task-mask variants are appended."),
    build=_merged_options, build_args=("task_mask", "task", "engine_arg"))
def serve(
    o: ServeOptions,
    task_mask: Optional[List[Path]] = typer.Option(None, "--task-mask",
                                                   help="A mask file; one pruned variant each."),
    task: Optional[List[str]] = typer.Option(None, "--task", help=(
        "Override the task name (variant <alias>-<task>) of the --task-mask at the same position.")),
    engine_arg: Optional[List[str]] = typer.Option(None, "--engine-arg",
                                                   help="Any other vLLM engine arg, KEY=VALUE."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Validate and print the variants; start nothing."),
) -> None:
    """Serve the dense model and one pruned variant per mask behind one OpenAI endpoint."""
    run_serve(o, dry_run=dry_run)


def run_serve(o: ServeOptions, dry_run: bool = False) -> None:
    from tabp_vllm.hardware import choose_dtype, on_gpu
    from tabp_vllm.serve.deploy import check_reachable, start, stop
    from tabp_vllm.serve.spec import ServeSpec, check_memory

    spec = ServeSpec.from_options(o)
    print("dtype: %s (%s)" % choose_dtype(spec.engine.dtype), flush=True)
    if spec.address:
        check_reachable(spec.address)
    elif spec.memory_check and not on_gpu():
        check_memory(spec)
    if dry_run:
        print_table(spec)
        return
    # Ctrl-C and SIGTERM (docker stop, CI) take the same clean path. Ray's driver installs its own
    # SIGTERM handler in ray.init, so ours are (re)installed after start(); SIGINT is set first
    # because a shell's background job starts with it ignored.
    stopping: list[int] = []

    def _request_stop(signum, _frame):
        stopping.append(signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        start(spec)
        signal.signal(signal.SIGINT, _request_stop)
        signal.signal(signal.SIGTERM, _request_stop)
        print_table(spec)
        print("READY", flush=True)
        while not stopping:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("shutting down ...", file=sys.stderr, flush=True)
        stop(joined=bool(spec.address))
        print("stopped", file=sys.stderr, flush=True)
