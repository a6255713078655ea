"""`EvalOptions`: everything `tabp-vllm eval` takes, each default and help text defined once."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from tabp_vllm.memory import DEFAULT_CPU_KV_CACHE_GIB
from tabp_vllm.options import REQUIRED, Options, option

TASK_HELP = ("lm-eval task names, comma-separated: the offline tabp_arc_easy, tabp_arc_challenge, "
             "tabp_piqa, tabp_boolq, tabp_demo, lm-eval's own (arc_easy, ...) where their data can "
             "be had, a task of --include-path, or the name for --data.")


class EvalOptions(Options):
    """Everything `eval` takes."""

    model: str = option("llama", "Alias, HF id or path.")
    task: str = option(REQUIRED, TASK_HELP)
    data: Optional[Path] = option(None, "A JSONL file in the MCQA schema.")
    include_path: Optional[Path] = option(
        None, "A folder of your own lm-eval YAML tasks (lm-eval's --include_path), named in --task.",
        "--include-path", "--include_path")
    task_mask: List[Path] = option([], "Mask file (repeatable).")
    dense: bool = option(True, "Evaluate the dense model too.")
    limit: Optional[int] = option(None, "Evaluate the first N documents per task.", shown="all")
    kv_cache_gib: Optional[float] = option(
        None, "KV cache per engine, GiB.", shown=f"the engine's, {DEFAULT_CPU_KV_CACHE_GIB:g} on CPU")
    output: Optional[Path] = option(None, "Results JSON.", "-o", "--output")
    router: Optional[Path] = option(None, "A router file: also evaluate the routed model (each "
                                    "item answered by the mask of its question's cluster).")
