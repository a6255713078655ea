"""`tabp-vllm route fit`: the router sub-app (registered in cli.py)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from tabp_vllm.errors import user_errors
from tabp_vllm.options import options_command
from tabp_vllm.progress import progress_bars
from tabp_vllm.routing.options import RouteFitOptions

route_app = typer.Typer(no_args_is_help=True,
                        help="Input-guided pruning: fit a router (one mask per input cluster).")
console = Console(stderr=True)


@route_app.command("fit")
@user_errors
@options_command(RouteFitOptions)
def fit(o: RouteFitOptions) -> None:
    """Embed mixed calibration inputs, cluster them, learn one k-block mask per cluster, write
    the router file."""
    run_fit(o)


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
