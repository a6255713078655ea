"""`RouteFitOptions`: everything `tabp-vllm route fit` takes, each default defined once here.

The IG-Pruning paper's hyperparameters are not known (DESIGN.md, "Input-guided selection"): every
value below marked "ours" was chosen here; the L0 ones (learning rates, warm-up, step cap, batch)
by the convergence study in bench/results/routing/l0_study/ (docs/routing.md). A fit trains until
it has converged (`routing/l0.py`), `--steps` only caps it. The Hard-Concrete constants (beta, l,
r) are CoFi / Sheared-LLaMA's and live in `hardconcrete.py` with the log_alpha limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

from pydantic import field_validator
from pydantic_core import PydanticCustomError

from tabp_vllm.options import REQUIRED, Options, option
from tabp_vllm.routing.swap import MAX_SWAPS

L0 = "l0"  # --mask-method: the learned Hard-Concrete gates; any registered scorer otherwise
# L0 defaults from the convergence study (docs/routing.md, bench/results/routing/l0_study/)
STEPS, LR, WARMUP = 300, 0.2, 0.5
# the multipliers' update (routing/l0.py): "pi" (the default) or "adam" (the old one, which wound
# up: kept to reproduce the study); --lambda-lr's default depends on it
MULTIPLIER, LAMBDA_LR, LAMBDA_P = "pi", {"pi": 20.0, "adam": 0.2}, 50.0
K = 4  # units per mask when no budget is given


class RouteFitOptions(Options):
    model: str = option("llama", "Alias, HF id or path.")
    # calibration tasks, mixed (known data sets)
    task: List[str] = option(REQUIRED, "Calibration task (repeat to mix): arc_easy, piqa, boolq, "
                             "gsm8k, ...", min_length=1)
    split: str = option("train")
    samples: int = option(64, "Inputs per task (seeded).", gt=0)  # ours
    # DESIGN.md's: all-MiniLM-L6-v2; `self` = the model's own state
    encoder: str = option("minilm", "minilm, self, or a sentence-transformers dir.")
    clusters: int = option(4, "Input clusters N (k-means).", gt=0)  # ours
    kmeans_init: int = option(10, "k-means restarts.", gt=0)  # ours (scikit-learn n_init)
    k: Optional[int] = option(None, "Units (blocks, or sublayers with --units sublayers) each "
                              "mask removes.", gt=0, shown=f"{K} unless --flops-ratio")
    # a FLOPs budget, as `score --flops-ratio` takes it (scoring/units.py: Budget): the gates'
    # expected removed FLOPs share is held at R, the mask takes units by log_alpha until R
    flops_ratio: Optional[float] = option(
        None, "Share of the dense model's ideal FLOPs each mask removes (instead of --k): the "
        "gates' expected removed FLOPs aim at it, the mask takes the lowest gates until their "
        "FLOPs reach it (the last one may overshoot).", "--flops-ratio", gt=0, lt=1)
    # the paper gates attention and FFN separately (B = 2L); ours by default: whole blocks
    units: Literal["blocks", "sublayers"] = option("blocks", "L0 gates (or a scorer's units) and "
                                                   "--k over whole blocks or attention/MLP "
                                                   "sublayers.")
    # ours: gated blocks 1..B-2 (first and last kept, as ShortGPT finds)
    block_range: str = option("whole", "Candidate blocks: whole, latter, 0.5:1.0 or 15:30.", "--range")
    mask_method: str = option(L0, "l0 (Hard-Concrete gates) or a registered scorer (tabp, "
                              "block_influence, ...).")
    # ours: 0 = no minimum; smaller clusters join the cluster of the nearest centroid
    min_cluster_size: int = option(0, "Clusters with fewer inputs merge into the nearest.", ge=0)
    # ours: the static N = 1 mask fitted on all inputs; a mask file; or none (always route)
    fallback: str = option("fit", "Mask for inputs far from every centroid: fit (the N = 1 L0 "
                           "mask on all inputs), a mask file, or none.")
    fallback_quantile: float = option(0.95, "Farther than this quantile of the calibration "
                                      "inputs' centroid distances: fallback.", gt=0, le=1)
    # None: as many as distinct masks
    max_variants: Optional[int] = option(None, "Merge clusters onto at most M masks.", gt=0)
    # the paper's LM loss (next-token cross-entropy on the cluster's own text), ours (KL to
    # dense), or the LM loss on the gold answer's tokens alone (what lm-eval's scores read)
    loss: Literal["kl", "lm", "answer"] = option("kl", "L0: kl (to the dense model), lm (next-"
                                                 "token cross-entropy) or answer (that on the "
                                                 "gold answer's tokens).")
    # ours: the gates decide their mask during the ramp and a closed gate never reopens
    # (routing/swap.py); the search mends that on the fit's own loss, at its cost in passes
    polish: Literal["swap", "none"] = option("swap", "L0: then swap single units while that "
                                             "lowers the fit's loss on the cluster's inputs "
                                             "(swap), or keep the gates' mask (none).")
    max_swaps: int = option(MAX_SWAPS, "L0 (--polish swap): most swaps per mask.", gt=0)
    steps: int = option(STEPS, "L0: most gate updates per cluster (stops once converged).", gt=0)
    batch_size: int = option(8, "Inputs per forward pass.", gt=0)  # ours: inputs per gate update
    # ours: left-truncated, the tail stays
    max_length: int = option(128, "Tokens per input (left-truncated).", gt=1)
    kl_positions: int = option(32, "L0: last positions the KL covers.", gt=0)  # ours
    lr: float = option(LR, "L0: Adam learning rate of log_alpha.", gt=0)  # ours (study)
    # ours (study): a PI controller on the multiplier with its integral reset when the gap
    # changes sign (routing/l0.py: PIAscent); adam is the old update, kept for the study
    multiplier: Literal["pi", "adam"] = option(MULTIPLIER, "L0: multiplier update: pi (PI "
                                               "controller, reset on sign change) or adam.")
    lambda_lr: Optional[float] = option(None, "L0: multiplier rate: pi's integral gain (default "
                                        f"{LAMBDA_LR['pi']:g}) or adam's lr (default "
                                        f"{LAMBDA_LR['adam']:g}).", gt=0)  # ours (study)
    lambda_p: float = option(LAMBDA_P, "L0 (pi): proportional gain of the multiplier.", ge=0)  # ours (study)
    init_log_alpha: float = option(3.0, "L0: initial log_alpha (open).")  # ours: E[L0] = 0.99
    # ours (study): the target reaches k / n after this share of the step cap
    warmup: float = option(WARMUP, "L0: share of --steps the target rises over.", ge=0, le=1)
    seed: int = option(0)
    device: str = option("auto", "auto|cpu|cuda.")
    output: Path = option(REQUIRED, "Router file to write.", "-o", "--output")

    @field_validator("flops_ratio")
    @classmethod
    def _one_budget(cls, value: Optional[float], info) -> Optional[float]:
        if value is not None and info.data.get("k") is not None:
            raise PydanticCustomError("budget", "give --k or --flops-ratio, not both")
        return value

    @property
    def units_k(self) -> Optional[int]:
        """--k, or its default when no --flops-ratio is given (None under a FLOPs budget)."""
        return self.k if self.k is not None or self.flops_ratio is not None else K

    @field_validator("mask_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from tabp_vllm.scoring.registry import METHOD_NAMES

        if value != L0 and value not in METHOD_NAMES:
            raise PydanticCustomError("method", "unknown mask method; choose from {names}",
                                      {"names": ", ".join((L0,) + METHOD_NAMES)})
        return value

    @field_validator("fallback")
    @classmethod
    def _fallback(cls, value: str) -> str:
        if value not in ("fit", "none") and not Path(value).expanduser().is_file():
            raise PydanticCustomError("fallback", "fit, none, or an existing mask file")
        return value

    @property
    def multiplier_lr(self) -> float:
        """--lambda-lr, or its default for the chosen --multiplier."""
        return self.lambda_lr if self.lambda_lr is not None else LAMBDA_LR[self.multiplier]

    def hyperparameters(self) -> dict:
        """What the router records of how it was fitted (paths and the device left out; the
        multiplier rate as used)."""
        return {**self.model_dump(mode="json", exclude={"output", "device", "model", "task"}),
                "k": self.units_k, "lambda_lr": self.multiplier_lr}
