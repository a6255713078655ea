"""FLOPs per generated token of a (pruned) decoder, from an HF config: the ideal speedup.

Counting convention (one multiply-add = 2 FLOPs, forward pass only):

- embedding: a table lookup, 0 FLOPs (listed so that it is visibly counted, not forgotten);
- per decoder block, two units that a mask can remove separately:
  - the attention sublayer (`DecoderShape.attention_flops(context)`): the q, k, v, o projections
    (grouped-query: k and v have `num_key_value_heads` heads; the q/k/v bias adds of Qwen2-style
    blocks, 1 FLOP an element) plus the attention itself over the KV cache at context length c
    (QK^T and softmax(.)V: 2 * 2 * heads * head_dim * c);
  - the MLP sublayer (`DecoderShape.mlp_flops()`): gated: gate, up, down = 3 matrices; plain: 2;
- final norm + LM head: 2 * hidden * vocab (tied or not, the matmul is the same: an untied head
  costs weight memory, `memory.weight_bytes`, not FLOPs), computed only for positions that are
  sampled (vLLM computes logits for the last prompt token and each decode step);
- norms, rotary embeddings, activations and residual adds are elementwise (O(hidden) per token,
  < 0.2 % of the total for the demo model) and are left out.

What a variant keeps is a `Kept` (attention sublayers, MLP sublayers); a plain int is whole
blocks (one attention + one MLP each), so removing k blocks removes k blocks' linear + attention
FLOPs; embedding and LM head stay, which is why a small model with a large vocabulary gains less
than kept/total suggests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Union

# The context length (prompt + generated so far) at which one decode step's FLOPs are quoted:
# `serve`'s ideal speedup and the default of `removed_flops_fraction`.
DECODE_CONTEXT = 256


@dataclass(frozen=True)
class Kept:
    """How many attention sublayers and MLP sublayers a variant serves (of `num_hidden_layers`
    each). `Kept.blocks(k)`: k whole blocks."""

    attention: int
    mlp: int

    @classmethod
    def blocks(cls, k: int) -> "Kept":
        return cls(int(k), int(k))

    @classmethod
    def of_mask(cls, mask: Any) -> "Kept":
        """What a `TaskMask` serves (whole blocks and sublayers removed alike)."""
        return cls(mask.num_attention_kept, mask.num_mlp_kept)


KeptLike = Union[int, Kept]


def as_kept(kept: KeptLike) -> Kept:
    return kept if isinstance(kept, Kept) else Kept.blocks(kept)


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
    qkv_bias: bool = False

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
            # Qwen2's config has no `attention_bias` key: its q/k/v projections always carry one.
            qkv_bias=bool(cfg.get("attention_bias")) or model_type == "qwen2",
        )

    # ---- per-token pieces -------------------------------------------------------------------
    def attention_projection_flops(self) -> int:
        """q, k, v, o projections of one token (and the q/k/v bias adds where the model has them)."""
        d, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, \
            self.num_key_value_heads * self.head_dim
        bias = q + 2 * kv if self.qkv_bias else 0
        return 2 * d * q + 2 * 2 * d * kv + 2 * q * d + bias

    def block_attention_flops(self, context: float) -> float:
        """QK^T plus the weighted sum of V for one query token over `context` keys."""
        return 2 * 2 * self.num_attention_heads * self.head_dim * context

    def attention_flops(self, context: float) -> float:
        """One block's attention sublayer for one token at `context` keys: projections + the
        attention over the KV cache."""
        return self.attention_projection_flops() + self.block_attention_flops(context)

    def mlp_flops(self) -> int:
        """One block's MLP sublayer for one token."""
        return (3 if self.gated_mlp else 2) * 2 * self.hidden_size * self.intermediate_size

    def block_linear_flops(self) -> int:
        """A whole block's matmuls (attention projections + MLP), the attention itself left out."""
        return self.attention_projection_flops() + self.mlp_flops()

    def lm_head_flops(self) -> int:
        return 2 * self.hidden_size * self.vocab_size


def _blocks_flops(shape: DecoderShape, kept: Kept, linear_tokens: float, attention_keys: float) -> float:
    """Decoder FLOPs of `linear_tokens` tokens whose attention reads `attention_keys` keys in all."""
    return (kept.attention * (linear_tokens * shape.attention_projection_flops()
                              + shape.block_attention_flops(attention_keys))
            + kept.mlp * linear_tokens * shape.mlp_flops())


