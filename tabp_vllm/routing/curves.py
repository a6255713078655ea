"""The L0 fit's per-step curves beside the router: `<router>.curves.json` and `.curves.png`.

One panel per fitted mask (each cluster, and the fallback when fitted): the task loss (KL or LM),
the expected sparsity against its target, and lambda1 / lambda2, so whether a fit converged can be
seen, not only read from the flag.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def curve_paths(router_path: str | Path) -> tuple[Path, Path]:
    p = Path(router_path)
    stem = p.with_suffix("") if p.suffix == ".json" else p
    return Path(f"{stem}.curves.json"), Path(f"{stem}.curves.png")


def save_curves(curves: list[dict[str, Any]], router_path: str | Path,
                records: list[dict[str, Any]]) -> tuple[Path, Path] | None:
    """Write the curves (JSON) and their plot (PNG); None when there are none (a scorer fit)."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tabp_vllm.models import save_json_atomically

    json_path, png_path = curve_paths(router_path)
    by_cluster = {str(r.get("cluster")): r for r in records if r}
    save_json_atomically(json_path, {"router": Path(router_path).name, "curves": curves,
                                     "records": [by_cluster.get(str(c["cluster"])) for c in curves]})
    fig, axes = plt.subplots(len(curves), 3, figsize=(12, 2.6 * len(curves)), squeeze=False)
    for row, c in zip(axes, curves):
        rec = by_cluster.get(str(c["cluster"]), {})
        steps = range(1, len(c["loss"]) + 1)
        state = "converged" if rec.get("converged") else "NOT converged"
        row[0].plot(steps, c["loss"], lw=0.8)
        row[0].set_title(f"cluster {c['cluster']}: {rec.get('loss_kind', 'kl')} loss ({state})",
                         fontsize=9)
        row[1].plot(steps, c["expected_sparsity"], label="expected sparsity")
        row[1].plot(steps, c["target"], "--", label="target")
        row[1].set_title("sparsity", fontsize=9)
        row[1].legend(fontsize=7)
        row[2].plot(steps, c["lambda1"], label="lambda1")
        row[2].plot(steps, c["lambda2"], label="lambda2")
        row[2].set_title("multipliers", fontsize=9)
        row[2].legend(fontsize=7)
        for ax in row:
            ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return json_path, png_path


def load_curves(router_path: str | Path) -> dict[str, Any]:
    return json.loads(curve_paths(router_path)[0].read_text())
