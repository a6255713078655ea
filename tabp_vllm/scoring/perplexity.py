"""Perplexity baselines: SLEB (iterative: each round removes the block whose removal hurts the
calibration perplexity least) and the PPL sensitivity of Shortened LLaMA (each block alone).

Each comes twice: as published (`sleb`, `ppl`: perplexity of generic text, WikiText-2
paragraphs as the SLEB paper calibrates, here from the test split, the only one
../shared/data ships: our evaluations never score WikiText, so nothing leaks; Shortened LLaMA used BookCorpus, which is not here), and
task-aligned (`sleb-task`, `ppl-task`: perplexity of the task's own question + gold answer text,
the very likelihood a zero-shot evaluation scores).

Cost: as the papers count it, one full calibration pass per sample per candidate (SLEB: per
round), which `forward_passes` and the run's recorded passes keep; the run's wall time is recorded
beside them. The implementation reuses prefixes (`removal_nlls`, prefix.py): per round and batch
one pass with the removed units gone keeps each candidate's boundary state, and each candidate
runs only from its boundary, with exactly the numbers of a full pass per candidate, in about half
the time (bench/results/sleb_prefix/)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from tabp_vllm.errors import TabpError
from tabp_vllm.scoring.base import MethodResult, ScoringMethod
from tabp_vllm.scoring.prefix import removal_outputs
from tabp_vllm.scoring.probe import ScoreContext, forward_batches, lm_text


@torch.no_grad()
def calibration_nll(ctx: ScoreContext, removed: set[int], tick=None) -> float:
    """Mean next-token NLL over the calibration texts with `removed` units (blocks, or sublayers
    at sublayer granularity) left out (log PPL): one full pass per batch, the reference that
    `removal_nlls` reproduces."""
    total, count = 0.0, 0
    for b in forward_batches(ctx, lm_text, skip=removed, tick=tick):
        batch_total, batch_count = _nll_sums(ctx, b.output, b.inputs)
        total += batch_total
        count += batch_count
    return total / max(count, 1)


@torch.no_grad()
def removal_nlls(ctx: ScoreContext, removed: set[int], units: list[int], tick=None,
                 reuse_prefix: bool = True) -> dict[int, float]:
    """`calibration_nll(ctx, removed | {u})` for every u in `units`, the same numbers, with each
    candidate resumed from the prefix it shares with the others (prefix.py: about half the
    blocks per candidate), or without `reuse_prefix` those very calls (the reference that
    tests/test_prefix_reuse.py and bench/sleb_prefix.py compare against). Ticks `tick` once per
    unit per batch either way."""
    if not reuse_prefix:
        return {u: calibration_nll(ctx, removed | {u}, tick) for u in units}
    saves: PerplexitySaves | None = ctx.saves
    start, sums = saves.progress(removed, units) if saves else (0, {u: [0.0, 0] for u in units})
    if tick and start:
        tick(start * len(units))
    batch = start
    for inputs, u, out in removal_outputs(ctx, lm_text, removed, units, start):
        batch_total, batch_count = _nll_sums(ctx, out, inputs)
        sums[u][0] += batch_total
        sums[u][1] += batch_count
        if tick:
            tick(1)
        if u == units[-1]:  # the batch is done for every unit
            batch += 1
            if saves:
                saves.save(removed, units, batch, sums)
    return {u: total / max(count, 1) for u, (total, count) in sums.items()}


class PerplexitySaves:
    """The per-batch progress of a perplexity scorer (SLEB, PPL), in one small JSON file, so a
    killed run goes on where it stopped: on a deeper model on a CPU a batch takes minutes and a
    run hours (PPL on qwen0.5b's 128 routing inputs did not end in 55 CPU minutes on a 2-core
    AVX2 box, twice). Per set of removed units (SLEB's rounds; PPL has one, the empty set) the
    summed NLL and token count of every candidate over the batches done; written atomically
    after each batch. `key` names the run (method, model, data, settings): a file of another run
    is one error line and is kept. Resumed, the sums, the scores and the counted passes equal an
    uninterrupted run's (the batches are the same tensors)."""

    def __init__(self, path: str | Path, key: dict[str, Any]):
        self.path, self.key = Path(path), json.loads(json.dumps(key, sort_keys=True))
        self.rounds: dict[str, dict[str, Any]] = {}
        self.earlier_wall_s = 0.0  # the killed runs' time up to their last save (cost stays honest)
        self._started = time.perf_counter()
        if self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
                rounds, their_key = saved["rounds"], saved["key"]
            except (ValueError, KeyError, TypeError):
                raise TabpError(f"{self.path}: not a readable scoring save (torn or edited); "
                                f"delete it to score from the start") from None
            if their_key != self.key:
                raise TabpError(f"{self.path}: a save of another scoring run (its method, model, "
                                f"data or settings differ); delete it or use another output")
            self.rounds, self.earlier_wall_s = rounds, float(saved.get("wall_s", 0.0))

    @staticmethod
    def _name(removed: set[int]) -> str:
        return ",".join(str(u) for u in sorted(removed))

    def progress(self, removed: set[int], units: list[int]) -> tuple[int, dict[int, list]]:
        """(batches done, per unit [NLL sum, tokens]) for the round of `removed`."""
        saved = self.rounds.get(self._name(removed))
        if saved is None or saved["units"] != list(units):
            return 0, {u: [0.0, 0] for u in units}
        return saved["batches"], {int(u): list(v) for u, v in saved["sums"].items()}

    def save(self, removed: set[int], units: list[int], batches: int,
             sums: dict[int, list]) -> None:
        from tabp_vllm.models import save_json_atomically

        self.rounds[self._name(removed)] = {"units": list(units), "batches": batches,
                                            "sums": {str(u): v for u, v in sums.items()}}
        wall = self.earlier_wall_s + time.perf_counter() - self._started
        save_json_atomically(self.path, {"key": self.key, "rounds": self.rounds,
                                         "wall_s": round(wall, 3)})


def _nll_sums(ctx: ScoreContext, output: torch.Tensor,
              inputs: dict[str, torch.Tensor]) -> tuple[float, int]:
    """One batch's summed next-token NLL and the number of tokens it sums, from the last hidden
    state after the final norm."""
    logits = ctx.model.lm_head(output).float()
    ids, att = inputs["input_ids"], inputs["attention_mask"]
    tgt = ids[:, 1:]
    valid = (att[:, 1:] * att[:, :-1]).bool()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return float(-(lp * valid).sum()), int(valid.sum())


WIKITEXT_SPLIT = "test"  # the one split of WikiText-2 in ../shared/data


def on_wikitext(ctx: ScoreContext, score: Callable[[ScoreContext], MethodResult]) -> MethodResult:
    """`score` run on generic text, as the published baselines calibrate: as many WikiText-2
    paragraphs as the task gave samples, seeded (the same cost either way); its passes count in
    `ctx`."""
    from tabp_vllm.data import load_task

    text = load_task("wikitext2", WIKITEXT_SPLIT).subset(len(ctx.dataset), ctx.seed)
    sub = replace(ctx, dataset=text, mode="text", forward_passes=0)
    result = score(sub)
    ctx.forward_passes += sub.forward_passes
    return result


class _PerplexityMethod(ScoringMethod):
    """Where the calibration text comes from: WikiText-2 (as published) or the task's own data."""

    calibration_text = "wikitext2"  # or "task"
    resumable = True  # removal_nlls saves each batch in ctx.saves

    def params(self, ctx: ScoreContext) -> dict[str, Any]:
        return {"mode": "text", "max_length": ctx.max_length,
                "calibration_text": f"wikitext2 {WIKITEXT_SPLIT}"
                if self.calibration_text == "wikitext2" else "task"}

    def score(self, ctx: ScoreContext) -> MethodResult:
        if self.calibration_text == "task":
            return self.score_on(ctx)
        return on_wikitext(ctx, self.score_on)

    def score_on(self, ctx: ScoreContext) -> MethodResult:
        raise NotImplementedError


class SLEB(_PerplexityMethod):
    """k rounds (or until a FLOPs budget is met); each removes the unit (block or sublayer) whose
    removal gives the lowest calibration PPL. Score of a unit = the log-PPL measured when it was
    chosen / last evaluated (lower = remove)."""

    name = "sleb"
    summary = "SLEB: k greedy rounds, each removing the block that least raises WikiText-2 perplexity"
    # Its ranking is the greedy removal order, not the scores: the first k rounds of a run at a
    # larger k are exactly the run at k (`at_budget`).
    ranks_all_k = True
    ranks_by_score = False  # its rounds remove, not its scores (only the rounds' units are scored)

    def forward_passes(self, samples: int, candidates: int, k: int) -> int:
        # full-pass equivalents, as the paper counts (the prefix reuse runs fewer blocks)
        return sum(candidates - r for r in range(k)) * samples

    def ranking(self, scores, params):
        return list(params["removal_order"])

    def at_budget(self, scores, params, budget):
        removed, recorded = super().at_budget(scores, params, budget)
        return removed, {**recorded, "removal_order": params["removal_order"][:len(removed)]}

    def score_on(self, ctx: ScoreContext) -> MethodResult:
        removed: set[int] = set()
        scores: list[float | None] = [None] * ctx.num_units
        remaining = list(ctx.candidates)
        budget = ctx.the_budget()
        # a FLOPs budget: the rounds are not known ahead; the bar counts up to every candidate
        rounds = ctx.k if ctx.k is not None else len(remaining)
        total = sum(len(remaining) - r for r in range(rounds)) * ctx.num_batches()
        tick = ctx.task("SLEB", total)
        order = []
        while remaining and not budget.met(removed):
            best, best_nll = None, math.inf
            nlls = removal_nlls(ctx, removed, remaining, tick)
            for b in remaining:
                nll = nlls[b]
                scores[b] = nll
                if nll < best_nll:
                    best, best_nll = b, nll
            removed.add(best)
            remaining.remove(best)
            order.append(best)
        return MethodResult(scores, sorted(removed), {"removal_order": order})


class PPLSensitivity(_PerplexityMethod):
    """Shortened LLaMA (PPL criterion): log-PPL with block i alone removed; remove the lowest."""

    name = "ppl"
    summary = "Shortened LLaMA: WikiText-2 perplexity with each block alone removed"

    def forward_passes(self, samples: int, candidates: int, k: int) -> int:
        return candidates * samples

    def score_on(self, ctx: ScoreContext) -> MethodResult:
        scores: list[float | None] = [None] * ctx.num_units
        tick = ctx.task("PPL sensitivity", len(ctx.candidates) * ctx.num_batches())
        for u, nll in removal_nlls(ctx, set(), ctx.candidates, tick).items():
            scores[u] = nll
        return MethodResult(scores, ctx.remove_lowest(scores))


class SLEBTask(SLEB):
    name = "sleb-task"
    summary = "SLEB on the task's own question + answer text (task-aligned)"
    calibration_text = "task"


class PPLSensitivityTask(PPLSensitivity):
    name = "ppl-task"
    summary = "Shortened LLaMA's criterion on the task's own question + answer text"
    calibration_text = "task"
