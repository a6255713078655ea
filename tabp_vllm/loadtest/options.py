"""`BenchOptions`: every option of `tabp-vllm bench`, each default defined here once.

The CLI (`tabp-vllm bench`, optionally with `--config bench.yaml`), `run_bench(...)` and the bench
scripts all build this model; `loadgen.BenchPlan` takes its workload fields from it. Precedence:
CLI flag > config file > the default below (see `tabp_vllm.options`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from tabp_vllm.options import Options

DEFAULT_URL = "http://127.0.0.1:8000"


class BenchOptions(Options):
    """What to measure, the workload, where results go, and (with `start`) the servers to start."""

    # ---- what: servers and variants
    url: str = DEFAULT_URL
    variants: Optional[list[str]] = None       # None: every model the server lists
    model: str = "llama"                       # its config gives the FLOPs model
    masks: list[str] = Field(default_factory=list)  # [VARIANT=]mask.json
    dense: Optional[str] = None                # None: the variant named like `model`
    bare_vllm: Optional[str] = None            # [NAME@]URL of a bare vLLM server
    # ---- workload
    mode: Literal["closed", "open"] = "closed"
    levels: list[float] = Field(default_factory=lambda: [1.0, 4.0, 16.0, 64.0])
    duration: float = Field(60.0, gt=0)        # measured seconds per variant per level
    rounds: int = Field(4, ge=1)               # even: mirrored pairs cancel linear drift
    ramp: float = Field(5.0, ge=0)             # unmeasured load before each slice
    warmup: int = Field(4, ge=0)               # warm-up requests per variant
    seed: int = 0
    input_len: int = Field(128, ge=1)
    output_len: int = Field(64, ge=1)
    range_ratio: float = Field(0.5, ge=0, le=1)  # lengths uniform in len * (1 +- ratio)
    dataset: Optional[str] = None              # JSONL instead of synthetic prompts
    max_concurrency: Optional[int] = Field(None, ge=1)  # open loop: cap on requests in flight
    # ---- output
    out: Path = Path("bench/results")
    stem: str = "serving"                      # output file stem (CLI --name)
    notes: Optional[str] = None
    # ---- with `start`: one api_server per variant
    start: bool = False
    start_bare: bool = False
    port: int = 8100
    kv_cache_gib: Optional[float] = Field(None, gt=0)  # None: engine.DEFAULT_CPU_KV_CACHE_GIB
    max_model_len: int = Field(1024, ge=1)

    @field_validator("levels", mode="before")
    @classmethod
    def _split_levels(cls, value):
        """`levels` may be "1,4,16" (the CLI's and the scripts' form) or a list."""
        if isinstance(value, str):
            try:
                value = [float(x) for x in value.split(",") if x.strip()]
            except ValueError:
                raise PydanticCustomError(
                    "levels", "expected numbers separated by commas") from None
        if isinstance(value, (int, float)):
            value = [value]
        return value

    @field_validator("levels")
    @classmethod
    def _check_levels(cls, value: list[float], info: ValidationInfo) -> list[float]:
        if not value or any(x <= 0 for x in value):
            raise PydanticCustomError("levels", "expected positive numbers")
        if info.data.get("mode", "closed") == "closed" and any(x != int(x) for x in value):
            raise PydanticCustomError("levels", "closed-loop levels are whole concurrencies")
        return value

    @classmethod
    def shown(cls, name: str) -> str:
        """The default of `name` as the CLI help shows it."""
        value = cls.default(name)
        if name == "levels":
            return ",".join(f"{x:g}" for x in value)
        return "engine default" if value is None and name == "kv_cache_gib" else str(value)
