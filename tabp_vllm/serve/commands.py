"""`tabp-vllm serve`: validate everything, start Ray + Serve, print the variants, wait for Ctrl-C."""

from __future__ import annotations

import json
import signal
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
    from tabp_vllm.serve.console import ServeConsole, default_log_file, print_table
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
    log_file = Path(o.log_file) if o.log_file else default_log_file(spec.port)
    if not o.verbose:
        print(f"logs:      Ray's and vLLM's records go to {log_file} (--verbose: here)", flush=True)
    # Ctrl-C and SIGTERM (docker stop, CI) take the same clean path. Ray's driver installs its own
    # SIGTERM handler in ray.init, so ours are (re)installed after start(); SIGINT is set first
    # because a shell's background job starts with it ignored.
    stopping: list[int] = []

    def _request_stop(signum, _frame):
        stopping.append(signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    with ServeConsole(log_file, verbose=o.verbose) as console:
        try:
            start(spec, log=console.say)
            signal.signal(signal.SIGINT, _request_stop)
            signal.signal(signal.SIGTERM, _request_stop)
            print_table(spec, console.out)
            # the waiters (serve/launcher.py, the demo, the tests) match the line's start
            console.say(f"READY http://{spec.host}:{spec.port}")
            while not stopping:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            console.warn("shutting down ...")
            stop(joined=bool(spec.address))
            console.warn("stopped")
