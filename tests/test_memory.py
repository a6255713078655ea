"""tabp_vllm/memory.py: what an engine holds, from the checkpoint's config alone (no engine)."""

from __future__ import annotations

import pytest

from tabp_vllm.memory import (CPU_APP_OVERHEAD_GIB, CPU_ENGINE_IN_REPLICA_OVERHEAD_GIB,
                              CPU_ENGINE_OVERHEAD_GIB, DEFAULT_CPU_KV_CACHE_GIB, EngineNeed, GiB,
                              cpu_memory_estimate, engine_needs, kv_bytes_per_token, weight_bytes)
from tabp_vllm.synth import ARCHS, PUBLISHED_PARAMS


def test_weight_and_kv_bytes_match_the_published_shape():
    cfg = ARCHS["llama-3.1-8b"]
    # bf16: 2 bytes a parameter; the count agrees with the published 8.03e9 to 0.5 %
    assert weight_bytes(cfg, 32, 2) / 2 == pytest.approx(PUBLISHED_PARAMS["llama-3.1-8b"], rel=5e-3)
    assert weight_bytes(ARCHS["qwen2.5-7b"], 28, 2) / 2 == pytest.approx(
        PUBLISHED_PARAMS["qwen2.5-7b"], rel=5e-3)
    # K and V, 8 KV heads x 128, 32 blocks, bf16: 128 KiB a token; kept blocks scale it
    assert kv_bytes_per_token(cfg, 32, 2) == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert kv_bytes_per_token(cfg, 24, 2) == 96 * 1024
    one_block = (weight_bytes(cfg, 32, 2) - weight_bytes(cfg, 28, 2)) / 4
    assert one_block == 2 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096)


def test_engine_needs_at_each_depth_in_the_dtype_it_runs(demo_model):
    """The demo checkpoint is float32: 4 bytes a value on a CPU asked for float32, 2 on a GPU's
    "auto" (vLLM runs it in 16 bits there); fewer kept blocks, fewer bytes."""
    from tabp_vllm.models import load_model_config

    config = load_model_config(demo_model)
    dense, pruned = engine_needs(demo_model, {"dense": 30, "k4": 26}, gpu=False, dtype="float32",
                                 replicas={"k4": 3})
    assert dense == EngineNeed("dense", weight_bytes(config, 30, 4), kv_bytes_per_token(config, 30, 4))
    assert (pruned.name, pruned.replicas) == ("k4", 3)
    assert pruned.weight_bytes < dense.weight_bytes and pruned.kv_bytes_per_token < dense.kv_bytes_per_token
    gpu = engine_needs(demo_model, {"dense": 30}, gpu=True, tensor_parallel_size=2)[0]
    assert gpu.weight_bytes * 2 == dense.weight_bytes and gpu.tensor_parallel_size == 2


def test_cpu_memory_estimate_adds_kv_overhead_and_ray():
    needs = [EngineNeed("a", 1 * GiB, 0, replicas=2), EngineNeed("b", GiB // 2, 0)]
    total, per = cpu_memory_estimate(needs)
    assert per == {"a": int(2 * (1 + DEFAULT_CPU_KV_CACHE_GIB + CPU_ENGINE_OVERHEAD_GIB) * GiB),
                   "b": int((0.5 + DEFAULT_CPU_KV_CACHE_GIB + CPU_ENGINE_OVERHEAD_GIB) * GiB)}
    assert total == int(CPU_APP_OVERHEAD_GIB * GiB) + sum(per.values())
    _, lean = cpu_memory_estimate(needs, kv_cache_gib=0.25, engine_in_replica=True)
    assert lean["b"] == int((0.5 + 0.25 + CPU_ENGINE_IN_REPLICA_OVERHEAD_GIB) * GiB)
