"""The pruned vLLM engine (our loader) generates exactly what transformers does with the same
blocks deleted, and holds proportionally fewer weight bytes."""

import gc

import pytest
import torch

from tabp_vllm.engine import build_llm, engine_model_stats
from tabp_vllm.mask import make_mask

pytestmark = pytest.mark.engine

PROMPTS = [
    "The capital of France is",
    "Question: Which gas do plants absorb from the air?\nAnswer:",
    "def fibonacci(n):\n    ",
]
MAX_TOKENS = 12
# One engine (and one transformers generation) per case: the first, a middle and the last block
# share one.
MASKS = {
    "dense": [],
    "first-middle-last": [0, 14, 29],
    "contiguous-run": [10, 11, 12, 13],
    "scattered-8": [2, 5, 9, 13, 17, 21, 25, 28],
}


@pytest.fixture(scope="module")
def hf_model(demo_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    return tok, model


def hf_greedy_with_blocks_deleted(tok, model, removed):
    layers = model.model.layers
    kept = [layer for i, layer in enumerate(layers) if i not in set(removed)]
    old_idx = [layer.self_attn.layer_idx for layer in kept]
    try:
        model.model.layers = torch.nn.ModuleList(kept)
        model.config.num_hidden_layers = len(kept)
        for new, layer in enumerate(kept):  # the KV cache is indexed by position in the stack
            layer.self_attn.layer_idx = new
        outs = []
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                gen = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False,
                                     min_new_tokens=MAX_TOKENS)
            outs.append(gen[0, ids.shape[1]:].tolist())
        return outs
    finally:
        model.model.layers = layers
        model.config.num_hidden_layers = len(layers)
        for layer, idx in zip(kept, old_idx):
            layer.self_attn.layer_idx = idx


def engine_greedy(model_path, mask, **engine_kw):
    """Greedy tokens for PROMPTS and the engine's model stats (with `kv_tokens`, its KV cache's
    capacity), from one float32 engine."""
    from vllm import SamplingParams

    llm = build_llm(model_path, mask, dtype="float32", **engine_kw)
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        stats = engine_model_stats(llm)
        cache = llm.llm_engine.vllm_config.cache_config
        stats["kv_tokens"] = cache.num_gpu_blocks * cache.block_size
        # on a CPU the offline engine runs in this process (engine.offline_engine)
        assert type(llm.llm_engine.engine_core).__name__ == "InprocClient"
        return [list(o.outputs[0].token_ids) for o in outs], stats
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def block_bytes_fp32(hf_model):
    _, model = hf_model
    return sum(p.numel() * 4 for p in model.model.layers[0].parameters())


_dense_bytes = {}


@pytest.mark.parametrize("name", list(MASKS))
def test_pruned_engine_matches_transformers(name, demo_model, hf_model, block_bytes_fp32):
    removed = MASKS[name]
    mask = make_mask(demo_model, removed, task=name) if removed else None
    vllm_tokens, stats = engine_greedy(demo_model, mask, kv_cache_gib=0.25, max_model_len=256)

    tok, model = hf_model
    assert vllm_tokens == hf_greedy_with_blocks_deleted(tok, model, removed)
    # Sanity: the masks really change the model (else parity would prove nothing).
    if removed:
        assert vllm_tokens != hf_greedy_with_blocks_deleted(tok, model, [])

    assert stats["num_layers"] == 30 - len(removed)
    if not removed:
        _dense_bytes["fp32"] = stats["weight_bytes"]
    elif "fp32" in _dense_bytes:
        assert _dense_bytes["fp32"] - stats["weight_bytes"] == len(removed) * block_bytes_fp32


# --------------------------------------------------------------------------- Qwen2 (tiny, random)

QWEN2_REMOVED = [1, 4]


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory, demo_model):
    from tiny_llama import tiny_qwen2

    model, tok = tiny_qwen2(demo_model)
    # Random 128-wide blocks barely move the residual stream; scaled up, removing two of them
    # changes the greedy tokens, so parity below is not parity of two unpruned models.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(20)
            layer.mlp.down_proj.weight.mul_(20)
    d = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d), model, tok


def test_pruned_qwen2_engine_matches_transformers(tiny_qwen2_dir):
    """One engine start: q/k/v biases, GQA and the untied head survive the renumbering loader."""
    path, model, tok = tiny_qwen2_dir
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    mask = make_mask(path, QWEN2_REMOVED, task="qwen2")
    vllm_tokens, stats = engine_greedy(path, mask, kv_cache_gib=0.05, max_model_len=128)

    pruned = hf_greedy_with_blocks_deleted(tok, model, QWEN2_REMOVED)
    assert vllm_tokens == pruned
    assert pruned != hf_greedy_with_blocks_deleted(tok, model, [])
    assert stats["num_layers"] == 6 - len(QWEN2_REMOVED)
    block_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())  # head and embedding both counted
    assert stats["weight_bytes"] == dense_bytes - len(QWEN2_REMOVED) * block_bytes


