"""What this machine offers an engine: the CPU's flags (and the dtype they call for), whether
there is a GPU and how large it is, and the node-wide lock under which engines that share a GPU
start one at a time. Imports nothing of tabp_vllm: memory, engine and serve build on it."""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable


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
