"""`tabp-vllm score` and `tabp-vllm eval` (wired into tabp_vllm/cli.py as commands).

Each command's options are one pydantic model (`ScoreOptions`, `EvalOptions`) holding every
default once; the typer options default to None ("not given") and show the model's default in
their help, and `build_options` merges CLI flag > `--config` YAML file > default.
"""

from __future__ import annotations

import inspect
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, List, Optional

import typer
from pydantic import field_validator, model_validator
from pydantic_core import PydanticCustomError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tabp_vllm.engine import DEFAULT_CPU_KV_CACHE_GIB
from tabp_vllm.errors import TabpError, user_errors
from tabp_vllm.options import Options, build_options
from tabp_vllm.scoring import DEFAULT_RANGE, METHOD_NAMES, run_scoring

console = Console(stderr=True)


def _scoring_default(name: str) -> Any:
    """The scorer's own default (its home is `run_scoring`'s signature, which the benches call)."""
    return inspect.signature(run_scoring).parameters[name].default


class ScoreOptions(Options):
    """Everything `score` takes; a YAML `--config` file uses these names as keys."""

    DEFAULT_K: ClassVar[int] = 4  # blocks removed when neither k nor ratio is given

    model: str = "llama"
    task: str
    data: Optional[Path] = None
    split: str = "train"
    method: str = _scoring_default("method")
    statistic: str = _scoring_default("statistic")
    aggregate: str = _scoring_default("aggregate")
    p: float = _scoring_default("p")
    k: Optional[int] = None
    ratio: Optional[float] = None
    block_range: Optional[str] = _scoring_default("block_range")
    mode: str = _scoring_default("mode")
    norm: bool = _scoring_default("norm")
    samples: Optional[int] = 256
    batch_size: int = _scoring_default("batch_size")
    max_length: int = _scoring_default("max_length")
    text_positions: int = _scoring_default("text_positions")
    probe: str = _scoring_default("probe")
    preset: Optional[str] = None
    first_samples: bool = False  # the first --samples items instead of a seeded sample
    seed: int = _scoring_default("seed")
    device: str = _scoring_default("device")
    output: Path

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
        """(k, ratio) for `run_scoring`: DEFAULT_K when neither is given."""
        if self.k is None and self.ratio is None:
            return self.DEFAULT_K, None
        return self.k, self.ratio

    @classmethod
    def shown(cls, name: str) -> str:
        lo, hi = DEFAULT_RANGE
        special = {"k": f"{cls.DEFAULT_K} unless --ratio", "block_range": f"{lo}:{hi}, the latter half"}
        return special.get(name) or _shown(cls.default(name))


class EvalOptions(Options):
    """Everything `eval` takes."""

    model: str = "llama"
    task: str  # lm-eval task names, comma-separated (the offline ones: tabp_arc_easy, ...)
    data: Optional[Path] = None
    task_mask: List[Path] = []
    dense: bool = True
    limit: Optional[int] = None
    kv_cache_gib: Optional[float] = None  # None: the engine's default (engine.DEFAULT_CPU_KV_CACHE_GIB)
    output: Optional[Path] = None
    router: Optional[Path] = None  # also evaluate the routed model: each item by its cluster's mask

    @classmethod
    def shown(cls, name: str) -> str:
        special = {"kv_cache_gib": f"the engine's, {DEFAULT_CPU_KV_CACHE_GIB:g} on CPU", "limit": "all"}
        return special.get(name) or _shown(cls.default(name))


def _shown(value: Any) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _opt(cls: type, name: str, *flags: str, help: str = "", **kw: Any) -> Any:
    """A typer option for field `name` of `cls`: None when not given, the model's default shown
    in the help (the default itself lives only in the model)."""
    shown = f"\\[default: {cls.shown(name)}]"  # "\\[": a literal "[" for rich
    return typer.Option(None, *flags, help=f"{help} {shown}" if help else shown,
                        show_default=False, **kw)


def _required(help: str, *flags: str) -> Any:
    return typer.Option(None, *flags, help=f"{help} \\[required, here or in --config]",
                        show_default=False)


