"""`tabp-vllm score` and `tabp-vllm eval` (wired into tabp_vllm/cli.py as commands)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tabp_vllm.errors import user_errors
from tabp_vllm.errors import TabpError

console = Console(stderr=True)


@user_errors
def score(
    model: str = typer.Option("llama", help="Alias, HF id or path."),
    task: str = typer.Option(..., help="Task name: a known data set (arc_easy, arc_challenge, "
                                       "boolq, piqa, gsm8k, wikitext2, demo) or the name for --data."),
    data: Optional[Path] = typer.Option(None, help="A JSONL file (MCQA or free-text schema)."),
    split: str = typer.Option("train", help="Split of a known data set."),
    method: str = typer.Option("tabp", help="tabp|block_influence|angular|sleb|ppl|random|last_k"),
    statistic: str = typer.Option("entropy", help="entropy|top1|gold|gap|kl|js|ce"),
    aggregate: str = typer.Option("ssn", help="ssn|ddf"),
    p: float = typer.Option(1.0, "--p", help="SSN norm order."),
    k: Optional[int] = typer.Option(None, "--k", help="Blocks to remove."),
    ratio: Optional[float] = typer.Option(None, help="Share of blocks to remove (instead of --k)."),
    block_range: Optional[str] = typer.Option(None, "--range",
                                              help="Candidate blocks: fractions 0.5:1.0 or indices 15:30."),
    mode: str = typer.Option("auto", help="auto|mcqa|text"),
    no_norm: bool = typer.Option(False, "--no-norm", help="Probe without the final norm."),
    samples: Optional[int] = typer.Option(256, help="Calibration samples (seeded subset)."),
    batch_size: int = typer.Option(16, help="Samples per forward pass."),
    max_length: int = typer.Option(256, help="Truncate samples to this many tokens."),
    text_positions: int = typer.Option(
        32, help="Text mode: positions per sample read out with the full vocabulary (0 = all)."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto|cpu|cuda"),
    output: Path = typer.Option(..., "-o", "--output", help="Mask file to write."),
) -> None:
    """Score blocks on a task's calibration data and write a task mask."""
    from tabp_vllm.data import load_task
    from tabp_vllm.models import alias_of, resolve_model
    from tabp_vllm.scoring import run_scoring, score_to_mask

    if k is None and ratio is None:
        k = 4
    ds = load_task(task, split, data)
    if samples is not None and samples <= 0:
        raise TabpError(f"--samples {samples}: must be positive")
    ds = ds.subset(samples, seed)
    path = resolve_model(model)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as prog:
        def progress(desc: str, total: int):
            tid = prog.add_task(desc, total=total)
            return lambda n=1: prog.advance(tid, n)

        res = run_scoring(path, ds, method, k=k, ratio=ratio, block_range=block_range, mode=mode,
                          statistic=statistic, aggregate=aggregate, p=p, norm=not no_norm,
                          batch_size=batch_size, max_length=max_length,
                          text_positions=text_positions, seed=seed, device=device,
                          progress=progress)
    mask = score_to_mask(path, res, task=task, model_id=alias_of(model))
    mask.save(output)
    console.print(f"wrote {output}: method={res.method} removed {res.removed} "
                  f"({mask.num_kept}/{mask.num_hidden_layers} kept), {len(ds)} samples, "
                  f"{res.forward_passes} forward passes, {res.wall_s:.1f} s")


@user_errors
def eval(  # noqa: A001 - the command is called eval
    model: str = typer.Option("llama", help="Alias, HF id or path."),
    task: str = typer.Option(..., help="A known MCQA data set, or the name for --data."),
    data: Optional[Path] = typer.Option(None, help="A JSONL file in the MCQA schema."),
    split: str = typer.Option("validation"),
    task_mask: List[Path] = typer.Option([], "--task-mask", help="Mask file (repeatable)."),
    no_dense: bool = typer.Option(False, "--no-dense", help="Skip the dense model."),
    limit: Optional[int] = typer.Option(None, help="Evaluate the first N items."),
    kv_cache_gib: float = typer.Option(0.25, help="CPU KV cache per engine."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Results JSON."),
) -> None:
    """Zero-shot MCQA accuracy (acc, acc_norm) of dense and pruned variants on the vLLM engine."""
    from tabp_vllm.data import load_task
    from tabp_vllm.evaluate import evaluate_variant
    from tabp_vllm.mask import load_mask
    from tabp_vllm.models import resolve_model

    ds = load_task(task, split, data)
    if ds.kind != "mcqa":
        raise TabpError(f"{ds.source}: eval needs MCQA data (question, choices, gold)")
    ds = ds.first(limit)
    path = resolve_model(model)
    for m in task_mask:  # validate every mask before any engine starts
        load_mask(m, path)
    variants: list[tuple[str, Optional[str]]] = [] if no_dense else [("dense", None)]
    variants += [(m.stem, str(m)) for m in task_mask]
    if not variants:
        raise TabpError("nothing to evaluate: --no-dense and no --task-mask")
    rows = []
    for name, mpath in variants:
        console.print(f"evaluating {name} on {ds.name}/{ds.split} ({len(ds)} items) ...")
        r = evaluate_variant(path, ds.items, mpath, kv_cache_gib=kv_cache_gib)
        r.update(variant=name, mask=mpath)
        rows.append(r)
    table = Table("variant", "blocks kept", "acc", "acc_norm", "n", title=f"{ds.name} / {ds.split}")
    from tabp_vllm.models import load_model_config, model_fingerprint
    total = model_fingerprint(load_model_config(path))["num_hidden_layers"]
    for r in rows:
        kept = r["blocks_kept"] if r["blocks_kept"] is not None else total
        table.add_row(r["variant"], f"{kept}/{total}", f"{r['acc']:.3f}", f"{r['acc_norm']:.3f}",
                      str(r["n"]))
    Console().print(table)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"model": model, "task": ds.name, "split": ds.split,
                                      "data_sha256": ds.content_hash(), "results": rows},
                                     indent=2) + "\n")
        console.print(f"wrote {output}")
