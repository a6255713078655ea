"""`tabp-vllm route fit`, `route radius` and `route polish`: the router sub-app (registered in cli.py)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from tabp_vllm.errors import user_errors
from tabp_vllm.options import options_command
from tabp_vllm.progress import progress_bars
from tabp_vllm.routing.options import RouteFitOptions
from tabp_vllm.routing.swap import MAX_SWAPS

route_app = typer.Typer(no_args_is_help=True,
                        help="Input-guided pruning: fit a router (one mask per input cluster).")
console = Console(stderr=True)


@route_app.command("fit")
@user_errors
@options_command(RouteFitOptions)
def fit(o: RouteFitOptions) -> None:
    """Embed mixed calibration inputs, cluster them, learn one mask per cluster (k units or a
    FLOPs share), write the router file."""
    run_fit(o)


@route_app.command("radius")
@user_errors
def radius(
    router_file: Path = typer.Argument(..., metavar="ROUTER", help="A router file of `route fit`."),
    quantile: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Quantile of the "
                                             "held-out distances (default: the router's own)."),
) -> None:
    """Renew a router's fallback radius as `route fit` now sets it, held out (each calibration
    input against its cluster's mean without it), and write the router back. For routers fitted
    before: their in-sample radius sends too many unseen inputs to the fallback."""
    from tabp_vllm.routing.fit import renew_radius
    from tabp_vllm.routing.router import load_router

    router = load_router(router_file)
    fallback, past = renew_radius(router, quantile=quantile, where=str(router_file))
    was = router.fallback  # (renew_radius refuses a router without one)
    dataclasses.replace(router, fallback=fallback).save(router_file)
    console.print(f"wrote {router_file}: fallback radius {was.radius:.4f} ({was.radius_kind}, q "
                  f"{was.quantile:g}) -> {fallback.radius:.4f} (held-out, "
                  f"q {fallback.quantile:g}); past it: {past:.1%} of the calibration inputs themselves "
                  f"(nearer the centroids they helped place)")


@route_app.command("polish")
@user_errors
def polish(
    router_file: Path = typer.Argument(..., metavar="ROUTER", help="A router file of `route fit` "
                                       "(L0 masks, not polished yet)."),
    output: Path = typer.Option(..., "-o", "--output", help="Router file to write."),
    max_swaps: int = typer.Option(MAX_SWAPS, min=1, help="Most swaps per mask."),
) -> None:
    """Polish a fitted router's L0 masks as `route fit --polish swap` does, without fitting the
    gates again: single swaps of a removed and a kept unit while that lowers the fit's own loss on
    each cluster's calibration inputs."""
    from tabp_vllm.routing.polish import polish_router
    from tabp_vllm.routing.router import load_router, polish_summary, removed_text

    router = load_router(router_file)
    with progress_bars(console) as progress:
        polished = polish_router(router, max_swaps, progress=progress, where=str(router_file))
    polished.save(output)
    p = polished.provenance
    table = Table("cluster", "gates' mask", "polished", "search")
    rows = list(zip(map(str, range(router.num_clusters)), p["clusters"], router.masks,
                    polished.masks))
    if p.get("fallback") and "polish" in p["fallback"]:  # (a fallback fitted apart, polished)
        rows.append(("fallback", p["fallback"], router.fallback.mask, polished.fallback.mask))
    for name, rec, was, now in rows:
        table.add_row(name, removed_text(was), removed_text(now),
                      polish_summary(rec["polish"]).removeprefix("; ")
                      + ("" if rec["polish"]["fit_members"] else
                         " [yellow](members differ from the fit's)[/]"))
    console.print(table)
    console.print(f"wrote {output}: {p['polish']['forward_passes']} forward passes, "
                  f"{p['polish']['wall_s']:.1f} s")


def run_fit(o: RouteFitOptions) -> None:
    from tabp_vllm.routing.curves import save_curves
    from tabp_vllm.routing.fit import fit_router, partial_dir
    from tabp_vllm.routing.router import fit_summary, removed_text

    with progress_bars(console) as progress:
        router = fit_router(o, progress=progress, checkpoints=partial_dir(o.output))
    router.save(o.output)
    shutil.rmtree(partial_dir(o.output), ignore_errors=True)  # the fits' saved state: done with
    p = router.provenance
    written = save_curves(router.curves, o.output, p["clusters"] + [p.get("fallback")])
    table = Table("cluster", "inputs per task", "removed", "KL to dense", "fit", "variant")
    rows = [(str(c), ", ".join(f"{t} {v}" for t, v in sizes.items() if v), m, p["clusters"][c])
            for c, (m, sizes) in enumerate(zip(router.masks, router.sizes))]
    if router.fallback is not None:
        fb = router.fallback
        rows.append((f"fallback (> {fb.radius:.3f})", fb.source, fb.mask, p.get("fallback") or {}))
    for name, sizes, m, rec in rows:
        kl = rec.get("kl")
        table.add_row(name, sizes, removed_text(m), "-" if kl is None else f"{kl:.4f}",
                      fit_summary(rec), m.content_hash())
    console.print(table)
    console.print(f"wrote {o.output}: {router.num_clusters} clusters, {len(router.variants())} "
                  f"distinct masks, {router.budget_text()}, method {router.method}, {p['samples']} inputs, "
                  f"{p['forward_passes']} forward + {p['backward_passes']} backward passes, "
                  f"{p['wall_s']:.1f} s" + (f"; curves {written[0]}, {written[1]}" if written else ""))
    for merge in p.get("small_cluster_merges") or []:
        console.print(f"k-means cluster {merge['cluster']} ({merge['inputs']} inputs, fewer than "
                      f"--min-cluster-size {o.min_cluster_size}) merged into cluster {merge['into']}")
    if p.get("not_converged"):
        console.print(f"[yellow]warning: the L0 fit did not converge within --steps {o.steps} for "
                      f"cluster(s) {', '.join(map(str, p['not_converged']))} (flagged in the router "
                      f"file; see the curves)")