SCORE_TASK_HELP = ("Task name: a known data set (arc_easy, arc_challenge, boolq, piqa, gsm8k, "
                   "wikitext2, demo), lmeval:NAME for an lm-eval task (its prompts, choices and "
                   "gold, e.g. lmeval:tabp_arc_easy), or the name for --data.")
EVAL_TASK_HELP = ("lm-eval task names, comma-separated: the offline tabp_arc_easy, "
                  "tabp_arc_challenge, tabp_piqa, tabp_boolq, tabp_demo, lm-eval's own (arc_easy, "
                  "...) where their data can be had, or the name for --data.")


def _config_option(note: str = "") -> Any:
    return typer.Option(None, "--config", "-c", help="YAML file of these options (keys as the "
                        f"option names with '_' for '-'; {note}flags given win).")


@user_errors
def score(
    config: Optional[Path] = _config_option("--range is block_range; "),
    model: Optional[str] = _opt(ScoreOptions, "model", help="Alias, HF id or path."),
    task: Optional[str] = _required(SCORE_TASK_HELP),
    data: Optional[Path] = _opt(ScoreOptions, "data", help="A JSONL file (MCQA or free-text schema)."),
    split: Optional[str] = _opt(ScoreOptions, "split", help="Split of a known data set."),
    method: Optional[str] = _opt(ScoreOptions, "method", help=", ".join(METHOD_NAMES) + "."),
    statistic: Optional[str] = _opt(ScoreOptions, "statistic", help="entropy|top1|gold|gap|kl|js|ce."),
    aggregate: Optional[str] = _opt(ScoreOptions, "aggregate", help="ssn|ddf."),
    p: Optional[float] = _opt(ScoreOptions, "p", "--p", help="SSN norm order."),
    k: Optional[int] = _opt(ScoreOptions, "k", "--k", help="Blocks to remove."),
    ratio: Optional[float] = _opt(ScoreOptions, "ratio",
                                  help="Share of blocks to remove (instead of --k)."),
    block_range: Optional[str] = _opt(ScoreOptions, "block_range", "--range",
                                      help="Candidate blocks: latter (B/2+1..B-1, the paper's), "
                                           "whole (1..B-2), fractions 0.5:1.0 or indices 15:30."),
    probe: Optional[str] = _opt(ScoreOptions, "probe",
                                help="TaBP in MCQA mode: letters (the option letters of a lettered "
                                     "prompt), cloze (the choices' first tokens after "
                                     "'Question: ...\\nAnswer:'), auto (letters only where the "
                                     "model answers them clearly above chance)."),
    preset: Optional[str] = _opt(ScoreOptions, "preset",
                                 help="paper: the official TaBP setting (ARC-Easy train, first "
                                      "1,024, entropy DDF, no final norm, lettered prompt, "
                                      "latter range); flags given still win."),
    first_samples: Optional[bool] = _opt(ScoreOptions, "first_samples",
                                         "--first-samples/--seeded-samples",
                                         help="The first --samples items, not a seeded sample."),
    mode: Optional[str] = _opt(ScoreOptions, "mode", help="auto|mcqa|text."),
    norm: Optional[bool] = _opt(ScoreOptions, "norm", "--norm/--no-norm",
                                help="Probe with the model's final norm before the LM head."),
    samples: Optional[int] = _opt(ScoreOptions, "samples", help="Calibration samples (seeded subset)."),
    batch_size: Optional[int] = _opt(ScoreOptions, "batch_size", help="Samples per forward pass."),
    max_length: Optional[int] = _opt(ScoreOptions, "max_length",
                                     help="Truncate samples to this many tokens."),
    text_positions: Optional[int] = _opt(
        ScoreOptions, "text_positions",
        help="Text mode: positions per sample read out with the full vocabulary (0 = all)."),
    seed: Optional[int] = _opt(ScoreOptions, "seed"),
    device: Optional[str] = _opt(ScoreOptions, "device", help="auto|cpu|cuda."),
    output: Optional[Path] = _required("Mask file to write.", "-o", "--output"),
) -> None:
    """Score blocks on a task's calibration data and write a task mask."""
    given = {name: value for name, value in locals().items() if name != "config"}
    run_score(build_options(ScoreOptions, given, config))