# ------------------------------------------------- sublayer masks (tiny, random; issue 33)

def scaled_tiny_dir(model, tok, d):
    # Scaled up so that removing a sublayer changes the greedy tokens (see tiny_qwen2_dir).
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(20)
            layer.mlp.down_proj.weight.mul_(20)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d), model, tok


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, demo_model):
    from tiny_llama import tiny_llama

    return scaled_tiny_dir(*tiny_llama(demo_model, hidden_size=128),
                           tmp_path_factory.mktemp("tiny-llama"))


def hf_greedy_without_sublayers(tok, model, removed_layers=(), attention=(), mlp=()):
    from tabp_vllm.sublayers import without_sublayers

    with without_sublayers(model, attention=set(attention) | set(removed_layers),
                           mlp=set(mlp) | set(removed_layers)):
        return hf_greedy_with_blocks_deleted(tok, model, [])


def unit_bytes(model, removed_layers=(), attention=(), mlp=()):
    """fp32 bytes of the tensors a sublayer mask leaves out (each sublayer with its RMSNorm)."""
    parts = {"attention": ("self_attn.", "input_layernorm."),
             "mlp": ("mlp.", "post_attention_layernorm.")}
    total = 0
    for i, layer in enumerate(model.model.layers):
        for name, p in layer.named_parameters():
            gone = (i in removed_layers or (i in attention and name.startswith(parts["attention"]))
                    or (i in mlp and name.startswith(parts["mlp"])))
            total += p.numel() * 4 if gone else 0
    return total


# (removed_layers, removed_attention, removed_mlp), 6 blocks. Block 0's attention removed is
# DeciLM's edge case (no residual yet: tabp_vllm/sublayer_model.py), and so is an attention
# removed right after a block removed whole at the start. Each mask's greedy steps in transformers
# win by a logit gap of at least 1e-3 (Qwen2's attention-only [0, 2] had a 2e-4 near-tie that
# float32 noise decided), so parity is not decided by rounding.
SUBLAYER_MASKS = {
    "llama": {
        "attention-only": ([], [0, 4], []),
        "mlp-only": ([], [], [1, 5]),
        "mixed": ([], [2, 5], [0, 4]),
        "whole-block-as-both-sublayers": ([0], [1], [4]),
    },
    "qwen2": {
        "attention-only": ([], [0, 4, 5], []),
        "mixed": ([4], [5], [1]),
    },
}
_kv_tokens: dict[tuple[str, str], int] = {}


@pytest.mark.parametrize("arch,name", [(a, n) for a, masks in SUBLAYER_MASKS.items()
                                       for n in masks])
def test_sublayer_engine_matches_transformers(arch, name, tiny_llama_dir, tiny_qwen2_dir):
    """One engine start per mask: vLLM's heterogeneous-layer model (through our hf_overrides,
    loader and registered model) generates what transformers does with the same sublayers
    skipped, holds the weight bytes of the kept units only, and sizes its KV cache by the
    attention layers kept."""
    path, model, tok = tiny_llama_dir if arch == "llama" else tiny_qwen2_dir
    layers, attention, mlp = SUBLAYER_MASKS[arch][name]
    mask = make_mask(path, layers, task=name, removed_attention=attention, removed_mlp=mlp)
    assert mask.is_sublayer
    vllm_tokens, stats = engine_greedy(path, mask, kv_cache_gib=0.05, max_model_len=128)

    expected = hf_greedy_without_sublayers(tok, model, layers, attention, mlp)
    assert vllm_tokens == expected
    assert expected != hf_greedy_without_sublayers(tok, model)  # the mask changes the answer
    assert stats["num_layers"] == 6  # no renumbering: every block keeps its slot
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())  # a tied head counted once
    assert stats["weight_bytes"] == dense_bytes - unit_bytes(model, layers, attention, mlp)

    # KV capacity in the same KV memory follows the attention layers kept (an MLP-only mask
    # keeps them all: the dense model's capacity)
    _kv_tokens[arch, name] = stats["kv_tokens"]
    if all(("llama", n) in _kv_tokens for n in ("attention-only", "mlp-only", "mixed")):
        full = _kv_tokens["llama", "mlp-only"]
        for other in ("attention-only", "mixed"):
            kept = 6 - len(SUBLAYER_MASKS["llama"][other][1])
            assert _kv_tokens["llama", other] / full == pytest.approx(6 / kept, rel=0.02)
