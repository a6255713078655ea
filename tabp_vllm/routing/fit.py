"""Fitting a router: embed the calibration inputs, k-means them, one block mask per cluster.

    router = fit_router(options)            # RouteFitOptions; see routing/options.py

Per cluster the mask is learned with one Hard-Concrete gate per candidate block on the frozen
model (transformers): a gate scales its block's residual contribution, h + z * (f(h) - h), through
a forward hook on the decoder layer; the loss is KL(dense || gated) over the next-token
distributions of the cluster's inputs (their last `kl_positions` tokens; the dense ones computed
once and cached), or with `--loss lm` the next-token cross-entropy of the gated model on the same
tokens, plus the Lagrangian sparsity term; training runs until converged (`routing/l0.py`) and the
mask removes the k gates of lowest log_alpha, or, with `--flops-ratio R`, the gates of lowest
log_alpha until their FLOPs reach R (the sparsity term then holds the expected removed FLOPs
share at R). `--mask-method NAME` instead scores the cluster's inputs with a registered scorer
(with `--units sublayers`, at sublayer granularity).

Clusters smaller than `--min-cluster-size` join the cluster of the nearest centroid; inputs
farther from every centroid than the `--fallback-quantile` of the calibration inputs' held-out
distances (each against its cluster's mean without it) take the fallback mask (the N = 1 mask
fitted on all inputs, or a given mask file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tabp_vllm.data import Dataset, MCQAItem, load_task
from tabp_vllm.errors import TabpError
from tabp_vllm.routing import hardconcrete as hc
from tabp_vllm.routing.l0 import (DECIDED_MARGIN, FLAT_TOL, MIN_WINDOW, SPARSITY_TOL, GateBudget,
                                  GateSettings, Resume, train_gates, window_for)
from tabp_vllm.routing.options import L0, RouteFitOptions
from tabp_vllm.routing.router import (FALLBACK, Fallback, Router, budget_fault, merge_variants,
                                      open_encoder, route_text)

Progress = Callable[[str, int], Callable[[int], None]]
# how often an L0 fit saves its state (with `checkpoints`): a step takes ~2 s on the demo model,
# ~9 s on Qwen2.5-Coder-0.5B (AVX2), a save milliseconds; a kill costs at most this much work
CHECKPOINT_EVERY_S = 30.0
# what provenance.convergence says of --multiplier (routing/l0.py: PIAscent, AdamAscent)
MULTIPLIER_UPDATES = {"pi": "PI controller on lambda1, integral restarted on a sign change; lambda2 = 0",
                      "adam": "Adam ascent on lambda1 and lambda2"}


@dataclass
class Calibration:
    """The mixed calibration inputs and the task each came from."""

    items: list
    tasks: list[str]
    sources: list[dict[str, Any]] = field(default_factory=list)  # per task: provenance

    def data_hash(self) -> str:
        h = hashlib.sha256()
        for src in self.sources:
            h.update(f"{src['data']}/{src['split']}:{src['sha256']}\n".encode())
        return h.hexdigest()[:16]

    def sizes(self, members: list[int]) -> dict[str, int]:
        names = list(dict.fromkeys(self.tasks))
        return {t: sum(1 for i in members if self.tasks[i] == t) for t in names}

    def dataset(self, members: list[int], name: str) -> Dataset:
        items = [self.items[i] for i in members]
        kind = "mcqa" if all(isinstance(i, MCQAItem) for i in items) else "text"
        return Dataset(name, "mixed", kind, items, "+".join(s["data"] for s in self.sources))


def load_calibration(tasks: list[str], split: str, samples: int, seed: int) -> Calibration:
    cal = Calibration([], [])
    for task in tasks:
        ds = load_task(task, split).subset(samples, seed)
        cal.items += ds.items
        cal.tasks += [task] * len(ds)
        cal.sources.append(ds.provenance(seed))
    return cal


def kmeans(vectors: np.ndarray, n: int, seed: int, n_init: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(labels, centroids) of seeded k-means (scikit-learn): the same for the same seed."""
    from sklearn.cluster import KMeans

    if n > len(vectors):
        raise TabpError(f"--clusters {n}: more clusters than the {len(vectors)} calibration inputs")
    km = KMeans(n_clusters=n, n_init=n_init, random_state=seed).fit(np.asarray(vectors, np.float64))
    return km.labels_.astype(int), km.cluster_centers_


