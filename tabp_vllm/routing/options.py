"""`RouteFitOptions`: everything `tabp-vllm route fit` takes, each default defined once here.

The IG-Pruning paper's hyperparameters are not known (DESIGN.md, "Input-guided selection"): every
value below marked "ours" was chosen here, for a 135M model fitted on two CPU cores in about ten
minutes (N = 4, k = 4, 4 x 64 inputs). The Hard-Concrete constants (beta, l, r, the log_alpha
limit) are CoFi / Sheared-LLaMA's and live in `hardconcrete.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from pydantic import field_validator
from pydantic_core import PydanticCustomError

from tabp_vllm.options import REQUIRED, Options, option

L0 = "l0"  # --mask-method: the learned Hard-Concrete gates; any registered scorer otherwise


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
    k: int = option(4, "Blocks each cluster's mask removes.", gt=0)
    # ours: gated blocks 1..B-2 (first and last kept, as ShortGPT finds)
    block_range: str = option("whole", "Candidate blocks: whole, latter, 0.5:1.0 or 15:30.", "--range")
    mask_method: str = option(L0, "l0 (Hard-Concrete gates) or a registered scorer (tabp, "
                              "block_influence, ...).")
    # None: as many as distinct masks
    max_variants: Optional[int] = option(None, "Merge clusters onto at most M masks.", gt=0)
    steps: int = option(24, "L0: gate updates per cluster.", gt=0)  # ours
    batch_size: int = option(8, "Inputs per forward pass.", gt=0)  # ours: inputs per gate update
    # ours: left-truncated, the tail stays
    max_length: int = option(128, "Tokens per input (left-truncated).", gt=1)
    kl_positions: int = option(32, "L0: last positions the KL covers.", gt=0)  # ours
    lr: float = option(0.1, "L0: Adam learning rate of log_alpha.", gt=0)  # ours
    lambda_lr: float = option(0.05, "L0: ascent rate of the lambdas.", gt=0)  # ours: on lambda1, 2
    init_log_alpha: float = option(3.0, "L0: initial log_alpha (open).")  # ours: E[L0] = 0.99
    warmup: float = option(0.5, "L0: share of steps the target rises over.", ge=0, le=1)  # ours
    seed: int = option(0)
    device: str = option("auto", "auto|cpu|cuda.")
    output: Path = option(REQUIRED, "Router file to write.", "-o", "--output")

    @field_validator("mask_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from tabp_vllm.scoring.registry import METHOD_NAMES

        if value != L0 and value not in METHOD_NAMES:
            raise PydanticCustomError("method", "unknown mask method; choose from {names}",
                                      {"names": ", ".join((L0,) + METHOD_NAMES)})
        return value

    def hyperparameters(self) -> dict:
        """What the router records of how it was fitted (paths and the device left out)."""
        return self.model_dump(mode="json", exclude={"output", "device", "model", "task"})
