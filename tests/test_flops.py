"""The FLOPs model against numbers computed by hand for the demo model's shape."""

import pytest

from tabp_vllm.flops import DecoderShape, flops_per_token, ideal_speedup, request_flops

# SmolLM2-135M: hidden 576, 9 heads / 3 KV heads, head_dim 64, intermediate 1536, vocab 49152.
DEMO = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 30,
        "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536, "vocab_size": 49152, "hidden_act": "silu",
        "tie_word_embeddings": True}

# By hand: q 2*576*576 = 663,552; k and v 2*576*192 = 221,184 each; o 663,552;
# MLP 3 * 2*576*1536 = 5,308,416. Block = 7,077,888. LM head 2*576*49152 = 56,623,104.
BLOCK = 663_552 + 2 * 221_184 + 663_552 + 5_308_416
HEAD = 56_623_104


def test_shape_from_config_derives_head_dim_and_gqa():
    s = DecoderShape.from_config(DEMO)
    assert (s.head_dim, s.num_key_value_heads, s.gated_mlp) == (64, 3, True)
    assert s.block_linear_flops() == BLOCK == 7_077_888
    assert s.lm_head_flops() == HEAD


def test_flops_per_token_counts_attention_at_context():
    s = DecoderShape.from_config(DEMO)
    # attention: 2 (QK^T) + 2 (AV) multiply-adds... = 4 * 9 heads * 64 * ctx = 2304 * ctx per block
    f = flops_per_token(s, 30, context=100)
    assert f["blocks"] == 30 * (BLOCK + 2304 * 100)
    assert f["lm_head"] == HEAD and f["embedding"] == 0
    assert f["total"] == 30 * (BLOCK + 230_400) + HEAD == 275_871_744
    assert flops_per_token(s, 22, 100)["total"] == 22 * (BLOCK + 230_400) + HEAD


def test_request_flops_prefill_and_decode_by_hand():
    s = DecoderShape.from_config(DEMO)
    # prompt 3, output 2: prefill 3 tokens (attention over 1, 2, 3 keys) + one LM head;
    # then one decode step over 4 keys with its LM head.
    prefill = 30 * (3 * BLOCK + 2304 * (1 + 2 + 3)) + HEAD
    decode = 30 * (BLOCK + 2304 * 4) + HEAD
    assert request_flops(s, 30, 3, 2) == prefill + decode
    assert request_flops(s, 30, 3, 1) == prefill


def test_ideal_speedup_is_below_kept_ratio_because_head_is_not_pruned():
    s = DecoderShape.from_config(DEMO)
    ideal = ideal_speedup(s, 22, prompt_len=128, output_len=64)
    naive = 30 / 22
    assert 1.0 < ideal["ideal_speedup"] < naive
    assert 1.0 < ideal["ideal_decode_speedup"] < ideal["ideal_speedup"]  # decode is head-heavier
    # decode step at the mean context 128 + 65/2 = 160.5, by hand:
    dense = 30 * (BLOCK + 2304 * 160.5) + HEAD
    pruned = 22 * (BLOCK + 2304 * 160.5) + HEAD
    assert ideal["ideal_decode_speedup"] == pytest.approx(dense / pruned, rel=1e-12)
    assert ideal["ideal_decode_speedup"] == pytest.approx(280_053_504 / 220_472_064, rel=1e-12)  # 1.2702
    assert ideal_speedup(s, 30, 128, 64)["ideal_speedup"] == 1.0


def test_plain_mlp_and_untied_text_config():
    cfg = {"model_type": "gpt2", "hidden_act": "gelu_new",
           "text_config": None, "num_hidden_layers": 2, "hidden_size": 8,
           "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 10}
    s = DecoderShape.from_config(cfg)
    assert not s.gated_mlp and s.num_key_value_heads == 2 and s.head_dim == 4
    assert s.block_linear_flops() == 4 * 2 * 8 * 8 + 2 * 2 * 8 * 32
    wrapped = DecoderShape.from_config({"text_config": DEMO})
    assert wrapped.block_linear_flops() == BLOCK
