"""`tabp-vllm eval`: zero-shot accuracy of dense, pruned and routed variants through lm-eval."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from tabp_vllm.errors import TabpError, user_errors
from tabp_vllm.evaluation.options import EvalOptions
from tabp_vllm.options import options_command

console = Console(stderr=True)


@user_errors
@options_command(EvalOptions)
def eval(o: EvalOptions) -> None:  # noqa: A001 - the command is called eval
    """Zero-shot accuracy of dense and pruned variants through lm-evaluation-harness."""
    run_eval(o)


def _include(o: EvalOptions, tmp: str, tasks: list[str]) -> list[str]:
    """The task folders lm-eval reads besides ours: the user's (--include-path), the --data one."""
    from tabp_vllm.evaluation.evaluate import jsonl_task_folder

    include = []
    if o.include_path is not None:
        if not o.include_path.is_dir():
            raise TabpError(f"--include-path {o.include_path}: not a folder")
        include.append(str(o.include_path.resolve()))
    if o.data is not None:
        include.append(jsonl_task_folder(tasks[0], o.data, tmp))
    return include


def run_eval(o: EvalOptions) -> None:
    import tempfile

    from tabp_vllm.evaluation.evaluate import check_tasks, evaluate_variant
    from tabp_vllm.mask import load_mask
    from tabp_vllm.models import load_model_config, model_fingerprint, resolve_model

    tasks = [t.strip() for t in o.task.split(",") if t.strip()]
    if not tasks:
        raise TabpError("--task: no task named")
    if o.data is not None and len(tasks) != 1:
        raise TabpError("--data names one task: give one --task name for it")
    path = resolve_model(o.model)
    for m in o.task_mask:  # validate every mask before any engine starts
        load_mask(m, path)
    router = encoder = None
    if o.router is not None:  # the router and its encoder too
        from tabp_vllm.routing.router import load_router, open_encoder

        # open_encoder loads it once and checks its dimension (load_router's check would load it
        # a second time)
        router = load_router(o.router, path)
        encoder = open_encoder(router, str(o.router), model_path=path)
    variants: list[tuple[str, Optional[str]]] = [("dense", None)] if o.dense else []
    variants += [(m.stem, str(m)) for m in o.task_mask]
    if not variants and router is None:
        raise TabpError("nothing to evaluate: --no-dense and no --task-mask or --router")
    routed = None
    with tempfile.TemporaryDirectory(prefix="tabp-tasks-") as tmp:
        include = _include(o, tmp, tasks)
        sizes = check_tasks(tasks, include)  # every task and its data, before any engine
        rows = []
        for name, mpath in variants:
            n = {t: min(s, o.limit) if o.limit else s for t, s in sizes.items()}
            console.print(f"evaluating {name} on {', '.join(f'{t} ({n[t]})' for t in tasks)} ...")
            r = evaluate_variant(path, tasks, mpath, limit=o.limit, kv_cache_gib=o.kv_cache_gib,
                                 include=include)
            r.update(variant=name, mask=mpath)
            rows.append(r)
        if router is not None:
            from functools import partial

            from tabp_vllm.routing.evaluate import evaluate_routed

            routed = evaluate_routed(
                path, router, encoder, tasks, include=include, limit=o.limit, workdir=Path(tmp),
                run_variant=partial(evaluate_variant, kv_cache_gib=o.kv_cache_gib, include=include),
                say=console.print)
            routed.update(variant="routed", router_file=str(o.router))
    total = model_fingerprint(load_model_config(path))["num_hidden_layers"]
    table = Table("variant", "blocks kept", "task", "metric", "value", "stderr", "n",
                  title="lm-eval, zero-shot")
    for r in rows:
        kept = r["blocks_kept"] if r["blocks_kept"] is not None else total
        for t in tasks:
            m = r["results"][t]
            for key, value in m.items():
                metric, _, flt = key.partition(",")
                if metric in ("alias",) or metric.endswith("_stderr") or not flt:
                    continue
                err = m.get(f"{metric}_stderr,{flt}")
                table.add_row(r["variant"], f"{kept}/{total}", t, metric, f"{value:.4f}",
                              f"{err:.4f}" if isinstance(err, float) else "-",
                              str(r["n-samples"][t]["effective"]))
    if routed is not None:
        # a sublayer router's k counts attention/MLP units, and its masks keep different blocks;
        # under a FLOPs budget the masks remove different numbers of units: the budget says it
        kept = (f"-{router.flops_ratio:g} FLOPs" if router.flops_ratio is not None
                else f"{2 * total - router.k}/{2 * total} sublayers" if router.units == "sublayers"
                else f"{total - router.k}/{total}")
        for t in tasks:
            for metric, m in routed["results"][t].items():
                table.add_row(f"routed ({router.num_clusters} clusters)", kept,
                              t, metric, f"{m['value']:.4f}", f"{m['stderr']:.4f}", str(m["n"]))
    Console(width=None if sys.stdout.isatty() else 150).print(table)  # a log: no wrapped cells
    if routed is not None:
        for t in tasks:
            mix = ", ".join(f"cluster {c}: {n}" for c, n in routed["cluster_mix"][t].items())
            console.print(f"{t}: documents per cluster: {mix}")
    if o.output:
        o.output.parent.mkdir(parents=True, exist_ok=True)
        o.output.write_text(json.dumps({"model": o.model, "tasks": tasks, "limit": o.limit,
                                        "data": str(o.data) if o.data else None,
                                        "include_path": str(o.include_path) if o.include_path else None,
                                        "results": rows, "routed": routed}, indent=2) + "\n")
        console.print(f"wrote {o.output}")
