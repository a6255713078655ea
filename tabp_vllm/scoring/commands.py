"""`tabp-vllm score`: score blocks on a task's calibration data and write a task mask."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from tabp_vllm.errors import user_errors
from tabp_vllm.options import CONFIG_HELP, options_command
from tabp_vllm.progress import progress_bars
from tabp_vllm.scoring import run_scoring
from tabp_vllm.scoring.options import ScoreOptions

console = Console(stderr=True)


@user_errors
@options_command(ScoreOptions, config_help=CONFIG_HELP.replace("; ", "; --range is block_range; "))
def score(o: ScoreOptions) -> None:
    """Score blocks on a task's calibration data and write a task mask."""
    run_score(o)


def score_with_options(o: ScoreOptions, *, k: int | None = None, model_and_tokenizer: Any = None,
                       progress: Any = None, checkpoint: Any = None) -> Any:
    """The scoring run `o` describes (its data, its sample, its scorer settings) as a
    `ScoringResult`; `k` overrides the options' k (the comparison report scores each method once at
    its largest k); `checkpoint`: run_scoring's (SLEB's and PPL's saved progress). The CLI and
    bench/compare.py both come through here."""
    from tabp_vllm.data import load_task
    from tabp_vllm.models import resolve_model

    data = load_task(o.task, o.split, o.data)
    ds = data.first(o.samples) if o.first_samples else data.subset(o.samples, o.seed)
    kk, ratio = (k, None) if k is not None else o.blocks()
    return run_scoring(resolve_model(o.model), ds, o.method, k=kk, ratio=ratio,
                       flops_ratio=None if k is not None else o.flops_ratio,
                       budget_order="score" if k is not None else o.budget_order,
                       granularity=o.granularity, units=o.units, block_range=o.block_range, mode=o.mode, statistic=o.statistic,
                       aggregate=o.aggregate, p=o.p, norm=o.norm, batch_size=o.batch_size,
                       max_length=o.max_length, text_positions=o.text_positions, probe=o.probe,
                       preset=o.preset, seed=o.seed, device=o.device,
                       model_and_tokenizer=model_and_tokenizer, progress=progress,
                       checkpoint=checkpoint)


def run_score(o: ScoreOptions) -> None:
    from tabp_vllm.data import LMEVAL_PREFIX
    from tabp_vllm.models import alias_of, resolve_model
    from tabp_vllm.scoring import score_to_mask

    # SLEB's and PPL's progress, kept beside the output until the mask is written: the same
    # command rerun after a kill goes on from the last batch
    partial = Path(f"{o.output}.partial.json")
    with progress_bars(console) as progress:
        res = score_with_options(o, progress=progress, checkpoint=partial)
    # an lm-eval task's mask is named after the task (variant `llama-tabp_arc_easy`); the
    # calibration provenance says it came from lm-eval
    task = o.task.removeprefix(LMEVAL_PREFIX)
    mask = score_to_mask(resolve_model(o.model), res, task=task, model_id=alias_of(o.model))
    mask.save(o.output)
    partial.unlink(missing_ok=True)
    removed = (f"removed {res.removed}" if not mask.is_sublayer else
               f"removed units {res.removed} (blocks {mask.removed_layers}, attention of "
               f"{mask.removed_attention}, MLP of {mask.removed_mlp})")
    flops = res.params.get("removed_flops_fraction")
    console.print(f"wrote {o.output}: method={res.method} {removed} "
                  f"({mask.num_kept}/{mask.num_hidden_layers} kept"
                  f"{'' if flops is None else f', {flops:.1%} of the FLOPs removed'}), "
                  f"{res.calibration['samples']} samples, "
                  f"{res.forward_passes} forward passes, {res.wall_s:.1f} s")