def score_with_options(o: ScoreOptions, *, k: int | None = None, model_and_tokenizer: Any = None,
                       progress: Any = None) -> Any:
    """The scoring run `o` describes (its data, its sample, its scorer settings) as a
    `ScoringResult`; `k` overrides the options' k (the comparison report scores each method once at
    its largest k). The CLI and bench/compare_v2.py both come through here."""
    from tabp_vllm.data import load_task
    from tabp_vllm.models import resolve_model

    data = load_task(o.task, o.split, o.data)
    ds = data.first(o.samples) if o.first_samples else data.subset(o.samples, o.seed)
    kk, ratio = (k, None) if k is not None else o.blocks()
    return run_scoring(resolve_model(o.model), ds, o.method, k=kk, ratio=ratio,
                       block_range=o.block_range, mode=o.mode, statistic=o.statistic,
                       aggregate=o.aggregate, p=o.p, norm=o.norm, batch_size=o.batch_size,
                       max_length=o.max_length, text_positions=o.text_positions, probe=o.probe,
                       preset=o.preset, seed=o.seed, device=o.device,
                       model_and_tokenizer=model_and_tokenizer, progress=progress)


@contextmanager
def progress_bars(out: Console = console) -> Iterator[Callable[[str, int], Callable[..., None]]]:
    """Rich progress bars for long work: yields `progress(description, total)`, which adds a bar
    and returns its `advance(n=1)` (the callback `run_scoring` and `fit_router` take)."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=out, transient=False) as prog:
        def progress(desc: str, total: int) -> Callable[..., None]:
            tid = prog.add_task(desc, total=total)
            return lambda n=1: prog.advance(tid, n)

        yield progress


def run_score(o: ScoreOptions) -> None:
    from tabp_vllm.data import LMEVAL_PREFIX
    from tabp_vllm.models import alias_of, resolve_model
    from tabp_vllm.scoring import score_to_mask

    with progress_bars() as progress:
        res = score_with_options(o, progress=progress)
    # an lm-eval task's mask is named after the task (variant `llama-tabp_arc_easy`); the
    # calibration provenance says it came from lm-eval
    task = o.task.removeprefix(LMEVAL_PREFIX)
    mask = score_to_mask(resolve_model(o.model), res, task=task, model_id=alias_of(o.model))
    mask.save(o.output)
    console.print(f"wrote {o.output}: method={res.method} removed {res.removed} "
                  f"({mask.num_kept}/{mask.num_hidden_layers} kept), "
                  f"{res.calibration['samples']} samples, "
                  f"{res.forward_passes} forward passes, {res.wall_s:.1f} s")


@user_errors
def eval(  # noqa: A001 - the command is called eval
    config: Optional[Path] = _config_option(),
    model: Optional[str] = _opt(EvalOptions, "model", help="Alias, HF id or path."),
    task: Optional[str] = _required(EVAL_TASK_HELP),
    data: Optional[Path] = _opt(EvalOptions, "data", help="A JSONL file in the MCQA schema."),
    task_mask: Optional[List[Path]] = typer.Option(None, "--task-mask",
                                                   help="Mask file (repeatable)."),
    dense: Optional[bool] = _opt(EvalOptions, "dense", "--dense/--no-dense",
                                 help="Evaluate the dense model too."),
    limit: Optional[int] = _opt(EvalOptions, "limit", help="Evaluate the first N documents per task."),
    kv_cache_gib: Optional[float] = _opt(EvalOptions, "kv_cache_gib", help="KV cache per engine, GiB."),
    output: Optional[Path] = _opt(EvalOptions, "output", "-o", "--output", help="Results JSON."),
    router: Optional[Path] = _opt(EvalOptions, "router", help=(
        "A router file: also evaluate the routed model (each item answered by the mask of its "
        "question's cluster).")),
) -> None:
    """Zero-shot accuracy of dense and pruned variants through lm-evaluation-harness."""
    given = {name: value for name, value in locals().items() if name != "config"}
    given["task_mask"] = given["task_mask"] or None  # typer gives [] for "not given"
    run_eval(build_options(EvalOptions, given, config))


def run_eval(o: EvalOptions) -> None:
    import tempfile

    from tabp_vllm.evaluate import check_tasks, evaluate_variant, jsonl_task_folder
    from tabp_vllm.mask import load_mask
    from tabp_vllm.models import load_model_config, model_fingerprint, resolve_model

    tasks = [t.strip() for t in o.task.split(",") if t.strip()]
    if not tasks:
        raise TabpError("--task: no task named")
    if o.data is not None and len(tasks) != 1:
        raise TabpError("--data names one task: give one --task name for it")
    path = resolve_model(o.model)
    for m in o.task_mask:  # validate every mask before any engine starts
        load_mask(m, path)
    router = encoder = None
    if o.router is not None:  # the router and its encoder too
        from tabp_vllm.routing.router import load_router, open_encoder

        # open_encoder loads it once and checks its dimension (load_router's check would load it
        # a second time)
        router = load_router(o.router, path)
        encoder = open_encoder(router, str(o.router), model_path=path)
    variants: list[tuple[str, Optional[str]]] = [("dense", None)] if o.dense else []
    variants += [(m.stem, str(m)) for m in o.task_mask]
    if not variants and router is None:
        raise TabpError("nothing to evaluate: --no-dense and no --task-mask or --router")
    routed = None
    with tempfile.TemporaryDirectory(prefix="tabp-tasks-") as tmp:
        include = [jsonl_task_folder(tasks[0], o.data, tmp)] if o.data is not None else []
        sizes = check_tasks(tasks, include)  # every task and its data, before any engine
        rows = []
        for name, mpath in variants:
            n = {t: min(s, o.limit) if o.limit else s for t, s in sizes.items()}
            console.print(f"evaluating {name} on {', '.join(f'{t} ({n[t]})' for t in tasks)} ...")
            r = evaluate_variant(path, tasks, mpath, limit=o.limit, kv_cache_gib=o.kv_cache_gib,
                                 include=include)
            r.update(variant=name, mask=mpath)
            rows.append(r)
        if router is not None:
            from functools import partial

            from tabp_vllm.routing.evaluate import evaluate_routed

            routed = evaluate_routed(
                path, router, encoder, tasks, include=include, limit=o.limit, workdir=Path(tmp),
                run_variant=partial(evaluate_variant, kv_cache_gib=o.kv_cache_gib, include=include),
                say=console.print)
            routed.update(variant="routed", router_file=str(o.router))
    total = model_fingerprint(load_model_config(path))["num_hidden_layers"]
    table = Table("variant", "blocks kept", "task", "metric", "value", "stderr", "n",
                  title="lm-eval, zero-shot")
    for r in rows:
        kept = r["blocks_kept"] if r["blocks_kept"] is not None else total
        for t in tasks:
            m = r["results"][t]
            for key, value in m.items():
                metric, _, flt = key.partition(",")
                if metric in ("alias",) or metric.endswith("_stderr") or not flt:
                    continue
                err = m.get(f"{metric}_stderr,{flt}")
                table.add_row(r["variant"], f"{kept}/{total}", t, metric, f"{value:.4f}",
                              f"{err:.4f}" if isinstance(err, float) else "-",
                              str(r["n-samples"][t]["effective"]))
    if routed is not None:
        for t in tasks:
            for metric, m in routed["results"][t].items():
                table.add_row(f"routed ({router.num_clusters} clusters)", f"{total - router.k}/{total}",
                              t, metric, f"{m['value']:.4f}", f"{m['stderr']:.4f}", str(m["n"]))
    Console(width=None if sys.stdout.isatty() else 150).print(table)  # a log: no wrapped cells
    if routed is not None:
        for t in tasks:
            mix = ", ".join(f"cluster {c}: {n}" for c, n in routed["cluster_mix"][t].items())
            console.print(f"{t}: documents per cluster: {mix}")
    if o.output:
        o.output.parent.mkdir(parents=True, exist_ok=True)
        o.output.write_text(json.dumps({"model": o.model, "tasks": tasks, "limit": o.limit,
                                        "data": str(o.data) if o.data else None,
                                        "results": rows, "routed": routed}, indent=2) + "\n")
        console.print(f"wrote {o.output}")
