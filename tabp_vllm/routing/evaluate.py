"""`eval --router`: accuracy when every item is answered by the variant its question routes to.

Each evaluation document is routed by its question alone (lm-eval's `doc_to_text`, the prompt
without any choice), so all the choices of one item are scored under one mask. The documents of
each distinct mask are then evaluated in one lm-eval run on that variant (lm-eval's `samples`:
those document ids only), and the per-document metric values of all runs are pooled: the routed
accuracy is their mean over every document, its standard error the standard error of that mean
(lm-eval's own `mean_stderr` formula), next to the cluster mix of each task.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from tabp_vllm.routing.router import FALLBACK, Router, removed_text


def cluster_name(c: int) -> str:
    return "fallback" if c == FALLBACK else str(c)


def route_documents(router: Router, encoder, tasks: list[str], include: list[str] | None,
                    limit: int | None) -> dict[str, list[int]]:
    """Per task, the cluster of each evaluation document (the first `limit` when given): its
    nearest centroid's, or FALLBACK past the router's fallback radius (as the server routes)."""
    from tabp_vllm.lmeval_tasks import load_task_object

    clusters = {}
    for t in tasks:
        task = load_task_object(t, include)
        docs = list(task.eval_docs)[:limit] if limit else list(task.eval_docs)
        texts = [str(task.doc_to_text(d)) for d in docs]
        clusters[t] = [int(c) for c in router.assign(encoder.encode(texts))] if texts else []
    return clusters


def documents_per_mask(router: Router, clusters: dict[str, list[int]]) -> list[dict[str, Any]]:
    """One entry per distinct mask that some document routes to: the mask, its clusters, and the
    document ids of each task it answers."""
    out = []
    for mask, members in router.variants():
        docs = {t: [i for i, c in enumerate(cs) if c in members] for t, cs in clusters.items()}
        docs = {t: ids for t, ids in docs.items() if ids}
        if docs:
            out.append({"mask": mask, "clusters": members, "docs": docs})
    return out


def pooled_metrics(per_doc: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and standard error of each metric over the documents (lm-eval's mean_stderr)."""
    out = {}
    for metric in sorted({m for d in per_doc for m in d}):
        xs = [float(d[metric]) for d in per_doc if metric in d]
        n = len(xs)
        mean = sum(xs) / n
        var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else float("nan")
        out[metric] = {"value": mean, "stderr": math.sqrt(var / n) if n > 1 else float("nan"), "n": n}
    return out


def evaluate_routed(model_path: str, router: Router, encoder, tasks: list[str], *,
                    include: list[str] | None, limit: int | None, workdir: Path,
                    run_variant: Callable[..., dict[str, Any]],
                    say: Callable[[str], None] = print) -> dict[str, Any]:
    """Route, evaluate each distinct mask on its documents (`run_variant(model, tasks, mask_path,
    samples=...)`, i.e. `evaluate.evaluate_variant`), pool. The result has the routed metrics per
    task, the cluster and variant mix per task, and each mask's own run."""
    clusters = route_documents(router, encoder, tasks, include, limit)
    runs = []
    per_task_docs: dict[str, dict[int, dict[str, float]]] = {t: {} for t in tasks}
    for j, group in enumerate(documents_per_mask(router, clusters)):
        mask = group["mask"]
        path = mask.save(workdir / f"router-mask-{j}.json")
        mix = ", ".join(f"{t} {len(ids)}" for t, ids in group["docs"].items())
        say(f"evaluating the mask of cluster(s) {','.join(map(cluster_name, group['clusters']))} "
            f"(removes {removed_text(mask)}) on its documents: {mix} ...")
        r = run_variant(model_path, list(group["docs"]), str(path), samples=group["docs"])
        for t, rows in r["samples"].items():
            for row in rows:
                per_task_docs[t][row["doc_id"]] = row["metrics"]
        runs.append({"clusters": group["clusters"], "removed_layers": mask.removed_layers,
                     "removed_attention": mask.removed_attention, "removed_mlp": mask.removed_mlp,
                     "docs": {t: len(ids) for t, ids in group["docs"].items()},
                     "results": r["results"], "requests": r.get("requests")})
    results = {}
    for t in tasks:
        want = len(clusters[t])
        got = per_task_docs[t]
        if len(got) != want:
            raise RuntimeError(f"{t}: {len(got)} of {want} routed documents came back scored")
        results[t] = pooled_metrics([got[i] for i in sorted(got)])
    mix = {t: {cluster_name(c): n for c, n in sorted(Counter(cs).items())} for t, cs in clusters.items()}
    # per document (lm-eval's doc id): its cluster and metric values, for paired and
    # hierarchical bootstraps over documents and fit seeds (comparison.hierarchical_bootstrap)
    per_document = {t: [{"doc_id": i, "cluster": cluster_name(clusters[t][i]), **per_task_docs[t][i]}
                        for i in sorted(per_task_docs[t])] for t in tasks}
    return {"results": results, "cluster_mix": mix, "runs": runs, "per_document": per_document,
            "router": {"hash": router.content_hash(), "clusters": router.num_clusters,
                       "k": router.k, "units": router.units, "method": router.method,
                       **({"flops_ratio": router.flops_ratio} if router.flops_ratio is not None else {}),
                       "encoder": router.encoder.get("id"),
                       "fallback_radius": router.fallback.radius if router.fallback else None}}
