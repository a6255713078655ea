"""Sublayers: a decoder block's attention and its MLP as separate units (transformers side).

Unit numbering, wherever a flat list of 2L units is needed (scores, SLEB, L0 gates): unit 2*i is
block i's attention, unit 2*i+1 block i's MLP. `units_to_mask_lists` turns a set of removed units
into a mask's (removed_layers, removed_attention, removed_mlp): a block with both units removed is
a removed block.

`without_sublayers` makes sublayers of a transformers Llama / Qwen2 model contribute nothing, the
reference that the served sublayer masks (vLLM's heterogeneous-layer model, `tabp_vllm.engine`)
are checked against and what sublayer scoring measures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from tabp_vllm.errors import TabpError

ATTENTION, MLP = "attention", "mlp"
KINDS = (ATTENTION, MLP)


def unit_of(block: int, kind: str) -> int:
    """The unit index of block `block`'s attention or MLP."""
    if kind not in KINDS:
        raise ValueError(f"sublayer kind must be one of {KINDS}, not {kind!r}")
    return 2 * block + (kind == MLP)


def block_kind(unit: int) -> tuple[int, str]:
    """(block, kind) of a unit index: the inverse of `unit_of`."""
    return unit // 2, (MLP if unit % 2 else ATTENTION)


def units_to_mask_lists(units: Iterable[int]) -> tuple[list[int], list[int], list[int]]:
    """(removed_layers, removed_attention, removed_mlp) for a set of removed units; a block whose
    attention and MLP are both removed is a removed block, listed in removed_layers only."""
    attention, mlp = set(), set()
    for u in set(units):
        block, kind = block_kind(u)
        (attention if kind == ATTENTION else mlp).add(block)
    whole = attention & mlp
    return sorted(whole), sorted(attention - whole), sorted(mlp - whole)


def mask_units(removed_layers: Iterable[int], removed_attention: Iterable[int] = (),
               removed_mlp: Iterable[int] = ()) -> list[int]:
    """The removed units of a mask's lists (a removed block is both its units)."""
    units = {unit_of(i, k) for i in removed_layers for k in KINDS}
    units |= {unit_of(i, ATTENTION) for i in removed_attention}
    units |= {unit_of(i, MLP) for i in removed_mlp}
    return sorted(units)


class _NoAttention(torch.nn.Module):
    """Stands in for a skipped attention: writes nothing to the residual stream. With a KV cache
    it still appends zero keys/values for its layer, so that the cache's length stays that of the
    tokens seen: a forward given a cache but no positions takes them from layer 0's length."""

    def __init__(self, attention: torch.nn.Module, num_kv_heads: int):
        super().__init__()
        self.layer_idx = attention.layer_idx
        self.head_dim = attention.head_dim
        self.num_kv_heads = num_kv_heads

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            b, q = hidden_states.shape[:2]
            kv = hidden_states.new_zeros(b, self.num_kv_heads, q, self.head_dim)
            past_key_values.update(kv, kv, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class _NoMLP(torch.nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    needed = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
    if layers is None or not all(hasattr(layer, a) for layer in layers for a in needed):
        raise TabpError(f"sublayer skipping needs a Llama-style decoder (model.layers[i] with "
                        f"{', '.join(needed)}); {type(model).__name__} is not one")
    return layers


@contextlib.contextmanager
def without_sublayers(model, attention: Iterable[int] = (), mlp: Iterable[int] = ()):
    """Within the block, the attention of the blocks in `attention` and the MLP of those in `mlp`
    contribute nothing: each sublayer and the RMSNorm in front of it are swapped for modules that
    add zero to the residual stream (x + 0 is x exactly), and swapped back afterwards.
    Skipping a block's attention and its MLP is deleting the block."""
    layers = _decoder_layers(model)
    attention, mlp = sorted(set(attention)), sorted(set(mlp))
    bad = [i for i in attention + mlp if not 0 <= i < len(layers)]
    if bad:
        raise TabpError(f"sublayer of block {bad[0]} is out of range (model has {len(layers)} "
                        f"blocks)")
    num_kv_heads = model.config.num_key_value_heads
    saved = []
    try:
        for i in attention:
            layer = layers[i]
            saved.append((layer, "self_attn", layer.self_attn))
            saved.append((layer, "input_layernorm", layer.input_layernorm))
            layer.self_attn = _NoAttention(layer.self_attn, num_kv_heads)
            layer.input_layernorm = torch.nn.Identity()
        for i in mlp:
            layer = layers[i]
            saved.append((layer, "mlp", layer.mlp))
            saved.append((layer, "post_attention_layernorm", layer.post_attention_layernorm))
            layer.mlp = _NoMLP()
            layer.post_attention_layernorm = torch.nn.Identity()
        yield model
    finally:
        for layer, name, module in reversed(saved):
            setattr(layer, name, module)


def without_units(model, units: Iterable[int]):
    """`without_sublayers` for a set of flat unit indices (2i: block i's attention, 2i+1: its
    MLP; both units of a block: the block deleted)."""
    kinds = [block_kind(u) for u in units]
    return without_sublayers(model, attention={i for i, kind in kinds if kind == ATTENTION},
                             mlp={i for i, kind in kinds if kind == MLP})
