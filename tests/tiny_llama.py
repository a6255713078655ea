"""Tiny random-weight decoders with the demo tokenizer, for fast scoring and parity tests:
`tiny_llama` (6 blocks, tied head, block 3 the identity) and `tiny_qwen2` (the same shape in
Qwen2's form: q/k/v biases, GQA, an untied LM head)."""

import torch


def tiny_llama(demo_model: str, hidden_size: int = 32):
    """`hidden_size=128` for a vLLM engine (head_dim 32: vLLM's CPU attention refuses 8)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _tiny(demo_model, LlamaConfig, LlamaForCausalLM, hidden_size=hidden_size,
                 tie_word_embeddings=True)


def tiny_qwen2(demo_model: str):
    """Hidden 128 and 4 heads (head_dim 32, which vLLM's CPU attention accepts; 2 KV heads).
    transformers initialises biases to zero and ties nothing here: the q/k/v biases are drawn at
    random so that a loader dropping them fails parity, and the head differs from the embedding."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model, tok = _tiny(demo_model, Qwen2Config, Qwen2ForCausalLM, hidden_size=128,
                       tie_word_embeddings=False, use_sliding_window=False)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    return model, tok


def _tiny(demo_model: str, config_cls, model_cls, hidden_size: int, **config):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    tok.padding_side = "left"
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                     num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, **config)
    model = model_cls(cfg).eval()
    # block 3 becomes the identity: its attention and MLP write nothing to the residual stream
    with torch.no_grad():
        model.model.layers[3].self_attn.o_proj.weight.zero_()
        model.model.layers[3].mlp.down_proj.weight.zero_()
    return model, tok
