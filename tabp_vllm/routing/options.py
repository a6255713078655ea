"""`RouteFitOptions`: everything `tabp-vllm route fit` takes, each default defined once here.

The IG-Pruning paper's hyperparameters are not known (DESIGN.md, "Input-guided selection"): every
value below marked "ours" was chosen here, for a 135M model fitted on two CPU cores in about ten
minutes (N = 4, k = 4, 4 x 64 inputs). The Hard-Concrete constants (beta, l, r, the log_alpha
limit) are CoFi / Sheared-LLaMA's and live in `hardconcrete.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from tabp_vllm.options import Options

L0 = "l0"  # --mask-method: the learned Hard-Concrete gates; any registered scorer otherwise


class RouteFitOptions(Options):
    model: str = "llama"
    task: List[str] = Field(min_length=1)  # calibration tasks, mixed (known data sets)
    split: str = "train"
    samples: int = Field(64, gt=0)  # ours: inputs per task (seeded subset)
    encoder: str = "minilm"  # DESIGN.md's: all-MiniLM-L6-v2; `self` = the model's own state
    clusters: int = Field(4, gt=0)  # ours: N
    kmeans_init: int = Field(10, gt=0)  # ours: k-means restarts (scikit-learn n_init)
    k: int = Field(4, gt=0)  # blocks each cluster's mask removes
    block_range: str = "whole"  # ours: gated blocks 1..B-2 (first and last kept, as ShortGPT finds)
    mask_method: str = L0
    max_variants: Optional[int] = Field(None, gt=0)  # None: as many as distinct masks
    steps: int = Field(24, gt=0)  # ours: gate updates per cluster
    batch_size: int = Field(8, gt=0)  # ours: inputs per gate update
    max_length: int = Field(128, gt=1)  # ours: tokens per input (left-truncated: the tail stays)
    kl_positions: int = Field(32, gt=0)  # ours: last positions per input the KL is taken over
    lr: float = Field(0.1, gt=0)  # ours: Adam on log_alpha
    lambda_lr: float = Field(0.05, gt=0)  # ours: Adam ascent on lambda1, lambda2
    init_log_alpha: float = 3.0  # ours: gates start open (E[L0] = 0.99)
    warmup: float = Field(0.5, ge=0, le=1)  # ours: share of the steps the target t rises over
    seed: int = 0
    device: str = "auto"
    output: Path

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