def merge_small_clusters(vectors: np.ndarray, labels: np.ndarray, centroids: np.ndarray,
                         min_size: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Clusters with fewer than `min_size` inputs join the cluster of the nearest centroid (the
    smallest first; ties: the lower index), whose centroid becomes its new members' mean; the
    survivors are renumbered in order. Returns (labels, centroids, the merges made)."""
    v = np.asarray(vectors, np.float64)
    labels = np.asarray(labels).copy()
    cents = {c: np.asarray(centroids[c], np.float64) for c in range(len(centroids))}
    merges = []
    while len(cents) > 1:
        sizes = {c: int((labels == c).sum()) for c in cents}
        small = [c for c in cents if sizes[c] < min_size]
        if not small:
            break
        c = min(small, key=lambda x: (sizes[x], x))
        d = min((x for x in cents if x != c),
                key=lambda x: (float(np.linalg.norm(cents[x] - cents[c])), x))
        labels[labels == c] = d
        cents[d] = v[labels == d].mean(0)
        del cents[c]
        merges.append({"cluster": c, "inputs": sizes[c], "into": d})
    keep = sorted(cents)
    renumber = {c: i for i, c in enumerate(keep)}
    return (np.array([renumber[int(x)] for x in labels], dtype=int),
            np.array([cents[c] for c in keep]), merges)


def fallback_radius(vectors: np.ndarray, centroids: np.ndarray, labels: np.ndarray,
                    quantile: float) -> float:
    """The `quantile` of the calibration inputs' held-out distances to their nearest centroid:
    inputs farther than it from every centroid take the fallback mask.

    Held out: each input is measured against its own cluster's mean without it (the others'
    centroids as they are), since a request is never part of the centroid it is routed to. The
    in-sample distance is shorter by (n - 1) / n for a cluster of n, which matters here: unit
    embeddings of diverse text sit ~0.97 from a centroid of 32 and spread by ~0.03, so the in-sample
    95th percentile sent 278 of 400 unseen BoolQ documents (46 of ARC-Easy's, 43 of PIQA's) past
    the radius, the held-out one 68 (5, 7): routing report v2, N = 4. A cluster of one input has
    no held-out mean: the other centroids decide its distance."""
    v = np.asarray(vectors, np.float64)
    c = np.asarray(centroids, np.float64)
    labels = np.asarray(labels, int)
    d = np.sqrt(np.maximum(((v[:, None, :] - c[None, :, :]) ** 2).sum(-1), 0))
    for k in range(len(c)):
        own = np.flatnonzero(labels == k)
        n = len(own)
        if n == 1:
            d[own, k] = np.inf
        elif n > 1:
            loo = (v[own].sum(0)[None, :] - v[own]) / (n - 1)
            d[own, k] = np.linalg.norm(v[own] - loo, axis=1)
    nearest = d.min(1)
    nearest = nearest[np.isfinite(nearest)]
    # (one cluster of one input: nothing to measure; its mask is the fallback's anyway)
    return float(np.quantile(nearest, quantile)) if len(nearest) else 0.0


def renew_radius(router: Router, encoder=None, quantile: float | None = None,
                 where: str = "<router>") -> tuple[Fallback, float]:
    """A fitted router's fallback with the held-out radius at `quantile` (default: its own), from
    its calibration inputs reloaded by its provenance, each in its nearest centroid's cluster; and
    the share of those inputs that the renewed router sends to the fallback. For routers whose
    radius is in-sample (written before `route fit` held inputs out). `encoder`: the router's,
    loaded here when not given."""
    from tabp_vllm.routing.oracle import router_calibration

    if router.fallback is None:
        raise TabpError(f"{where}: the router has no fallback (fitted with --fallback none): no "
                        f"radius to renew")
    cal = router_calibration(router)
    encoder = encoder or open_encoder(router, where)
    vectors = encoder.encode([route_text(i) for i in cal.items])
    q = router.fallback.quantile if quantile is None else quantile
    radius = fallback_radius(vectors, np.asarray(router.centroids), router.nearest(vectors), q)
    renewed = dataclasses.replace(router.fallback, radius=radius, quantile=q, radius_kind="held-out")
    past = dataclasses.replace(router, fallback=renewed).assign(vectors) == FALLBACK
    return renewed, float(past.mean())


def partial_dir(output: Path) -> Path:
    """Where `route fit -o OUTPUT` keeps its L0 fits' saved state until the router is written
    (one file per cluster, `routing/l0.py: Resume`): the same command, rerun after an
    interruption, goes on from there."""
    output = Path(output)
    return output.with_name(output.name + ".partial")


# --------------------------------------------------------------------------- gated model

@contextlib.contextmanager
def gated(model, blocks: list[int], z):
    """Blocks `blocks[j]` compute h + z[j] * (f(h) - h) while inside (z: a tensor, read at call
    time through `z()` when callable, so one hook serves every step)."""
    from tabp_vllm.scoring.probe import decoder_layers

    def hook_for(j: int):
        def hook(_module, args, kwargs, out):
            h = args[0] if args else kwargs["hidden_states"]
            gate = (z() if callable(z) else z)[j]
            if isinstance(out, tuple):
                return (h + gate * (out[0] - h),) + tuple(out[1:])
            return h + gate * (out - h)
        return hook

    layers = decoder_layers(model)
    handles = [layers[b].register_forward_hook(hook_for(j), with_kwargs=True)
               for j, b in enumerate(blocks)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def gated_sublayers(model, units: list[int], z):
    """Units `units[j]` (2i: block i's attention, 2i+1: its MLP) add z[j] times their output to
    the residual stream while inside: a forward hook on the block's self_attn / mlp scales what
    the decoder layer then adds (h + z * attn(norm(h)), h' + z * mlp(norm(h')))."""
    from tabp_vllm.scoring.probe import decoder_layers
    from tabp_vllm.sublayers import ATTENTION, block_kind

    def hook_for(j: int):
        def hook(_module, _args, out):
            gate = (z() if callable(z) else z)[j]
            if isinstance(out, tuple):
                return (gate * out[0],) + tuple(out[1:])
            return gate * out
        return hook

    layers = decoder_layers(model)
    handles = []
    for j, u in enumerate(units):
        block, kind = block_kind(u)
        module = layers[block].self_attn if kind == ATTENTION else layers[block].mlp
        handles.append(module.register_forward_hook(hook_for(j)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class Units:
    """What the gates and `--k` count: whole blocks (`candidates` are block indices) or
    sublayers (`candidates` are unit indices, 2i attention / 2i+1 MLP of each candidate block)."""

    kind: str  # "blocks" | "sublayers"
    candidates: list[int]

    @classmethod
    def of(cls, kind: str, blocks: list[int]) -> "Units":
        from tabp_vllm.sublayers import KINDS, unit_of

        if kind == "sublayers":
            return cls(kind, [unit_of(b, k) for b in blocks for k in KINDS])
        return cls(kind, list(blocks))

    def gated(self, model, z):
        if self.kind == "sublayers":
            return gated_sublayers(model, self.candidates, z)
        return gated(model, self.candidates, z)

    def without(self, model, removed: list[int]):
        """The model with the `removed` units left out (no gradient needed)."""
        from tabp_vllm.scoring.probe import without_blocks
        from tabp_vllm.sublayers import without_units

        if self.kind == "sublayers":
            return without_units(model, removed)
        return without_blocks(model, set(removed))

    def mask_lists(self, removed: list[int]) -> tuple[list[int], list[int], list[int]]:
        """(removed_layers, removed_attention, removed_mlp) of a mask removing `removed`."""
        from tabp_vllm.sublayers import units_to_mask_lists

        if self.kind == "sublayers":
            return units_to_mask_lists(removed)
        return sorted(removed), [], []

    def of_mask(self, mask) -> list[int]:
        """The units a mask removes, counted as these units."""
        from tabp_vllm.sublayers import mask_units

        if self.kind == "sublayers":
            return mask_units(mask.removed_layers, mask.removed_attention, mask.removed_mlp)
        return sorted(mask.removed_layers)


@dataclass
class Batch:
    members: list[int]  # indices into the cluster's inputs
    inputs: dict  # input_ids, attention_mask, position_ids (left padded)
    valid: Any  # (b, P) bool: which of the last P positions are real tokens
    teacher: Any = None  # (b, P, V) float16 dense log-probabilities, cached
    answer: Any = None  # (b, P) bool: which of the last P positions hold the gold answer's tokens


class Objective:
    """The cluster's inputs (each item's text with its gold answer) in fixed, length-sorted
    batches with the dense model's next-token log-probabilities at their last P positions cached;
    `kl(batch)` of the model as it runs now, `lm(batch)` its next-token cross-entropy on the same
    tokens, `answer(batch)` that cross-entropy on the gold answer's tokens alone (those of the
    last P), `loss(batch)` the chosen one (`kind`)."""

    def __init__(self, model, tokenizer, items: list, batch_size: int, max_length: int,
                 positions: int, tick: Callable[[int], None] | None = None, kind: str = "kl"):
        import torch

        self.model, self.P, self.kind = model, positions, kind
        self.forward_passes = 0
        device = next(model.parameters()).device
        texts = [_kl_text(i) for i in items]
        lengths = [len(tokenizer(t, truncation=True, max_length=max_length)["input_ids"])
                   for t in texts]
        answers = [min(answer_tokens(tokenizer, i), n) for i, n in zip(items, lengths)]
        order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
        self.batches: list[Batch] = []
        for s in range(0, len(order), batch_size):
            members = order[s:s + batch_size]
            enc = tokenizer([texts[i] for i in members], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length)
            att = enc["attention_mask"]
            inputs = {"input_ids": enc["input_ids"].to(device), "attention_mask": att.to(device),
                      "position_ids": (att.cumsum(-1) - 1).clamp_min(0).to(device)}
            valid = self._tail(att).bool().to(device)
            # the gold answer is each text's last `answers[i]` tokens (left padding: the row's end)
            tail = torch.arange(self.P, device=device)[None, :] >= (
                self.P - torch.tensor([answers[i] for i in members], device=device)[:, None])
            b = Batch(members, inputs, valid, answer=tail)
            with torch.no_grad():
                b.teacher = self.log_probs(b).to(torch.float16)
            self.batches.append(b)
            if tick:
                tick(1)

    def _tail(self, t):
        import torch.nn.functional as F

        P = self.P
        return t[:, -P:] if t.shape[1] >= P else F.pad(t, (P - t.shape[1], 0))

    def log_probs(self, b: Batch, tail: int | None = None):
        """Next-token log-probabilities at the last `tail` (default P) positions, left-padded."""
        import torch

        n = tail or self.P
        h = self.model.model(**b.inputs, use_cache=False).last_hidden_state
        self.forward_passes += h.shape[0]
        h = h[:, -n:]
        if h.shape[1] < n:
            h = torch.nn.functional.pad(h, (0, 0, n - h.shape[1], 0))
        return torch.log_softmax(self.model.lm_head(h).float(), -1)

    def loss(self, b: Batch):
        return {"lm": self.lm, "answer": self.answer}.get(self.kind, self.kl)(b)

    def lm(self, b: Batch):
        """Mean next-token cross-entropy of the model as it runs now on the batch's own last P
        tokens (the paper's LM loss): positions -P-1..-2 predict tokens -P..-1, where both are real."""
        nll, valid = self._lm_terms(b)
        return (nll * valid).sum() / valid.sum().clamp_min(1)

    def answer(self, b: Batch):
        """Mean cross-entropy of the gold answer's tokens given the text before them."""
        nll, valid = self._lm_terms(b, answer_only=True)
        return (nll * valid).sum() / valid.sum().clamp_min(1)

    def _lm_terms(self, b: Batch, answer_only: bool = False):
        """Per position of the last P: the negative log-likelihood of the real next token, and
        whether both it and its context position are real tokens (and, `answer_only`, the token
        is the gold answer's)."""
        import torch.nn.functional as F

        P = self.P
        lp = self.log_probs(b, P + 1)[:, :-1]
        ids, att = b.inputs["input_ids"], b.inputs["attention_mask"]
        if ids.shape[1] < P + 1:
            ids, att = F.pad(ids, (P + 1 - ids.shape[1], 0)), F.pad(att, (P + 1 - att.shape[1], 0))
        target, att = ids[:, -P:], att[:, -P - 1:]
        valid = (att[:, :-1] * att[:, 1:]).bool()
        if answer_only:
            valid = valid & b.answer
        return -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1), valid

    def kl(self, b: Batch):
        """Mean KL(dense || now) over the batch's valid positions (a differentiable tensor)."""
        t = b.teacher.float()
        per_pos = (t.exp() * (t - self.log_probs(b))).sum(-1)
        return (per_pos * b.valid).sum() / b.valid.sum().clamp_min(1)

    def total_kl(self, removed: list[int], units: "Units | None" = None) -> float:
        """Summed per-input mean KL with the `removed` units (default: blocks) left out (no
        gradient): the cost of a mask on these inputs, size-weighted."""
        return self.total(removed, units, "kl")

    def total(self, removed: list[int], units: "Units | None" = None,
              kind: str | None = None) -> float:
        """Summed per-input mean loss (`kind`, default the objective's own: KL to dense, LM or
        answer cross-entropy) with the `removed` units (default: blocks) left out, no gradient."""
        import torch

        units = units or Units("blocks", [])
        kind = kind or self.kind
        total = 0.0
        with torch.no_grad(), units.without(self.model, list(removed)):
            for b in self.batches:
                if kind in ("lm", "answer"):
                    per_pos, valid = self._lm_terms(b, answer_only=kind == "answer")
                else:
                    t = b.teacher.float()
                    per_pos, valid = (t.exp() * (t - self.log_probs(b))).sum(-1), b.valid
                per_pos = per_pos * valid
                total += float((per_pos.sum(1) / valid.sum(1).clamp_min(1)).sum())
        return total


