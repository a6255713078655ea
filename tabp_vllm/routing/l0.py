"""Training Hard-Concrete gates to a sparsity budget, until the fit has converged.

    result = train_gates(loss_of, n_units=n, budget=k, settings=GateSettings(...), seed=0)
    result = train_gates(loss_of, n, GateBudget.flops(shares, 0.107), settings, seed=0)

Model-agnostic: `loss_of(step, z)` returns the task loss (a differentiable scalar) of the gated
model with gate values `z` (one per unit) on the step's batch; the routing fit (`fit.py`) passes
the KL or LM loss of the gated LLM, the unit tests a toy stack whose useless units are known.

The loss per step is task loss + lambda1 (s_hat - t) + lambda2 (s_hat - t)^2 (`hardconcrete.py`):
log_alpha by Adam (descent); lambda1 by a PI controller on the gap s_hat - t whose integral
restarts when the gap changes sign (`PIAscent`, the default; lambda2 stays 0), or, the old way,
both lambdas by Adam ascent (`AdamAscent`, which winds up); the target t rising linearly from the
initial gates' expected sparsity to the budget's target over the warm-up.

The budget (`GateBudget`) is k units, s_hat = the expected share of units removed, 1 - mean
P(z != 0), against k / n; or a FLOPs share R, s_hat = sum_i w_i P(z_i = 0) with w_i unit i's share
of the dense model's decode FLOPs (`scoring/units.py: unit_flops_shares`, the shares `score
--flops-ratio` uses), against R. (Not normalised by the candidates' sum of w: R, the cut and
`score --flops-ratio` all count shares of the whole dense step, LM head included; only the
multiplier's force is divided by that sum, `GateBudget.pull`.) The
deterministic mask of a k budget removes the k lowest log_alpha; of a FLOPs budget, the shortest
prefix of the units in order of log_alpha (lowest first, ties: the lower index) whose FLOPs
reach R, `scoring/units.py: Budget.take`, the rule of `score` / `masks cut --flops-ratio`.

After the warm-up, training stops at the first step where the fit is **converged**, all three of:

- *on budget*: |s_hat - target| <= SPARSITY_TOL (the expected share of units, or of FLOPs,
  removed is the target);
- *decided*: the deterministic mask removes the units the gates say: every removed unit's
  P(z != 0) is below every kept one's by at least DECIDED_MARGIN;
- *flat*: the task loss's mean over the last `window` steps differs from its mean over the
  `window` steps before by at most FLAT_TOL of the latter (window: whole passes over the
  batches, at least MIN_WINDOW steps).

A fit that reaches the step cap first is returned with `converged = False` and the criteria that
failed; callers say so (a warning and a flag in the router file), never silently.

A fit on a deeper model takes hours (an L0 step on Qwen2.5-Coder-0.5B is a forward and backward
pass of 8 inputs), so it can be resumed: with a `Resume`, its whole state (gates, Adam's moments,
the multiplier, the noise generator, the curves, and the caller's own, e.g. the batch order) is
saved at most every `every_s` seconds and when it ends; an interrupted fit started again with the
same key goes on from its last save and ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from tabp_vllm.errors import TabpError
from tabp_vllm.routing import hardconcrete as hc

SPARSITY_TOL = 0.01
DECIDED_MARGIN = 0.5
FLAT_TOL = 0.1
MIN_WINDOW = 10


@dataclass(frozen=True)
class GateBudget:
    """What the gates' sparsity counts and what the deterministic mask removes: `k` of the units
    (`weights` None), or units until their FLOPs reach `target` (`weights`: each gated unit's share
    of the dense model's FLOPs)."""

    target: float
    k: int | None = None
    weights: tuple[float, ...] | None = None

    @classmethod
    def units(cls, n_units: int, k: int) -> "GateBudget":
        return cls(target=k / n_units, k=k)

    @classmethod
    def flops(cls, shares: list[float], ratio: float) -> "GateBudget":
        return cls(target=float(ratio), weights=tuple(float(w) for w in shares))

    @property
    def kind(self) -> str:
        return "units" if self.weights is None else "flops"

    def expected(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """s_hat: the expected share of units (or of the dense FLOPs) removed."""
        if self.weights is None:
            return hc.expected_sparsity(log_alpha)
        return hc.expected_removed(log_alpha, torch.tensor(self.weights, dtype=log_alpha.dtype))

    @property
    def pull(self) -> float:
        """The factor on the gap s_hat - t that the multiplier sees and the penalty applies: 1 for
        a unit budget, 1 / sum(w) for a FLOPs budget. Why: the penalty lambda1 (s_hat - t) pulls
        gate i by lambda1 w_i dP_i/dlog_alpha, against lambda1 (1/n) dP_i/dlog_alpha under a unit
        budget, for which the controller's gains (--lambda-lr, --lambda-p) were tuned; the FLOPs
        shares of the gated units sum to less than 1 (the LM head and the ungated blocks hold the
        rest), so the same gains pulled them more weakly, and the gap driving lambda1 was as much
        smaller: the demo model's first FLOPs fit lagged its target for ~100 steps (study row
        pi-sub-flops4). Divided by sum(w) = n mean(w), the constraint is the removed share of the
        *gated* FLOPs, the mean pull per gate is the unit budget's, and equal weights give exactly
        the unit budget's fit. Only the force changes: s_hat, the target, the tolerance and the
        cut still count shares of the whole dense step."""
        if self.weights is None:
            return 1.0
        total = sum(self.weights)
        return 1.0 / total if total > 0 else 1.0

    def cut(self, log_alpha: torch.Tensor | list[float]) -> list[int]:
        """The deterministic mask: the removed unit positions (0..n-1), sorted."""
        from tabp_vllm.scoring.units import Budget

        values = [float(v) for v in (log_alpha.tolist() if torch.is_tensor(log_alpha) else log_alpha)]
        ranked = sorted(range(len(values)), key=lambda j: (values[j], j))
        if self.weights is None:
            return sorted(ranked[:self.k])
        return sorted(Budget(flops_ratio=self.target, shares=self.weights).take(ranked))


class AdamAscent:
    """The old multiplier update: Adam ascent on lambda1 and lambda2 (each moves about lr per
    step whatever the gap's size). It winds up: while the gates lag behind the target the gap
    keeps its sign, lambda1 grows by lr every step, and once the gates catch up it takes as many
    steps to unwind, closing gates past the budget meanwhile (the demo model's fits oscillated
    this way and none converged: bench/results/routing/l0_study/). Kept to reproduce that."""

    def __init__(self, lambdas: torch.Tensor, lr: float):
        self.lambdas = lambdas
        self.opt = torch.optim.Adam([lambdas], lr=lr, maximize=True)

    def penalty(self, s_hat: torch.Tensor, target: float) -> torch.Tensor:
        return hc.lagrangian(s_hat, target, self.lambdas[0], self.lambdas[1])

    def step(self, s_hat: float, target: float) -> None:
        self.opt.step()
        self.opt.zero_grad()

    def state_dict(self) -> dict:
        return {"adam": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["adam"])


class PIAscent:
    """Lagrange multiplier as a PI controller on the gap g = s_hat - t (nuPI with nu = 0,
    Sohrabi et al., ICML 2024, "On PI controllers for updating Lagrange multipliers in
    constrained optimization"), with the integral restarted when the gap changes sign:

        I <- 0 if I * g < 0;   I <- I + ki * g;   lambda1 = I + kp * g

    The integral (plain gradient ascent, ki = --lambda-lr) pulls the gates to the budget against
    the task loss; the proportional term (kp = --lambda-p) answers at once when the gap shrinks.
    The restart is the anti-windup: the gates move by Adam, about lr per step whatever the force,
    so once a wound-up integral has pulled them to the target it would keep closing gates for as
    many steps as it took to wind up (the demo model's fits did: bench/results/routing/l0_study/);
    dropped at the crossing, the push ends there. Holding the budget then takes little force:
    Hard-Concrete gates at the log_alpha clamp get almost no gradient from the task loss (z is
    clamped at 0 or 1), so a closed gate stays closed. (For inequality constraints, Cooper's
    "dual restarts" reset a multiplier to 0 once its constraint holds; this is the two-sided form.)
    A P term on the multiplier is the augmented Lagrangian's quadratic penalty in another form, so
    CoFi's lambda2 (s_hat - t)^2, ascended without bound, is left out here (lambda2 stays 0)."""

    def __init__(self, lambdas: torch.Tensor, ki: float, kp: float, reset: bool = True):
        self.lambdas, self.ki, self.kp, self.reset = lambdas, ki, kp, reset
        self.integral = 0.0

    def penalty(self, s_hat: torch.Tensor, target: float) -> torch.Tensor:
        return hc.lagrangian(s_hat, target, self.lambdas[0].detach(), self.lambdas[1].detach())

    @torch.no_grad()
    def step(self, s_hat: float, target: float) -> None:
        gap = s_hat - target
        if self.reset and self.integral * gap < 0:
            self.integral = 0.0
        self.integral += self.ki * gap
        self.lambdas[0] = self.integral + self.kp * gap

    def state_dict(self) -> dict:
        return {"integral": self.integral}

    def load_state_dict(self, state: dict) -> None:
        self.integral = float(state["integral"])


MULTIPLIERS = ("pi", "adam")


def multiplier_update(kind: str, lambdas: torch.Tensor, lambda_lr: float, lambda_p: float):
    if kind == "pi":
        return PIAscent(lambdas, lambda_lr, lambda_p)
    if kind == "adam":
        return AdamAscent(lambdas, lambda_lr)
    raise ValueError(f"multiplier update {kind!r}: one of {', '.join(MULTIPLIERS)}")


def window_for(batches: int) -> int:
    """Steps per mean in the flatness check: at least MIN_WINDOW and a whole number of passes
    over the batches, so each window sees every batch about equally often."""
    return batches * max(1, -(-MIN_WINDOW // max(batches, 1)))


@dataclass(frozen=True)
class GateSettings:
    max_steps: int
    lr: float  # Adam, log_alpha
    lambda_lr: float  # pi: integral gain ki; adam: Adam's lr on lambda1 and lambda2
    init_log_alpha: float
    warmup_steps: int  # the target reaches the budget (k / n or R) at this step
    multiplier: str = "pi"  # the multipliers' update: "pi" (PIAscent) or "adam" (AdamAscent)
    lambda_p: float = 0.0  # pi: proportional gain kp
    window: int = MIN_WINDOW  # steps per mean in the flatness check


@dataclass
class GateFit:
    log_alpha: list[float]
    removed: list[int]  # unit indices (0..n-1): the deterministic mask (`GateBudget.cut`)
    steps: int
    converged: bool
    failed: list[str]  # criteria not met at the last step ("on budget", "decided", "flat")
    final: dict[str, float]  # expected sparsity, target, lambdas, loss (window mean), margin
    curves: dict[str, list[float]] = field(default_factory=dict)  # per step


@dataclass
class Resume:
    """Where a fit saves its state and what it must match to be resumed from it: `key` names
    everything the fit's result depends on (settings, budget, seed, the inputs); `caller` gets and
    sets the loss function's own state (its batch order), saved beside the gates'."""

    path: Path
    key: dict[str, Any]
    every_s: float = 60.0
    caller: tuple[Callable[[], dict], Callable[[dict], None]] | None = None
    resumed_from: int = 0  # the step the fit went on from (0: started afresh)
    earlier_wall_s: float = 0.0  # wall time spent on it before this run

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, weights_only=True)
        except Exception as e:  # a torn or foreign file: say which, keep it for the user
            raise TabpError(f"{self.path}: not a readable fit checkpoint ({type(e).__name__}); "
                            f"remove it to start the fit over") from None
        if state.get("key") != self.key:
            was, now = state.get("key") or {}, self.key
            diff = [f"{k} {was.get(k)!r} != {now.get(k)!r}" for k in sorted(set(was) | set(now))
                    if was.get(k) != now.get(k)]
            raise TabpError(f"{self.path}: an interrupted fit with other settings "
                            f"({'; '.join(diff[:3])}); rerun with its settings to resume it, or "
                            f"remove it to start over")
        return state

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({**state, "key": self.key}, tmp)
        os.replace(tmp, self.path)  # atomic: a kill mid-save leaves the previous save


def margin(log_alpha: torch.Tensor, k: int) -> float:
    """min P(z != 0) over the kept units - max over the k removed ones (1 = fully decided, < 0:
    the deterministic mask removes a unit the gates keep more of than one they keep). The mask
    removes the k lowest log_alpha under either budget (a FLOPs cut is a prefix of that order)."""
    p = hc.expected_l0(log_alpha.detach()).sort().values
    if k == 0 or k == len(p):
        return 1.0
    return float(p[k] - p[k - 1])


def flat(losses: list[float], window: int) -> bool:
    if len(losses) < 2 * window:
        return False
    now = sum(losses[-window:]) / window
    before = sum(losses[-2 * window:-window]) / window
    return abs(now - before) <= FLAT_TOL * max(abs(before), 1e-8)


def unmet(s_hat: float, target: float, decided: float, losses: list[float], window: int) -> list[str]:
    failed = []
    if abs(s_hat - target) > SPARSITY_TOL:
        failed.append("on budget")
    if decided < DECIDED_MARGIN:
        failed.append("decided")
    if not flat(losses, window):
        failed.append("flat")
    return failed


def train_gates(loss_of: Callable[[int, torch.Tensor], torch.Tensor], n_units: int,
                budget: int | GateBudget, settings: GateSettings, seed: int,
                tick: Callable[[int], None] | None = None, resume: Resume | None = None) -> GateFit:
    """Gates on `n_units` units trained on `loss_of` until converged or `settings.max_steps`;
    `budget`: k units (an int) or a `GateBudget`; `resume`: where the fit's state is saved and,
    when a save is there, resumed from."""
    s = settings
    if not isinstance(budget, GateBudget):
        budget = GateBudget.units(n_units, budget)
    if budget.weights is not None and len(budget.weights) != n_units:
        raise ValueError(f"{len(budget.weights)} FLOPs shares for {n_units} gated units")
    log_alpha = torch.full((n_units,), float(s.init_log_alpha), requires_grad=True)
    lambdas = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([log_alpha], lr=s.lr)
    ascent = multiplier_update(s.multiplier, lambdas, s.lambda_lr, s.lambda_p)
    gen = torch.Generator().manual_seed(seed)
    target = budget.target
    # the target rises from where the gates start (0.01 at log_alpha 3), not from 0: below it,
    # the multiplier's first steps push every gate open, into the clamp's dead zone (at +6 a
    # gate's E[L0] hardly moves, so a marginal gate needs a large lambda1 to leave it, and then
    # several leave at once: on a toy stack PI fits stalled there, 24/24 converge from here)
    start = min(float(budget.expected(log_alpha.detach())), target)
    pull = budget.pull  # 1 for a unit budget (x * 1.0 == x: unit fits are unchanged)
    curves: dict[str, list[float]] = {key: [] for key in
                                      ("loss", "expected_sparsity", "target", "lambda1", "lambda2", "margin")}
    failed = ["on budget", "decided", "flat"]
    step, done = 0, False
    t_run = time.perf_counter()

    def state() -> dict:
        return {"step": step, "done": done, "failed": failed, "start": start,
                "log_alpha": log_alpha.detach().clone(), "lambdas": lambdas.detach().clone(),
                "adam": opt.state_dict(), "ascent": ascent.state_dict(),
                "generator": gen.get_state(), "curves": curves,
                "wall_s": resume.earlier_wall_s + time.perf_counter() - t_run,
                "caller": resume.caller[0]() if resume.caller else {}}

    saved = resume.load() if resume else None
    if saved is not None:
        step, done, start = saved["step"], saved["done"], saved["start"]
        failed = list(saved["failed"])
        with torch.no_grad():
            log_alpha.copy_(saved["log_alpha"])
            lambdas.copy_(saved["lambdas"])
        opt.load_state_dict(saved["adam"])
        ascent.load_state_dict(saved["ascent"])
        gen.set_state(saved["generator"])
        curves = {key: list(v) for key, v in saved["curves"].items()}
        resume.resumed_from, resume.earlier_wall_s = step, float(saved["wall_s"])
        if resume.caller:
            resume.caller[1](saved["caller"])
        if tick and step:
            tick(step)
    last_save = time.perf_counter()
    while step < s.max_steps and not done:
        z = hc.sample(log_alpha, gen)
        task = loss_of(step, z)
        t = hc.target_at(step, target, s.warmup_steps, start)
        s_hat = budget.expected(log_alpha)
        loss = task + ascent.penalty(s_hat * pull, t * pull)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ascent.step(float(s_hat.detach()) * pull, t * pull)
        hc.clamp_(log_alpha)
        step += 1
        with torch.no_grad():
            s_now = float(budget.expected(log_alpha))
        m = margin(log_alpha, len(budget.cut(log_alpha.detach())))
        for key, v in (("loss", task.item()), ("expected_sparsity", s_now), ("target", t),
                       ("lambda1", lambdas[0].item()), ("lambda2", lambdas[1].item()), ("margin", m)):
            curves[key].append(float(v))
        if step >= s.warmup_steps:
            failed = unmet(s_now, target, m, curves["loss"], s.window)
            done = not failed
        if resume and not done and time.perf_counter() - last_save >= resume.every_s:
            resume.save(state())
            last_save = time.perf_counter()
        if tick:
            tick(1)
    done = True
    if resume:
        resume.save(state())
    w = min(s.window, len(curves["loss"])) or 1
    final = {"expected_sparsity": curves["expected_sparsity"][-1] if step else 0.0,
             "target": target,
             "lambda1": curves["lambda1"][-1] if step else 0.0,
             "lambda2": curves["lambda2"][-1] if step else 0.0,
             "loss": sum(curves["loss"][-w:]) / w if step else float("nan"),
             "margin": margin(log_alpha, len(budget.cut(log_alpha.detach())))}
    values = [float(v) for v in log_alpha.detach()]
    return GateFit(values, budget.cut(values), step, not failed, failed,
                   {key: round(v, 6) for key, v in final.items()}, curves)
