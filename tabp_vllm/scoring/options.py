"""`ScoreOptions`: everything `tabp-vllm score` takes, each default and help text defined once.

The scorer's own defaults have their home in `run_scoring`'s signature (the benches call it
directly); the fields below take them from there.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import field_validator, model_validator
from pydantic_core import PydanticCustomError

from tabp_vllm.options import REQUIRED, Options, option
from tabp_vllm.scoring import DEFAULT_RANGE, METHOD_NAMES, run_scoring
from tabp_vllm.scoring.units import BUDGET_ORDER_HELP


def _scoring_default(name: str) -> Any:
    """The scorer's own default (its home is `run_scoring`'s signature, which the benches call)."""
    return inspect.signature(run_scoring).parameters[name].default


DEFAULT_K = 4  # blocks removed when neither k nor ratio is given
TASK_HELP = ("Task name: a known data set (arc_easy, arc_challenge, boolq, piqa, gsm8k, wikitext2, "
             "demo), lmeval:NAME for an lm-eval task (its prompts, choices and gold, e.g. "
             "lmeval:tabp_arc_easy), or the name for --data.")


class ScoreOptions(Options):
    """Everything `score` takes; a YAML `--config` file uses these names as keys."""

    DEFAULT_K: ClassVar[int] = DEFAULT_K

    model: str = option("llama", "Alias, HF id or path.")
    task: str = option(REQUIRED, TASK_HELP)
    data: Optional[Path] = option(None, "A JSONL file (MCQA or free-text schema).")
    split: str = option("train", "Split of a known data set.")
    method: str = option(_scoring_default("method"), ", ".join(METHOD_NAMES) + ".")
    statistic: str = option(_scoring_default("statistic"), "entropy|top1|gold|gap|kl|js|ce.")
    aggregate: str = option(_scoring_default("aggregate"), "ssn|ddf.")
    p: float = option(_scoring_default("p"), "SSN norm order.")
    k: Optional[int] = option(None, "Blocks (sublayer units) to remove.",
                              shown=f"{DEFAULT_K} unless --ratio or --flops-ratio")
    ratio: Optional[float] = option(None, "Share of blocks (of the 2L units) to remove (instead "
                                    "of --k).")
    flops_ratio: Optional[float] = option(
        None, "Share of the dense model's ideal FLOPs to remove (instead of --k): the lowest-scored "
        "units go until their FLOPs reach it (the last one may overshoot).", "--flops-ratio")
    budget_order: Literal["score", "score-per-flop"] = option(
        _scoring_default("budget_order"), BUDGET_ORDER_HELP)
    granularity: Literal["block", "sublayer"] = option(
        _scoring_default("granularity"), "What a unit is: whole blocks, or each block's attention "
        "and MLP sublayers (2L units).")
    units: Optional[Literal["attention", "mlp", "both"]] = option(
        _scoring_default("units"), "With --granularity sublayer: the candidate sublayers.",
        shown="both")
    block_range: Optional[str] = option(
        _scoring_default("block_range"), "Candidate blocks: latter (B/2+1..B-1, the paper's), whole "
        "(1..B-2), after-first (1..B-1), fractions 0.5:1.0 or indices 15:30.", "--range",
        shown=f"{DEFAULT_RANGE[0]}:{DEFAULT_RANGE[1]}, the latter half")
    mode: str = option(_scoring_default("mode"), "auto|mcqa|text.")
    norm: bool = option(_scoring_default("norm"),
                        "Probe with the model's final norm before the LM head.")
    samples: Optional[int] = option(256, "Calibration samples (seeded subset).")
    batch_size: int = option(_scoring_default("batch_size"), "Samples per forward pass.")
    max_length: int = option(_scoring_default("max_length"), "Truncate samples to this many tokens.")
    text_positions: int = option(_scoring_default("text_positions"), "Text mode: positions per "
                                 "sample read out with the full vocabulary (0 = all).")
    probe: str = option(_scoring_default("probe"), "TaBP in MCQA mode: letters (the option letters "
                        "of a lettered prompt), cloze (the choices' first tokens after 'Question: "
                        "...\\nAnswer:'), auto (letters only where the model answers them clearly "
                        "above chance).")
    preset: Optional[str] = option(None, "paper: the official TaBP setting (ARC-Easy train, first "
                                   "1,024, entropy DDF, no final norm, lettered prompt, latter "
                                   "range); flags given still win.")
    first_samples: bool = option(False, "The first --samples items, not a seeded sample.",
                                 "--first-samples/--seeded-samples")
    seed: int = option(_scoring_default("seed"))
    device: str = option(_scoring_default("device"), "auto|cpu|cuda.")
    output: Path = option(REQUIRED, "Mask file to write.", "-o", "--output")

    # `--preset paper`: the official TaBP setting (scorer settings in scoring/tabp.py; the data:
    # the first 1,024 ARC-Easy train questions, for every task). A layer between the defaults and
    # what the file or the command line give: options given explicitly still win.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {"task": "arc_easy", "split": "train", "samples": 1024, "first_samples": True},
    }

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("preset") is not None:
            from tabp_vllm.scoring.tabp import PAPER_PRESET

            preset = values["preset"]
            if preset not in cls.PRESETS:
                raise PydanticCustomError("preset", "unknown preset; choose from {names}",
                                          {"names": ", ".join(cls.PRESETS)})
            layer = {**cls.PRESETS[preset], **PAPER_PRESET}
            values = {**layer, **values}
        return values

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHOD_NAMES:
            raise PydanticCustomError("method", "unknown method; choose from {names}",
                                      {"names": ", ".join(METHOD_NAMES)})
        return value

    @field_validator("samples")
    @classmethod
    def _positive_samples(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value <= 0:
            raise PydanticCustomError("samples", "must be positive")
        return value

    def blocks(self) -> tuple[Optional[int], Optional[float]]:
        """(k, ratio) for `run_scoring`: DEFAULT_K when no budget is given."""
        if self.k is None and self.ratio is None and self.flops_ratio is None:
            return self.DEFAULT_K, None
        return self.k, self.ratio