def fit_l0(objective: Objective, units: Units, budget: int | GateBudget, o: RouteFitOptions,
           seed: int, tick: Callable[[int], None] | None = None, resume: Resume | None = None
           ) -> tuple[list[int], list[float], dict, dict]:
    """Hard-Concrete gates on the candidate `units` trained on the objective until converged (at
    most `o.steps` steps, `routing/l0.py`); `budget`: k units or a `GateBudget` over the
    candidates; `resume`: where the fit is saved and resumed from (`routing/l0.py: Resume`).
    Returns the removed units (the deterministic mask), the final log_alpha per gated unit, the
    run's record (steps, convergence, final sparsity, lambdas, loss, passes) and its curves."""
    import torch

    rng = random.Random(seed)
    order: list[int] = []
    z = {"now": torch.ones(len(units.candidates))}
    backward = [0]
    forward0 = objective.forward_passes
    earlier = {"forward": 0}  # a resumed fit's step passes before this run

    def caller_state() -> dict:
        return {"rng": rng.getstate(), "order": list(order), "backward": backward[0],
                "forward": earlier["forward"] + objective.forward_passes - forward0}

    def set_caller_state(st: dict) -> None:
        version, internal, gauss = st["rng"]  # (a saved tuple may come back as a list)
        rng.setstate((version, tuple(internal), gauss))
        order[:] = st["order"]
        backward[0], earlier["forward"] = st["backward"], st["forward"]

    if resume is not None:
        resume.caller = (caller_state, set_caller_state)

    def loss_of(_step: int, gates):
        if not order:
            order.extend(range(len(objective.batches)))
            rng.shuffle(order)
        b = objective.batches[order.pop()]
        z["now"] = gates
        backward[0] += b.inputs["input_ids"].shape[0]
        return objective.loss(b)

    settings = GateSettings(max_steps=o.steps, lr=o.lr, lambda_lr=o.multiplier_lr,
                            init_log_alpha=o.init_log_alpha, warmup_steps=round(o.warmup * o.steps),
                            multiplier=o.multiplier, lambda_p=o.lambda_p,
                            window=window_for(len(objective.batches)))
    with units.gated(objective.model, lambda: z["now"]):
        g = train_gates(loss_of, len(units.candidates), budget, settings, seed, tick, resume)
    record = {"loss_kind": objective.kind, "steps": g.steps, "converged": g.converged,
              **({"budget": "flops"} if isinstance(budget, GateBudget) and budget.kind == "flops"
                 else {}),
              "unmet": g.failed, **g.final, "backward_passes": backward[0],
              "step_forward_passes": earlier["forward"] + objective.forward_passes - forward0}
    if resume is not None and resume.resumed_from:
        record["resumed"] = {"from_step": resume.resumed_from,
                             "earlier_wall_s": round(resume.earlier_wall_s, 3)}
    return [units.candidates[j] for j in g.removed], g.log_alpha, record, g.curves


