"""What the scorers share: the transformers model, the scoring context, the one batch iterator
(`forward_batches`: left-padded batches through the model, optionally without some blocks, with
every block's hidden state when asked), and the logit-lens read-out with the model's own final norm
and head."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from tabp_vllm.data import LETTERS, Dataset, TextItem, mcqa_context
from tabp_vllm.errors import TabpError
from tabp_vllm.scoring.base import ranked

if TYPE_CHECKING:
    from tabp_vllm.scoring.units import Budget


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TabpError(f"device {device!r} requested but CUDA is not available")
    return device


def load_model(model_path: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    # A prompt longer than max_length loses its beginning, never its "Answer:" tail, where the
    # decision position is.
    tok.truncation_side = "left"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    return model, tok


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


@dataclass
class ScoreContext:
    model: Any
    tokenizer: Any
    dataset: Dataset
    k: int | None  # units to remove; None when `budget` is a FLOPs share
    candidates: list[int]  # candidate units: blocks, or sublayer units (units.py) by granularity
    # The user-facing defaults live in `run_scoring`'s signature (ScoreOptions takes them from
    # there); those below are the same values, except where the context holds what run_scoring
    # resolved: `mode` (its "auto" becomes the data's kind) and `device` ("auto" -> cpu or cuda).
    mode: str = "mcqa"  # mcqa | text
    statistic: str = "entropy"
    aggregate: str = "ssn"
    p: float = 1.0
    norm: bool = True
    batch_size: int = 16
    max_length: int = 256
    text_positions: int = 32  # text mode: early-exit read-outs per sample (full vocab is costly)
    probe: str = "auto"  # MCQA mode: letters | cloze | auto (TaBP resolves auto when it scores)
    preset: str | None = None  # "paper": the official TaBP prompt, bare-letter keys, neutral ties
    probe_measurement: dict[str, Any] | None = None  # what `auto` measured to choose the probe
    seed: int = 0
    device: str = "cpu"
    progress: Callable[[str, int], Callable[[int], None]] | None = None
    forward_passes: int = 0  # sample-forward passes (one sample through the model once)
    granularity: str = "block"  # block | sublayer: what a unit is (units.py)
    budget: Budget | None = None  # how much goes; None: the k lowest
    saves: Any = None  # perplexity.PerplexitySaves: SLEB's and PPL's per-batch progress, or None

    @property
    def num_blocks(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def num_units(self) -> int:
        """Blocks, or 2 units a block (attention, MLP) at sublayer granularity."""
        return self.num_blocks * (2 if self.granularity == "sublayer" else 1)

    def the_budget(self) -> Budget:
        from tabp_vllm.scoring.units import Budget

        return self.budget or Budget(k=self.k)

    def remove_lowest(self, scores: list[float | None]) -> list[int]:
        """The candidates the budget removes, lowest score first (ties: the lower index), or in
        the budget's own order (`Budget.ordered`), sorted."""
        budget = self.the_budget()
        return sorted(budget.take(budget.ordered(ranked(scores, self.candidates), scores)))

    def task(self, desc: str, total: int) -> Callable[[int], None]:
        if self.progress is None:
            return lambda n=1: None
        return self.progress(desc, total)

    def num_batches(self) -> int:
        return (len(self.dataset) + self.batch_size - 1) // self.batch_size


def option_token_ids(tok, n: int, bare: bool = False) -> list[int]:
    """The option letters' token ids: " A" (after "Answer:"), or "A" (`bare`, after "Answer: ")."""
    ids = []
    for letter in LETTERS[:n]:
        key = letter if bare else f" {letter}"
        enc = tok.encode(key, add_special_tokens=False)
        if len(enc) != 1:
            raise TabpError(f"option {key!r} is not a single token for this tokenizer")
        ids.append(enc[0])
    return ids


def _encode(ctx: ScoreContext, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = ctx.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                        max_length=ctx.max_length, add_special_tokens=True)
    att = enc["attention_mask"]
    pos = (att.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": enc["input_ids"].to(ctx.device), "attention_mask": att.to(ctx.device),
            "position_ids": pos.to(ctx.device)}


