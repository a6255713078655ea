"""FLOPs per generated token of a (pruned) decoder, from an HF config: the ideal speedup.

Counting convention (one multiply-add = 2 FLOPs, forward pass only):

- embedding: a table lookup, 0 FLOPs (listed so that it is visibly counted, not forgotten);
- per decoder block: the q, k, v, o projections (grouped-query: k and v have `num_key_value_heads`
  heads), the attention itself at context length c (QK^T and softmax(.)V: 2 * 2 * heads *
  head_dim * c), and the MLP (gated: gate, up, down = 3 matrices; plain: 2);
- final norm + LM head: 2 * hidden * vocab (tied or not, the matmul is the same), computed only for
  positions that are sampled (vLLM computes logits for the last prompt token and each decode step);
- norms, rotary embeddings, activations and residual adds are elementwise (O(hidden) per token,
  < 0.2 % of the total for the demo model) and are left out.

Removing k blocks removes k blocks' linear + attention FLOPs; embedding and LM head stay, which is
why a small model with a large vocabulary gains less than kept/total suggests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DecoderShape:
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool = True

    @classmethod
    def from_config(cls, config: dict[str, Any] | Any) -> "DecoderShape":
        cfg = config if isinstance(config, dict) else config.to_dict()
        if cfg.get("num_hidden_layers") is None and isinstance(cfg.get("text_config"), dict):
            cfg = cfg["text_config"]
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // heads
        act = str(cfg.get("hidden_act", "silu"))
        model_type = str(cfg.get("model_type", ""))
        # Llama/Mistral/Qwen/Gemma MLPs are gated (SwiGLU/GeGLU); GPT-2-style ones are not.
        gated = model_type not in ("gpt2", "gpt_neox", "opt", "gpt_bigcode") or "glu" in act
        return cls(
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            gated_mlp=gated,
        )

    # ---- per-token pieces -------------------------------------------------------------------
    def block_linear_flops(self) -> int:
        d, hd = self.hidden_size, self.head_dim
        q = 2 * d * self.num_attention_heads * hd
        kv = 2 * 2 * d * self.num_key_value_heads * hd
        o = 2 * self.num_attention_heads * hd * d
        mlp = (3 if self.gated_mlp else 2) * 2 * d * self.intermediate_size
        return q + kv + o + mlp

    def block_attention_flops(self, context: float) -> float:
        """QK^T plus the weighted sum of V for one query token over `context` keys."""
        return 2 * 2 * self.num_attention_heads * self.head_dim * context

    def lm_head_flops(self) -> int:
        return 2 * self.hidden_size * self.vocab_size


def flops_per_token(shape: DecoderShape, kept_blocks: int, context: float,
                    with_lm_head: bool = True) -> dict[str, float]:
    """FLOPs of one token's forward pass at `context` keys (the token itself included)."""
    blocks = kept_blocks * (shape.block_linear_flops() + shape.block_attention_flops(context))
    head = shape.lm_head_flops() if with_lm_head else 0
    return {"embedding": 0, "blocks": blocks, "lm_head": head, "total": blocks + head}


def request_flops(shape: DecoderShape, kept_blocks: int, prompt_len: int, output_len: int) -> float:
    """Total FLOPs of one request: prefill of the prompt, then `output_len - 1` decode steps.

    The prefill computes logits only for the last prompt position (it yields the first output
    token); decode step j (j = 1 .. output_len-1) attends over prompt_len + j keys.
    Attention in the prefill is causal: token t attends over t keys.
    """
    lin = shape.block_linear_flops()
    prefill_attn = sum(shape.block_attention_flops(t) for t in range(1, prompt_len + 1))
    total = kept_blocks * (prompt_len * lin + prefill_attn) + shape.lm_head_flops()
    for j in range(1, output_len):
        total += flops_per_token(shape, kept_blocks, prompt_len + j)["total"]
    return float(total)


def ideal_speedup(shape: DecoderShape, kept_blocks: int, prompt_len: float,
                  output_len: float) -> dict[str, float]:
    """Dense vs pruned: FLOPs per generated token and their ratio at the run's lengths.

    `amortized` counts the whole request (prefill + decode) per output token: the ideal for the
    measured output-token throughput. `decode` is one decode step at the mean decode context.
    """
    p, o = max(1, round(prompt_len)), max(1, round(output_len))
    dense_req = request_flops(shape, shape.num_hidden_layers, p, o) / o
    pruned_req = request_flops(shape, kept_blocks, p, o) / o
    ctx = p + (o + 1) / 2
    dense_dec = flops_per_token(shape, shape.num_hidden_layers, ctx)["total"]
    pruned_dec = flops_per_token(shape, kept_blocks, ctx)["total"]
    return {
        "prompt_len": p, "output_len": o, "kept_blocks": kept_blocks,
        "dense_flops_per_output_token": dense_req,
        "pruned_flops_per_output_token": pruned_req,
        "ideal_speedup": dense_req / pruned_req,
        "decode_context": ctx,
        "dense_decode_flops": dense_dec,
        "pruned_decode_flops": pruned_dec,
        "ideal_decode_speedup": dense_dec / pruned_dec,
    }


def shape_summary(shape: DecoderShape) -> dict[str, Any]:
    return {**asdict(shape), "block_linear_flops": shape.block_linear_flops(),
            "lm_head_flops": shape.lm_head_flops()}