def polish_mask(objective: Objective, units: Units, removed: list[int], log_alpha: list[float],
                shares: dict[int, float] | None, max_swaps: int, progress: Progress | None = None,
                name: str = "mask") -> tuple[list[int], dict]:
    """The L0 mask after single swaps that lower the fit's own loss (mean per input) on the
    objective's inputs (`routing/swap.py`), and the search's record (losses, swaps, passes); a
    progress bar named `name` counts the masks measured against one scan."""
    from tabp_vllm.routing.swap import swap_search

    n = sum(len(b.members) for b in objective.batches)
    scan = len(removed) * (len(units.candidates) - len(removed))
    tick = progress(f"{name} ({n} inputs): swap search (one scan: {scan})", scan + 1) if progress else None
    before = objective.forward_passes
    res = swap_search(lambda r: objective.total(r, units) / n, removed, units.candidates,
                      dict(zip(units.candidates, log_alpha)), shares, max_swaps, tick)
    return res.removed, {**res.record(), "loss": objective.kind,
                         "forward_passes": objective.forward_passes - before}


def fit_router(o: RouteFitOptions, *, encoder=None, model_and_tokenizer: tuple | None = None,
               model_path: str | None = None, progress: Progress | None = None,
               calibration: Calibration | None = None, checkpoints: Path | None = None) -> Router:
    """The whole fit; `encoder`, the loaded model and the calibration can be handed in (tests);
    `checkpoints`: a directory where each cluster's L0 fit saves its state and, when a save is
    there, resumes from it (`route fit` passes `partial_dir(-o)`)."""
    import torch

    from tabp_vllm.mask import load_mask, make_mask
    from tabp_vllm.models import alias_of, load_model_config, model_fingerprint, resolve_model
    from tabp_vllm.routing.encoder import load_encoder
    from tabp_vllm.scoring import parse_range, resolve_k, run_scoring
    from tabp_vllm.scoring.probe import load_model, pick_device
    from tabp_vllm.scoring.units import Budget, resolve_budget, unit_flops_shares

    def task(desc: str, total: int) -> Callable[[int], None]:
        return progress(desc, total) if progress else (lambda n=1: None)

    t0 = time.perf_counter()
    path = model_path or resolve_model(o.model)
    config = load_model_config(path)
    fingerprint = model_fingerprint(config)
    B = fingerprint["num_hidden_layers"]
    blocks = parse_range(o.block_range, B)
    units = Units.of(o.units, blocks)
    k = o.units_k
    # each unit's share of a dense decode step's FLOPs (per block, or per sublayer unit), as
    # `score --flops-ratio` counts them: what a FLOPs budget weighs, recorded in the router
    shares = unit_flops_shares(config, "block" if o.units == "blocks" else "sublayer")
    flops: Budget | None = None
    if o.flops_ratio is not None:  # the same checks and errors as `score --flops-ratio`
        flops = resolve_budget(None, None, o.flops_ratio, len(shares), units.candidates, shares,
                               o.units)
    elif o.units == "sublayers":
        if not 0 < k < len(units.candidates):
            raise TabpError(f"k = {k}: must be between 1 and the {len(units.candidates)} "
                            f"candidate sublayers")
    else:
        k = resolve_k(k, None, B, blocks)
    gate_budget = k if flops is None else GateBudget.flops(
        [shares[u] for u in units.candidates], o.flops_ratio)
    given_fallback = None
    if o.fallback not in ("fit", "none"):  # checked before any work: a wrong mask fails fast
        given_fallback = load_mask(o.fallback, path, o.model)
        fault = budget_fault(given_fallback, o.units, k, o.flops_ratio, shares)
        if fault:
            raise TabpError(f"--fallback {o.fallback}: {fault}")
    cal = calibration or load_calibration(o.task, o.split, o.samples, o.seed)
    if o.clusters > len(cal.items):
        raise TabpError(f"--clusters {o.clusters}: more clusters than the {len(cal.items)} "
                        f"calibration inputs")
    if encoder is None and o.encoder != "self":
        encoder = load_encoder(o.encoder)  # before the model: an unreachable registry fails fast
    torch.manual_seed(o.seed)
    device = pick_device(o.device)
    model, tok = model_and_tokenizer or load_model(path, device)
    for p in model.parameters():
        p.requires_grad_(False)
    if encoder is None:
        encoder = load_encoder("self", model_and_tokenizer=(model, tok), model_id=alias_of(o.model))

    tick = task("embedding inputs", 1)
    vectors = encoder.encode([route_text(i) for i in cal.items])
    tick(1)
    labels, centroids = kmeans(vectors, o.clusters, o.seed, o.kmeans_init)
    labels, centroids, small_merges = merge_small_clusters(vectors, labels, centroids,
                                                           o.min_cluster_size)
    n_clusters = len(centroids)
    members = [[i for i in range(len(cal.items)) if labels[i] == c] for c in range(n_clusters)]

    forward = backward = 0
    removed_of: list[list[int]] = []
    scores_of: list[list[float | None]] = []
    params_of: list[dict[str, Any]] = []
    objectives: list[Objective | None] = []
    per_cluster: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []

    def fit_one(c: int | str, idx: list[int], seed: int):
        """One mask on the inputs `idx`: (removed, scores, params, record, objective)."""
        tc = time.perf_counter()
        record: dict[str, Any] = {"cluster": c, "inputs": len(idx)}
        saved_as = f"cluster{c}" if isinstance(c, int) else str(c)  # its files in `checkpoints`
        if o.mask_method == L0:
            nb = -(-len(idx) // o.batch_size)
            tick = task(f"cluster {c} ({len(idx)} inputs): L0 gates", nb + o.steps)
            obj = Objective(model, tok, [cal.items[i] for i in idx], o.batch_size,
                            o.max_length, o.kl_positions, tick, kind=o.loss)
            resume = None if checkpoints is None else Resume(
                Path(checkpoints) / f"{saved_as}.pt",
                {"model": fingerprint, "fit": o.hyperparameters(), "cluster": c, "seed": seed,
                 "inputs": cal.dataset(idx, "").content_hash(), "units": units.candidates},
                CHECKPOINT_EVERY_S)
            removed, log_alpha, stats, curve = fit_l0(obj, units, gate_budget, o, seed, tick,
                                                      resume)
            if o.polish == "swap":
                removed, stats["polish"] = polish_mask(
                    obj, units, removed, log_alpha,
                    {u: shares[u] for u in units.candidates} if flops else None, o.max_swaps,
                    progress, f"cluster {c}")
            params = {"k": len(removed), "units": o.units,
                      "candidate_range": [blocks[0], blocks[-1] + 1], "seed": seed, "loss": o.loss,
                      **(flops.record(removed) if flops else {})}
            if "polish" in stats:  # the removed units are no longer the lowest gates alone
                params["polish"] = {key: stats["polish"][key] for key in ("kind", "swaps")}
            scores: list[float | None] | None = None
            if o.units == "sublayers":  # a mask's scores are per block: the gates go in params
                params["unit_scores"] = {str(u): a for u, a in zip(units.candidates, log_alpha)}
                params["score"] = "final log_alpha of each unit's Hard-Concrete gate (2i attention, 2i+1 MLP)"
            else:
                scores = [None] * B
                for b, a in zip(blocks, log_alpha):
                    scores[b] = a
                params["score"] = "final log_alpha of the block's Hard-Concrete gate"
            record.update(stats, forward_passes=obj.forward_passes)
            if flops:  # what the mask removes, beside the gates' expected share
                record["removed_flops_fraction"] = params["removed_flops_fraction"]
            curves.append({"cluster": c, **curve})
        else:
            # --units sublayers: the scorer ranks attention and MLP units (issue 33's sublayer
            # scoring, `score --granularity sublayer`), under the same k or FLOPs budget
            res = run_scoring(path, cal.dataset(idx, f"cluster{c}"), o.mask_method, k=k,
                              flops_ratio=o.flops_ratio,
                              granularity="block" if o.units == "blocks" else "sublayer",
                              block_range=o.block_range, batch_size=o.batch_size,
                              max_length=o.max_length, seed=o.seed, device=device,
                              progress=progress, model_and_tokenizer=(model, tok),
                              checkpoint=None if checkpoints is None else  # SLEB / PPL progress
                              Path(checkpoints) / f"{saved_as}-{o.mask_method}.json")
            removed, scores, params = res.removed, res.scores, res.params
            record.update(forward_passes=res.forward_passes, backward_passes=0)
            obj = None
        # a resumed fit's time counts the runs before this one (`fit_l0`'s record says them)
        earlier_s = record.get("resumed", {}).get("earlier_wall_s", 0.0)
        record["wall_s"] = round(earlier_s + time.perf_counter() - tc, 3)
        return removed, scores, params, record, obj

    for c, idx in enumerate(members):
        removed, scores, params, record, obj = fit_one(c, idx, o.seed + c)
        objectives.append(obj)
        removed_of.append(removed)
        scores_of.append(scores)
        params_of.append(params)
        per_cluster.append(record)
        backward += record["backward_passes"]
        if obj is None:
            forward += record["forward_passes"]

    uses = list(range(n_clusters))
    cost: list[list[float]] | None = None
    distinct = len({tuple(r) for r in removed_of})
    need_merge = o.max_variants is not None and distinct > o.max_variants
    if need_merge or o.mask_method == L0:
        # The cost of every cluster's mask on every cluster's inputs (dense KL, size-weighted):
        # what merging minimises, and each mask's own loss, recorded.
        for c, idx in enumerate(members):
            if objectives[c] is None:
                tick = task(f"cluster {c}: dense reference", -(-len(idx) // o.batch_size))
                objectives[c] = Objective(model, tok, [cal.items[i] for i in idx],
                                          o.batch_size, o.max_length, o.kl_positions, tick)
        cost = [[0.0] * n_clusters for _ in range(n_clusters)]
        for c in range(n_clusters):
            before = objectives[c].forward_passes
            for d in (range(n_clusters) if need_merge else [c]):
                cost[c][d] = objectives[c].total_kl(removed_of[d], units)
            per_cluster[c]["kl"] = round(cost[c][c] / max(len(members[c]), 1), 6)
            per_cluster[c]["forward_passes"] += objectives[c].forward_passes - before
        if need_merge:
            uses = merge_variants(cost, removed_of, o.max_variants)
    forward += sum(ob.forward_passes for ob in objectives if ob is not None)

    everyone = list(range(len(cal.items)))

    def mask_for(c, idx, removed, params, scores):
        cal_c = {"data": "+".join(o.task), "split": o.split, "samples": len(idx),
                 "seed": o.seed, "sha256": cal.dataset(idx, "").content_hash(),
                 "sizes": cal.sizes(idx), "cluster": c}
        layers, attention, mlp = units.mask_lists(removed)
        return make_mask(path, layers, task=f"cluster{c}", model_id=alias_of(o.model),
                         method=o.mask_method, params=params, scores=scores, calibration=cal_c,
                         removed_attention=attention, removed_mlp=mlp)

    masks = []
    for c, idx in enumerate(members):
        d = uses[c]
        params = dict(params_of[d])
        if d != c:
            params["merged_into_mask_of_cluster"] = d
        masks.append(mask_for(c, idx, removed_of[d], params, scores_of[d]))

    # The fallback: the static N = 1 mask (fitted on every input; with one cluster, its mask) or
    # the given one, for inputs farther from every centroid than most calibration inputs are.
    fallback, fallback_record = None, None
    if o.fallback != "none":
        radius = fallback_radius(vectors, centroids, labels, o.fallback_quantile)
        if given_fallback is not None:
            fb_mask, source = given_fallback, f"file:{Path(o.fallback).name}"
        elif n_clusters == 1:
            fb_mask, source = masks[0], "fit: the single cluster's mask"
        else:
            removed, scores, params, fallback_record, obj = fit_one("fallback", everyone,
                                                                    o.seed + n_clusters)
            if obj is not None:
                fallback_record["kl"] = round(obj.total_kl(removed, units) / len(everyone), 6)
                fallback_record["forward_passes"] = obj.forward_passes
            forward += fallback_record["forward_passes"]
            backward += fallback_record["backward_passes"]
            fb_mask = mask_for("fallback", everyone, removed, params, scores)
            source = "fit: N = 1 on every calibration input"
        fallback = Fallback(radius=radius, quantile=o.fallback_quantile, source=source, mask=fb_mask)

    l0_records = [r for r in per_cluster + [fallback_record] if r and "converged" in r]
    # a resumed fit's time counts the runs before this one (what the report calls its cost)
    wall = time.perf_counter() - t0 + sum(r["resumed"]["earlier_wall_s"] for r in l0_records
                                          if "resumed" in r)
    provenance = {"data": cal.sources, "data_sha256": cal.data_hash(), "seed": o.seed,
                  "samples": len(cal.items), "wall_s": round(wall, 3), "forward_passes": forward,
                  "backward_passes": backward, "device": device, "clusters": per_cluster,
                  "fallback": fallback_record,
                  "converged": all(r["converged"] for r in l0_records) if l0_records else None,
                  "not_converged": [r["cluster"] for r in l0_records if not r["converged"]],
                  "kmeans_clusters": o.clusters, "small_cluster_merges": small_merges,
                  "convergence": {"sparsity_tol": SPARSITY_TOL, "decided_margin": DECIDED_MARGIN,
                                  "flat_tol": FLAT_TOL, "min_window": MIN_WINDOW,
                                  "multipliers": MULTIPLIER_UPDATES[o.multiplier]},
                  "hard_concrete": {"beta": hc.BETA, "l": hc.LIMIT_L, "r": hc.LIMIT_R,
                                    "log_alpha_limit": hc.LOG_ALPHA_LIMIT},
                  "merge": {"uses_mask_of": uses, "cost_kl": cost} if need_merge else None}
    router = Router(model_id=alias_of(o.model), fingerprint=fingerprint, k=k,
                    flops_ratio=o.flops_ratio, unit_flops=shares if flops else [],
                    encoder=encoder.record(), centroids=[[float(x) for x in c] for c in centroids],
                    masks=masks, sizes=[cal.sizes(idx) for idx in members], method=o.mask_method,
                    params=o.hyperparameters(), provenance=provenance, fallback=fallback,
                    units=o.units)
    router.curves = curves
    return router


def _kl_text(item) -> str:
    """What the KL is taken over: the input with its answer, as the perplexity scorers read it."""
    from tabp_vllm.scoring.probe import lm_text

    return lm_text(item)


def answer_split(item) -> tuple[str, str]:
    """`_kl_text(item)` as (what comes before the gold answer, the gold answer): a multiple-choice
    item's context and ' {gold choice}' (lm-eval's continuation); a free-text item's text up to
    its last 'Answer:' and what follows (GSM8K's worked answer), or ("", the whole text) when it
    has none."""
    from tabp_vllm.data import MCQAItem, mcqa_context

    if isinstance(item, MCQAItem):
        return mcqa_context(item), f" {item.choices[item.gold]}"
    head, sep, tail = item.text.rpartition("Answer:")
    return (head + sep, tail) if sep else ("", item.text)


def answer_tokens(tokenizer, item) -> int:
    """How many of `_kl_text(item)`'s last tokens are its gold answer (tokenised apart, as lm-eval
    scores a continuation)."""
    return max(len(tokenizer(answer_split(item)[1], add_special_tokens=False)["input_ids"]), 1)