def lm_text(item) -> str:
    """The text a perplexity-based method scores: the sample with its gold answer."""
    if isinstance(item, TextItem):
        return item.text
    return f"{mcqa_context(item)} {item.choices[item.gold]}"


@dataclass
class ForwardBatch:
    """One calibration batch after the forward pass."""

    items: list
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, position_ids; left padded
    output: torch.Tensor  # the last hidden state after the final norm: what the LM head reads
    # hidden=True: h_0 (embeddings) .. h_B (before the final norm); at sublayer granularity also
    # the residual stream between each block's attention and MLP: h_0, a_0, h_1, a_1, .., h_B
    # (2B + 1 states, state u + 1 is the one after unit u)
    hidden: list[torch.Tensor]


def encoded_batches(ctx: ScoreContext, text: Callable[[Any], str]
                    ) -> Iterator[tuple[list, dict[str, torch.Tensor]]]:
    """The calibration set, `ctx.batch_size` samples at a time: the items and their encoding (each
    sample written by `text(item)`)."""
    items = ctx.dataset.items
    for s in range(0, len(items), ctx.batch_size):
        chunk = items[s:s + ctx.batch_size]
        yield chunk, _encode(ctx, [text(i) for i in chunk])


@torch.no_grad()
def forward_batches(ctx: ScoreContext, text: Callable[[Any], str], *, hidden: bool = False,
                    skip: set[int] = frozenset(),
                    tick: Callable[[int], None] | None = None) -> Iterator[ForwardBatch]:
    """The calibration set through the model, `ctx.batch_size` samples at a time, each sample
    written by `text(item)`, with the `skip` units (blocks, or sublayer units at sublayer
    granularity) left out. Counts `ctx.forward_passes` and ticks `tick` once per batch, after the
    caller has used it. Every scorer's forward pass is this one."""
    model = ctx.model
    sublayer = ctx.granularity == "sublayer"
    for chunk, inputs in encoded_batches(ctx, text):
        states: list[torch.Tensor] = []

        def grab(_m, _i, o):
            states.append(o[0] if isinstance(o, tuple) else o)

        def grab_input(_m, args):
            states.append(args[0])

        hooks = []
        try:
            with skipping(ctx, skip):
                if hidden:  # on the blocks that run (those left out are gone from the list)
                    hooks.append(model.model.embed_tokens.register_forward_hook(grab))
                    for layer in decoder_layers(model):
                        if sublayer:  # the stream after the attention is the MLP norm's input
                            hooks.append(layer.post_attention_layernorm
                                         .register_forward_pre_hook(grab_input))
                        hooks.append(layer.register_forward_hook(grab))
                out = model.model(**inputs, use_cache=False).last_hidden_state
        finally:
            for h in hooks:
                h.remove()
        ctx.forward_passes += inputs["input_ids"].shape[0]
        yield ForwardBatch(chunk, inputs, out, states)
        if tick:
            tick(1)


def skipping(ctx: ScoreContext, units: set[int]):
    """The model with `units` left out: whole blocks, or sublayers at sublayer granularity."""
    if ctx.granularity != "sublayer":
        return without_blocks(ctx.model, units)
    from tabp_vllm.sublayers import without_units

    return without_units(ctx.model, units)


@contextlib.contextmanager
def without_blocks(model, removed: set[int]):
    layers = decoder_layers(model)
    if not removed:
        yield
        return
    model.model.layers = torch.nn.ModuleList([l for i, l in enumerate(layers) if i not in removed])
    try:
        yield
    finally:
        model.model.layers = layers


def lens_logits(ctx: ScoreContext, h: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
    """Logit lens: (final norm) + LM head; `rows` restricts the head to some tokens."""
    if ctx.norm:
        h = ctx.model.model.norm(h)
    w = ctx.model.lm_head.weight if rows is None else ctx.model.lm_head.weight[rows]
    out = h.float() @ w.float().T
    bias = getattr(ctx.model.lm_head, "bias", None)
    if bias is not None:
        out = out + (bias if rows is None else bias[rows]).float()
    return out
