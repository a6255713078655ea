"""`tabp-vllm masks`: inspect, validate, hand-make and cut task mask files (and router files)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from tabp_vllm.errors import TabpError, user_errors
from tabp_vllm.scoring.units import BUDGET_ORDER_HELP

FORCE_HELP = "Accept a mask keeping under half the blocks (mask.MIN_KEPT_FRACTION); still warns."

masks_app = typer.Typer(no_args_is_help=True, help="Inspect and validate task mask files.")
console = Console()


@masks_app.command("show")
@user_errors
def masks_show(
    file: Path,
    as_json: bool = typer.Option(False, "--json", help="Print the validated mask as JSON."),
) -> None:
    """Print a mask as a table: blocks, the removed ones marked, their scores."""
    from tabp_vllm.mask import load_mask, public_name

    from tabp_vllm.routing.router import is_router_file, show_router

    if is_router_file(file):  # a router file: its clusters' masks
        return show_router(file, as_json, console)
    mask = load_mask(file)
    if as_json:
        print(json.dumps(mask.to_json(), indent=2))
        return
    removed = set(mask.removed_layers)
    cal = mask.calibration
    console.print(
        f"[bold]{file}[/]  task=[cyan]{mask.task}[/]  model={public_name(mask.model_id)}  "
        f"method={mask.method}  kept {mask.num_kept}/{mask.num_hidden_layers}  "
        f"hash={mask.content_hash()}"
    )
    if mask.is_sublayer:
        console.print(_sublayer_text(mask))
    if cal:
        console.print("calibration: " + ", ".join(f"{k}={v}" for k, v in cal.items()))
    if mask.params:
        console.print("params: " + ", ".join(f"{k}={_param_text(v)}" for k, v in mask.params.items()))
    n = mask.num_hidden_layers
    per_unit = bool(mask.scores) and len(mask.scores) == 2 * n  # unit 2*i attention, 2*i+1 MLP
    table = Table("block", "status", *(("attention score", "MLP score") if per_unit else ("score",)))
    attention, mlp = set(mask.removed_attention), set(mask.removed_mlp)
    for i in range(n):
        status = ("[red]removed[/]" if i in removed else "[red]attention removed[/]"
                  if i in attention else "[red]MLP removed[/]" if i in mlp else "kept")
        scores = (mask.scores[2 * i:2 * i + 2] if per_unit
                  else [mask.scores[i] if mask.scores else None])
        table.add_row(str(i), status, *("-" if s is None else f"{s:.6g}" for s in scores))
    console.print(table)


def _param_text(value) -> str:
    # Per-unit lists (a sublayer mask's 2L unit FLOPs shares) would bury the other params: their
    # length here, the values in `--json`.
    if isinstance(value, list) and len(value) > 8:
        return f"[{len(value)} values, see --json]"
    return str(value)


@masks_app.command("validate")
@user_errors
def masks_validate(
    files: list[Path],
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Also check the masks fit this model."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Validate mask files (and that they fit --model); exit 2 on the first bad one."""
    from tabp_vllm.mask import check_depth, load_mask
    from tabp_vllm.models import resolve_model

    resolved = resolve_model(model) if model else None
    from tabp_vllm.routing.router import is_router_file, validate_router_file

    for file in files:
        if is_router_file(file):  # a router file: every check, its encoder loaded
            print(validate_router_file(file, resolved))
            continue
        mask = load_mask(file, resolved, model_name=model)
        _warn(check_depth(mask, str(file), force))
        print(f"ok: {file} (task {mask.task}, removes {len(mask.removed_layers)} of "
              f"{mask.num_hidden_layers} blocks: {mask.removed_layers}"
              + (f"; {_sublayer_text(mask)}" if mask.is_sublayer else "") + ")")


@masks_app.command("make")
@user_errors
def masks_make(
    output: Path,
    remove: str = typer.Option("", "--remove", help="Blocks to remove, e.g. '3,10-12,29'."),
    remove_attention: str = typer.Option(
        "", "--remove-attention", help="Blocks whose attention sublayer alone is removed, e.g. "
                                       "'15-22'."),
    remove_mlp: str = typer.Option(
        "", "--remove-mlp", help="Blocks whose MLP sublayer alone is removed, e.g. '20,24'."),
    task: str = typer.Option(..., "--task"),
    model: str = typer.Option("llama", "--model", "-m"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Write a hand-made mask (for experiments and tests; `score` makes real ones)."""
    from tabp_vllm.mask import check_depth, make_mask
    from tabp_vllm.models import resolve_model

    mask = make_mask(resolve_model(model), _block_ranges(remove, "--remove"), task=task,
                     model_id=model, removed_attention=_block_ranges(remove_attention,
                                                                     "--remove-attention"),
                     removed_mlp=_block_ranges(remove_mlp, "--remove-mlp"))
    _warn(check_depth(mask, str(output), force))
    mask.save(output)
    print(f"wrote {output}: removes {mask.removed_layers}"
          + (f"; {_sublayer_text(mask)}" if mask.is_sublayer else ""))


def _block_ranges(text: str, flag: str) -> list[int]:
    """'3,10-12,29' -> [3, 10, 11, 12, 29]."""
    layers: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            lo, _, hi = part.partition("-")
            layers.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise TabpError(f"{flag}: {part!r} is not a block index or range") from None
    return layers


def _sublayer_text(mask) -> str:
    return (f"attention removed in blocks {mask.removed_attention}, MLP removed in blocks "
            f"{mask.removed_mlp} (attention kept {mask.num_attention_kept}/"
            f"{mask.num_hidden_layers}, MLP kept {mask.num_mlp_kept}/{mask.num_hidden_layers})")


@masks_app.command("cut")
@user_errors
def masks_cut(
    file: Path,
    output: Path = typer.Option(..., "-o", "--output", help="The mask to write."),
    k: Optional[int] = typer.Option(None, "--k", help="Blocks (sublayer units) to remove (at "
                                                      "most the scored k)."),
    flops_ratio: Optional[float] = typer.Option(
        None, "--flops-ratio", help="Instead of --k: the lowest-scored units until their share of "
                                    "the ideal FLOPs reaches this (at most the scored budget)."),
    budget_order: str = typer.Option("score", "--budget-order", help=BUDGET_ORDER_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Write the mask a smaller budget gives, from a scored mask's own scores (no new scoring
    run; for the methods that rank every k: every one but block-granularity angular, which
    compares blocks k apart). Sublayer masks cut the same way, over their 2L unit scores."""
    from tabp_vllm.mask import check_depth, load_mask
    from tabp_vllm.scoring import mask_cut

    mask = mask_cut(load_mask(file), k, flops_ratio, where=str(file), order=budget_order)
    _warn(check_depth(mask, str(output), force))
    mask.save(output)
    print(f"wrote {output}: removes {mask.removed_layers}"
          + (f", attention of {mask.removed_attention}, MLP of {mask.removed_mlp}"
             if mask.removed_attention or mask.removed_mlp else ""))


def _warn(text: Optional[str]) -> None:
    if text:
        print(f"warning: {text}", file=sys.stderr)
