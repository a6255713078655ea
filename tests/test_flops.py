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


# ---- per unit (attention / MLP sublayers) --------------------------------------------------

# Qwen2.5-1.5B's shape: hidden 1536, 12 heads / 2 KV heads of 128, intermediate 8960, vocab
# 151936, untied head, q/k/v biases (Qwen2 configs carry no `attention_bias` key).
QWEN = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 28,
        "hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 2,
        "intermediate_size": 8960, "vocab_size": 151936, "hidden_act": "silu",
        "tie_word_embeddings": False}


def test_unit_flops_by_hand_demo_and_qwen2():
    from tabp_vllm.flops import Kept

    s = DecoderShape.from_config(DEMO)
    assert not s.qkv_bias
    assert s.attention_projection_flops() == 663_552 + 2 * 221_184 + 663_552 == 1_769_472
    assert s.mlp_flops() == 5_308_416
    assert s.attention_flops(100) == 1_769_472 + 2304 * 100
    # a whole block is one attention + one MLP: today's numbers, exactly
    assert flops_per_token(s, Kept(30, 30), 100) == flops_per_token(s, 30, 100)
    assert request_flops(s, Kept(26, 26), 128, 64) == request_flops(s, 26, 128, 64)
    # 8 attention sublayers out: 8 x (projections + attention over 100 keys) fewer
    assert flops_per_token(s, Kept(22, 30), 100)["total"] == 275_871_744 - 8 * (1_769_472 + 230_400)

    q = DecoderShape.from_config(QWEN)
    assert (q.head_dim, q.num_key_value_heads, q.qkv_bias) == (128, 2, True)
    # q, o: 2*1536*1536 = 4,718,592 each; k, v: 2*1536*256 = 786,432 each; biases 1536 + 2*256
    assert q.attention_projection_flops() == 2 * 4_718_592 + 2 * 786_432 + 2048 == 11_012_096
    assert q.mlp_flops() == 3 * 2 * 1536 * 8960 == 82_575_360
    assert q.block_attention_flops(1) == 4 * 12 * 128
    assert q.lm_head_flops() == 2 * 1536 * 151936  # untied: same matmul as a tied head
    assert DecoderShape.from_config({**DEMO, "attention_bias": True}).attention_projection_flops() \
        == 1_769_472 + 576 + 2 * 192


def test_sublayer_ideal_speedup_and_removed_fraction():
    from tabp_vllm.flops import DECODE_CONTEXT, Kept, decode_speedup, removed_flops_fraction

    s = DecoderShape.from_config(DEMO)
    ctx = DECODE_CONTEXT
    dense = 30 * (BLOCK + 2304 * ctx) + HEAD
    attn = 1_769_472 + 2304 * ctx
    # 8 attention sublayers cost less than 8 blocks, more than nothing
    only_attention = decode_speedup(s, Kept(22, 30))
    assert only_attention == pytest.approx(dense / (dense - 8 * attn), rel=1e-12)
    assert 1.0 < only_attention < decode_speedup(s, 22)
    assert decode_speedup(s, 30) == 1.0
    ideal = ideal_speedup(s, Kept(22, 30), 128, 64)
    assert ideal["kept_blocks"] is None and (ideal["kept_attention"], ideal["kept_mlp"]) == (22, 30)
    assert ideal_speedup(s, 26, 128, 64)["kept_blocks"] == 26
    # flat units: 2*i attention of block i, 2*i+1 its MLP
    frac = removed_flops_fraction(s, [0, 2, 5])
    assert frac == pytest.approx((2 * attn + 5_308_416) / dense, rel=1e-12)
    whole = removed_flops_fraction(s, [2 * i + j for i in range(22, 30) for j in (0, 1)])
    assert 1 / (1 - whole) == pytest.approx(decode_speedup(s, 22), rel=1e-12)
    assert removed_flops_fraction(s, []) == 0.0
    with pytest.raises(ValueError):
        removed_flops_fraction(s, [60])