def flops_per_token(shape: DecoderShape, kept: KeptLike, context: float,
                    with_lm_head: bool = True) -> dict[str, float]:
    """FLOPs of one token's forward pass at `context` keys (the token itself included).
    `kept`: whole blocks (int) or a `Kept`."""
    k = as_kept(kept)
    blocks = _blocks_flops(shape, k, 1, context)
    head = shape.lm_head_flops() if with_lm_head else 0
    return {"embedding": 0, "blocks": blocks, "lm_head": head, "total": blocks + head}


def request_flops(shape: DecoderShape, kept: KeptLike, prompt_len: int, output_len: int) -> float:
    """Total FLOPs of one request: prefill of the prompt, then `output_len - 1` decode steps.

    The prefill computes logits only for the last prompt position (it yields the first output
    token); decode step j (j = 1 .. output_len-1) attends over prompt_len + j keys.
    Attention in the prefill is causal: token t attends over t keys.
    """
    k = as_kept(kept)
    prefill_keys = prompt_len * (prompt_len + 1) // 2  # sum of t for t = 1 .. prompt_len
    total = _blocks_flops(shape, k, prompt_len, prefill_keys) + shape.lm_head_flops()
    for j in range(1, output_len):
        total += flops_per_token(shape, k, prompt_len + j)["total"]
    return float(total)


def ideal_speedup(shape: DecoderShape, kept: KeptLike, prompt_len: float,
                  output_len: float) -> dict[str, float]:
    """Dense vs pruned: FLOPs per generated token and their ratio at the run's lengths.

    `amortized` counts the whole request (prefill + decode) per output token: the ideal for the
    measured output-token throughput. `decode` is one decode step at the mean decode context.
    """
    k = as_kept(kept)
    dense = Kept.blocks(shape.num_hidden_layers)
    p, o = max(1, round(prompt_len)), max(1, round(output_len))
    dense_req = request_flops(shape, dense, p, o) / o
    pruned_req = request_flops(shape, k, p, o) / o
    ctx = p + (o + 1) / 2
    dense_dec = flops_per_token(shape, dense, ctx)["total"]
    pruned_dec = flops_per_token(shape, k, ctx)["total"]
    return {
        "prompt_len": p, "output_len": o,
        # whole blocks when the variant removes whole blocks only; else the sublayer counts say it
        "kept_blocks": k.attention if k.attention == k.mlp else None,
        "kept_attention": k.attention, "kept_mlp": k.mlp,
        "dense_flops_per_output_token": dense_req,
        "pruned_flops_per_output_token": pruned_req,
        "ideal_speedup": dense_req / pruned_req,
        "decode_context": ctx,
        "dense_decode_flops": dense_dec,
        "pruned_decode_flops": pruned_dec,
        "ideal_decode_speedup": dense_dec / pruned_dec,
    }


def decode_speedup(shape: DecoderShape, kept: KeptLike, context: float = DECODE_CONTEXT) -> float:
    """Dense / variant FLOPs of one decode step at `context` keys (LM head included): the ideal
    speedup `serve` shows."""
    dense = flops_per_token(shape, shape.num_hidden_layers, context)["total"]
    return float(dense / flops_per_token(shape, kept, context)["total"])


def removed_flops_fraction(shape: DecoderShape, units: Iterable[int],
                           context: float = DECODE_CONTEXT, with_lm_head: bool = True) -> float:
    """The share of a dense decode step's FLOPs (at `context` keys) that removing `units` saves.

    `units` are flat unit indices (unit 2*i: block i's attention, 2*i+1: its MLP; a whole block is
    both). With the LM head counted (the default) the fraction is what a FLOPs budget buys in
    speed: the ideal speedup is 1 / (1 - fraction).
    """
    units = set(units)
    total_units = 2 * shape.num_hidden_layers
    bad = sorted(u for u in units if not 0 <= u < total_units)
    if bad:
        raise ValueError(f"units {bad} out of range 0..{total_units - 1}")
    attention = sum(1 for u in units if u % 2 == 0)
    removed = attention * shape.attention_flops(context) + (len(units) - attention) * shape.mlp_flops()
    return float(removed / flops_per_token(shape, shape.num_hidden_layers, context,
                                           with_lm_head)["total"])


def shape_summary(shape: DecoderShape) -> dict[str, Any]:
    return {**asdict(shape), "block_linear_flops": shape.block_linear_flops(),
            "attention_projection_flops": shape.attention_projection_flops(),
            "mlp_flops": shape.mlp_flops(), "lm_head_flops": shape.lm_head_flops()}
