"""`BenchOptions`: every option of `tabp-vllm bench`, each default defined here once.

The CLI (`tabp-vllm bench`, optionally with `--config bench.yaml`), `run_bench(...)` and the bench
scripts all build this model; `loadgen.BenchPlan` takes its workload fields from it. Precedence:
CLI flag > config file > the default below (see `tabp_vllm.options`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from tabp_vllm.engine import DEFAULT_MAX_MODEL_LEN
from tabp_vllm.memory import DEFAULT_CPU_KV_CACHE_GIB
from tabp_vllm.options import REQUIRED, Options, option

DEFAULT_URL = "http://127.0.0.1:8000"


class BenchOptions(Options):
    """What to measure, the workload, where results go, and (with `start`) the servers to start."""

    # ---- what: servers and variants
    url: str = option(DEFAULT_URL, "The OpenAI endpoint (tabp-vllm serve).")
    variants: Optional[list[str]] = option(
        None, "Variant to measure, as the request's `model` (repeatable): NAME, or NAME@URL for a "
        "variant on another server.", "--variant", "-v", shown="every model the server lists")
    model: str = option("llama", "Base model (alias/path): its config gives the FLOPs model.",
                        "--model", "-m")
    masks: list[str] = option(REQUIRED, "[VARIANT=]mask.json (repeatable): the kept blocks of a "
                              "variant, for the ideal speedup; default variant name <model>-<task>.",
                              "--mask", default_factory=list)
    dense: Optional[str] = option(None, "The dense variant.", shown="the one named like --model")
    bare_vllm: Optional[str] = option(None, "[NAME@]URL of a bare `vllm serve` of the dense model: "
                                      "measured interleaved too, for the server-overhead ratio.")
    # ---- workload
    mode: Literal["closed", "open"] = option(
        "closed", "closed (fixed concurrency) or open (Poisson request rate).")
    levels: list[float] = option(
        REQUIRED, "Concurrencies (closed) or request rates (open), comma-separated.", cli_type=str,
        default_factory=lambda: [1.0, 4.0, 16.0, 64.0])
    duration: float = option(60.0, "Measured seconds per variant per level (all rounds).", gt=0)
    rounds: int = option(4, "Interleaved slices per variant per level (even: mirrored pairs "
                         "cancel drift).", ge=1)
    ramp: float = option(5.0, "Unmeasured seconds of load before each slice (closed loop: "
                         "staggered start).", ge=0)
    warmup: int = option(4, "Warm-up requests per variant.", ge=0)
    seed: int = option(0)
    input_len: int = option(128, "Synthetic prompt tokens (mean).", ge=1)
    output_len: int = option(64, "Output tokens (mean; EOS ignored).", ge=1)
    range_ratio: float = option(0.5, "Lengths uniform in len*(1 +- ratio).", ge=0, le=1)
    dataset: Optional[str] = option(None, "JSONL {prompt, max_tokens?} instead of synthetic.")
    max_concurrency: Optional[int] = option(None, "Open loop: cap on requests in flight.", ge=1)
    # ---- output
    out: Path = option(Path("bench/results"), "Output directory.")
    stem: str = option("serving", "Output file stem.", "--name")
    notes: Optional[str] = option(None, "Free text stored in the JSON.")
    # ---- with `start`: one api_server per variant
    start: bool = option(False, "Start one api_server per variant (dense + each --mask) instead "
                         "of using --url.", "--start")
    start_bare: bool = option(False, "With --start: also a bare vLLM.", "--start-bare")
    port: int = option(8100, "With --start: first port.")
    kv_cache_gib: Optional[float] = option(
        None, "With --start (CPU): KV cache per engine, GiB.", gt=0,
        shown=f"engine default, {DEFAULT_CPU_KV_CACHE_GIB:g} on CPU")
    max_model_len: int = option(DEFAULT_MAX_MODEL_LEN, "With --start: context length per engine.",
                                ge=1)

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
