"""`tabp-vllm route fit`: the router sub-app (registered in cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from tabp_vllm.commands_score import progress_bars
from tabp_vllm.errors import user_errors
from tabp_vllm.options import build_options
from tabp_vllm.routing.options import RouteFitOptions

route_app = typer.Typer(no_args_is_help=True,
                        help="Input-guided pruning: fit a router (one mask per input cluster).")
console = Console(stderr=True)


def _opt(name: str, *flags: str, help: str = "") -> typer.models.OptionInfo:
    """None when not given; the default shown is RouteFitOptions' (its one home)."""
    default = RouteFitOptions.default(name) if name != "task" else None
    shown = "none" if default is None else str(default)
    return typer.Option(None, *flags, help=f"{help} \\[default: {shown}]", show_default=False)


@route_app.command("fit")
@user_errors
def fit(
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="YAML file of these options; flags given win."),
    model: Optional[str] = _opt("model", help="Alias, HF id or path."),
    task: Optional[List[str]] = typer.Option(None, "--task", help="Calibration task (repeat to "
                                             "mix): arc_easy, piqa, boolq, gsm8k, ..."),
    split: Optional[str] = _opt("split"),
    samples: Optional[int] = _opt("samples", help="Inputs per task (seeded)."),
    encoder: Optional[str] = _opt("encoder", help="minilm, self, or a sentence-transformers dir."),
    clusters: Optional[int] = _opt("clusters", help="Input clusters N (k-means)."),
    kmeans_init: Optional[int] = _opt("kmeans_init", help="k-means restarts."),
    k: Optional[int] = _opt("k", "--k", help="Blocks each cluster's mask removes."),
    block_range: Optional[str] = _opt("block_range", "--range",
                                      help="Candidate blocks: whole, latter, 0.5:1.0 or 15:30."),
    mask_method: Optional[str] = _opt("mask_method", help="l0 (Hard-Concrete gates) or a "
                                      "registered scorer (tabp, block_influence, ...)."),
    max_variants: Optional[int] = _opt("max_variants", help="Merge clusters onto at most M masks."),
    steps: Optional[int] = _opt("steps", help="L0: gate updates per cluster."),
    batch_size: Optional[int] = _opt("batch_size", help="Inputs per forward pass."),
    max_length: Optional[int] = _opt("max_length", help="Tokens per input (left-truncated)."),
    kl_positions: Optional[int] = _opt("kl_positions", help="L0: last positions the KL covers."),
    lr: Optional[float] = _opt("lr", help="L0: Adam learning rate of log_alpha."),
    lambda_lr: Optional[float] = _opt("lambda_lr", help="L0: ascent rate of the lambdas."),
    init_log_alpha: Optional[float] = _opt("init_log_alpha", help="L0: initial log_alpha (open)."),
    warmup: Optional[float] = _opt("warmup", help="L0: share of steps the target rises over."),
    seed: Optional[int] = _opt("seed"),
    device: Optional[str] = _opt("device", help="auto|cpu|cuda."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Router file to write."),
) -> None:
    """Embed mixed calibration inputs, cluster them, learn one k-block mask per cluster, write
    the router file."""
    given = {name: value for name, value in locals().items() if name != "config"}
    given["task"] = given["task"] or None
    run_fit(build_options(RouteFitOptions, given, config))


def run_fit(o: RouteFitOptions) -> None:
    from tabp_vllm.routing.fit import fit_router

    with progress_bars(console) as progress:
        router = fit_router(o, progress=progress)
    router.save(o.output)
    table = Table("cluster", "inputs per task", "removed blocks", "KL to dense", "variant")
    for c, (m, sizes) in enumerate(zip(router.masks, router.sizes)):
        kl = router.provenance["clusters"][c].get("kl")
        table.add_row(str(c), ", ".join(f"{t} {v}" for t, v in sizes.items() if v),
                      str(m.removed_layers), "-" if kl is None else f"{kl:.4f}", m.content_hash())
    console.print(table)
    p = router.provenance
    console.print(f"wrote {o.output}: {router.num_clusters} clusters, {len(router.variants())} "
                  f"distinct masks, k = {router.k}, method {router.method}, {p['samples']} inputs, "
                  f"{p['forward_passes']} forward + {p['backward_passes']} backward passes, "
                  f"{p['wall_s']:.1f} s")
