"""Prefix reuse for the perplexity baselines (SLEB, PPL): the model's output with `removed | {u}`
left out, for every candidate unit u, without rerunning the blocks in front of u per candidate.

Whichever candidate goes, the blocks before it see the same input: it depends only on `removed`.
So per calibration batch one pass with `removed` left out keeps the hidden state at each
candidate's boundary, and the arguments the model hands every block (attention mask, position
ids, rotary embeddings); each candidate then runs only from its boundary to the end:

- a block u: from the input of block u, the blocks after it;
- a sublayer unit 2i (block i's attention): from the input of block i, block i with its attention
  skipped, then the blocks after it;
- a sublayer unit 2i+1 (block i's MLP): from the residual stream after block i's attention (the
  input of its `post_attention_layernorm`), the blocks after it: block i without its MLP adds
  zero to that stream (sublayers.py), and x + 0 is x.

The outputs are those of a full pass per candidate (`forward_batches(ctx, text,
skip=removed | {u})`), to the bit: the same modules on the same tensors with the same arguments,
position by position as the model's own loop over its (shortened) block list.

Cost: a candidate runs (blocks from its boundary) / (all blocks) of a pass, about half over the
whole depth and a quarter over the latter half, plus one shared pass per batch. Memory: the
boundary states of one batch at a time, one per candidate (batch x length x hidden each, freed as
each candidate runs): qwen1.5b in fp32 on a CPU at batch 16 x 256 tokens is 25 MB a state, so
the peak is 0.35 GB for the latter half's 14 blocks, 0.7 GB for its 28 sublayer units and 1.4 GB
for all 56 (half that in bf16 on a GPU); the LM head's logits that each candidate's NLL reads are
as before and larger (16 x 256 x 151,936 floats, 2.5 GB in fp32).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from tabp_vllm.scoring.probe import ScoreContext, decoder_layers, encoded_batches, skipping

Arguments = list[tuple[tuple, dict[str, Any]]]  # per position of the block list: (args, kwargs)


@torch.no_grad()
def removal_outputs(ctx: ScoreContext, text: Callable[[Any], str], removed: set[int],
                    units: list[int], start_batch: int = 0
                    ) -> Iterator[tuple[dict[str, torch.Tensor], int, torch.Tensor]]:
    """Per calibration batch, per unit u of `units` in order: (the batch's inputs, u, the last
    hidden state after the final norm with `removed | {u}` left out), the `output` that
    `forward_batches(ctx, text, skip=removed | {u})` gives. Counts `ctx.forward_passes` as that
    would: one pass per sample per unit (the shared pass is not counted: the published cost).
    The first `start_batch` batches are counted, not run (a resumed run did them before)."""
    for i, (chunk, inputs) in enumerate(encoded_batches(ctx, text)):
        if i < start_batch:
            ctx.forward_passes += len(chunk) * len(units)
            continue
        boundaries, arguments = _boundaries(ctx, inputs, removed, units)
        for u in units:
            position, h = boundaries.pop(u)
            with skipping(ctx, removed | {u}):
                run = decoder_layers(ctx.model)
                for layer, (args, kwargs) in zip(run[position:], arguments[position:]):
                    h = layer(h, *args, **kwargs)
                out = ctx.model.model.norm(h)
            ctx.forward_passes += len(chunk)
            yield inputs, u, out


def _boundaries(ctx: ScoreContext, inputs: dict[str, torch.Tensor], removed: set[int],
                units: list[int]) -> tuple[dict[int, tuple[int, torch.Tensor]], Arguments]:
    """One pass with `removed` left out: per unit, (the position in the block list with the unit
    gone too where its run resumes, the hidden state entering there), and the arguments the model
    passed the block at each position."""
    sublayer = ctx.granularity == "sublayer"
    # At block granularity the removed blocks are gone from the list, so block u sits at
    # u - (removed blocks before it), and with u gone too the block after it takes that place.
    # At sublayer granularity no block leaves the list: positions are block indices.
    entering: dict[int, int] = {}  # position -> the unit resuming from that block's input
    after_attention: dict[int, int] = {}  # position -> the MLP unit resuming after its attention
    for u in units:
        if not sublayer:
            entering[u - sum(r < u for r in removed)] = u
        elif u % 2:
            after_attention[u // 2] = u
        else:
            entering[u // 2] = u
    boundaries: dict[int, tuple[int, torch.Tensor]] = {}
    arguments: Arguments = []

    def block_input(position: int):
        def hook(_module, args, kwargs):
            arguments.append((args[1:], kwargs))
            if position in entering:
                boundaries[entering[position]] = (position, args[0])
        return hook

    def attention_output(position: int):
        def hook(_module, args):
            boundaries[after_attention[position]] = (position + 1, args[0])
        return hook

    hooks = []
    try:
        with skipping(ctx, removed):
            for position, layer in enumerate(decoder_layers(ctx.model)):
                hooks.append(layer.register_forward_pre_hook(block_input(position),
                                                             with_kwargs=True))
                if position in after_attention:
                    hooks.append(layer.post_attention_layernorm
                                 .register_forward_pre_hook(attention_output(position)))
            ctx.model.model(**inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return boundaries, arguments
