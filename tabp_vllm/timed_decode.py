"""Dense vs pruned decode speed in transformers, without vLLM: the GPU-scale bench's measuring core.

`removed_blocks` picks the hand-made masks the GPU benches use (k blocks spread over the latter
half); `Variants` makes a variant of one loaded model by deleting blocks from its layer stack (the
semantics the vLLM parity check uses); `generate_timed` is greedy decoding with the KV cache, every
step timed (with `cuda.synchronize` on a GPU). Imports only torch and numpy, lazily: it runs on a
plain PyTorch GPU box.
"""

from __future__ import annotations

import time
from typing import Any


def removed_blocks(num_layers: int, k: int) -> list[int]:
    """k blocks evenly spread over the latter half, the final block kept (TaBP's candidate range
    without the last block); over blocks 1..B-2 when the latter half is too short."""
    import numpy as np

    for lo in (num_layers // 2, 1):
        cands = list(range(lo, num_layers - 1))
        if k <= len(cands):
            idx = np.linspace(0, len(cands) - 1, k).round().astype(int)
            return sorted({cands[i] for i in idx})
    raise ValueError(f"k={k} is too many blocks to remove from {num_layers}")


class Variants:
    """One loaded model; `use(removed)` deletes blocks the way the parity check does."""

    def __init__(self, model):
        self.model = model
        self.full = list(model.model.layers)
        self.layer_types = getattr(model.config, "layer_types", None)
        self.idx = [layer.self_attn.layer_idx for layer in self.full]

    def use(self, removed: list[int]) -> None:
        import torch

        gone = set(removed)
        kept = [i for i in range(len(self.full)) if i not in gone]
        self.model.model.layers = torch.nn.ModuleList([self.full[i] for i in kept])
        self.model.config.num_hidden_layers = len(kept)
        if self.layer_types is not None:
            self.model.config.layer_types = [self.layer_types[i] for i in kept]
        for new, i in enumerate(kept):  # the KV cache is indexed by position in the stack
            self.full[i].self_attn.layer_idx = new


def cuda_sync(device: str) -> None:
    """Wait for the GPU's queued work (timings end when the kernels do); nothing on a CPU."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def generate_timed(model, ids, new_tokens: int, device: str) -> dict[str, Any]:
    """Prefill (its logits give output token 1), then new_tokens - 1 greedy decode steps."""
    import torch

    with torch.inference_mode():
        cuda_sync(device)
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        cuda_sync(device)
        prefill = time.perf_counter() - t
        cache = out.past_key_values
        steps, tokens = [], [nxt]
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            cuda_sync(device)
            steps.append(time.perf_counter() - t)
            tokens.append(nxt)
        del cache, out
    return {"prefill_s": prefill, "steps_s": steps, "tokens": torch.cat(tokens, dim=1)}
