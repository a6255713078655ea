"""Sublayer units and transformers-side sublayer skipping (tabp_vllm/sublayers.py), on tiny random
Llama and Qwen2 models: skipping is exact, restores the model, and keeps generate()'s cache right."""

import copy

import pytest
import torch

from tabp_vllm.errors import TabpError
from tabp_vllm.scoring.probe import without_blocks
from tabp_vllm.sublayers import (block_kind, mask_units, unit_of, units_to_mask_lists,
                                 without_sublayers, without_units)


def tiny(arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                  num_attention_heads=4, num_key_value_heads=2)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    model = Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    with torch.no_grad():  # random init leaves the q/k/v biases at zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


IDS = torch.tensor([[5, 17, 33, 2, 61, 8, 40, 12]])


def logits(model):
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


def test_unit_numbering():
    assert [unit_of(i, k) for i in range(2) for k in ("attention", "mlp")] == [0, 1, 2, 3]
    assert [block_kind(u) for u in (0, 1, 6, 7)] == [(0, "attention"), (0, "mlp"),
                                                      (3, "attention"), (3, "mlp")]
    assert all(unit_of(*block_kind(u)) == u for u in range(20))
    with pytest.raises(ValueError):
        unit_of(1, "ffn")
    # both units of block 2 make a removed block; lone units are sublayers
    assert units_to_mask_lists([4, 5, 0, 9, 7]) == ([2], [0], [3, 4])
    assert mask_units([2], [0], [3, 4]) == [0, 4, 5, 7, 9]
    assert units_to_mask_lists(mask_units([1, 3], [0], [2])) == ([1, 3], [0], [2])


def test_without_units_is_without_sublayers_of_the_units_blocks():
    """Flat units (what scoring and the L0 fit remove) skip the same sublayers as the lists:
    units 4, 5 (block 2 whole), 0 (block 0's attention) and 7 (block 3's MLP)."""
    model = tiny("llama")
    with without_units(model, {4, 5, 0, 7}):
        by_units = logits(model)
    with without_sublayers(model, attention={0, 2}, mlp={2, 3}):
        by_lists = logits(model)
    assert torch.equal(by_units, by_lists)
    assert not torch.allclose(by_units, logits(model), atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_both_sublayers_of_a_block_is_deleting_it(arch):
    model = tiny(arch)
    with without_sublayers(model, attention={2}, mlp={2}):
        skipped = logits(model)
    with without_blocks(model, {2}):
        deleted = logits(model)
    assert torch.equal(skipped, deleted)
    assert not torch.allclose(skipped, logits(model), atol=1e-3)  # block 2 mattered


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_skipping_a_sublayer_is_zeroing_its_output(arch, kind):
    """A sublayer whose output projection is zero adds nothing: the same as skipping it."""
    model = tiny(arch)
    before = logits(model)
    with without_sublayers(model, **{kind: {1, 3}}):
        skipped = logits(model)
    assert torch.equal(logits(model), before)  # restored on exit
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for i in (1, 3):
            layer = zeroed.model.layers[i]
            (layer.self_attn.o_proj if kind == "attention" else layer.mlp.down_proj).weight.zero_()
    torch.testing.assert_close(skipped, logits(zeroed), rtol=0, atol=1e-5)
    assert not torch.allclose(skipped, before, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decoding_with_a_cache_when_block_0_attention_is_skipped(arch):
    """A forward given a cache but no positions reads them from layer 0's cache length: a
    skipped attention must keep it. Cached decoding (step by step, and generate()) equals full
    forwards."""
    model = tiny(arch)
    with without_sublayers(model, attention={0, 3}, mlp={1}), torch.no_grad():
        out = model.generate(IDS, max_new_tokens=5, do_sample=False, use_cache=True,
                             pad_token_id=0)[0, IDS.shape[1]:].tolist()
        step = model(IDS, use_cache=True)
        cache, ids, stepped = step.past_key_values, IDS, []
        for _ in range(5):
            nxt = step.logits[:, -1].argmax(-1, keepdim=True)
            full = model(torch.cat([ids, nxt], dim=1), use_cache=False).logits[:, -1]
            ids = torch.cat([ids, nxt], dim=1)
            step = model(nxt, past_key_values=cache, use_cache=True)
            torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-4, atol=1e-4)
            stepped.append(int(nxt))
    assert out == stepped


def test_refuses_out_of_range_and_other_models():
    model = tiny("llama")
    with pytest.raises(TabpError, match="block 5 is out of range"):
        with without_sublayers(model, attention={5}):
            pass
    with pytest.raises(TabpError, match="Llama-style decoder"):
        with without_sublayers(torch.nn.Linear(2, 2), attention={0}):
            pass
