"""Qwen2 everywhere, on the tiny random Qwen2 (q/k/v biases, GQA, untied head; seconds, no
engine): the probe's head, every scoring method, `score` end to end, a route fit, the weight and
FLOPs model against the real parameters, and the fingerprint. The served side (the pruned vLLM
engine against transformers) is tests/test_parity_vllm.py."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tabp_vllm.data import Dataset, MCQAItem, TextItem
from tabp_vllm.errors import TabpError
from tabp_vllm.mask import load_mask, make_mask
from tabp_vllm.models import load_model_config
from tabp_vllm.scoring import METHOD_NAMES, get_method, run_scoring
from tabp_vllm.scoring.probe import ScoreContext, lens_logits
from tiny_llama import tiny_qwen2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, demo_model):
    model, tok = tiny_qwen2(demo_model)
    d = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return model, tok, str(d)


def test_probe_reads_the_final_norm_and_the_untied_head(tiny):
    model, tok, _ = tiny
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    grabbed = {}
    hook = model.model.layers[-1].register_forward_hook(
        lambda m, a, out: grabbed.setdefault("h", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
    finally:
        hook.remove()
    ctx = ScoreContext(model=model, tokenizer=tok, dataset=Dataset("t", "train", "text", []), k=1,
                       candidates=[], norm=True)
    # the logit lens on the last block's output is the model's own output: norm + lm_head
    lens = lens_logits(ctx, grabbed["h"][0, -1])
    assert torch.allclose(lens, logits, atol=1e-4)
    # and not the embedding read as a head (a tied-head assumption would give this)
    tied = model.model.norm(grabbed["h"][0, -1]) @ model.model.embed_tokens.weight.T
    assert not torch.allclose(lens, tied, atol=1e-2)


@pytest.mark.parametrize("name,granularity", [(n, g) for g in ("block", "sublayer") for n in METHOD_NAMES
                                              if g == "sublayer" or not get_method(n).sublayer_only])
def test_every_method_scores_qwen2(tiny, name, granularity):
    model, tok, _ = tiny
    data = Dataset("m", "train", "mcqa", [MCQAItem(f"Is {i} > 1?", ["no", "yes"], int(i > 1))
                                          for i in range(4)])
    # max_length 32: WikiText paragraphs (sleb, ppl, what_matters) cut short
    res = run_scoring("unused", data, name, k=2, block_range="1:6", batch_size=2,
                      model_and_tokenizer=(model, tok), probe="letters", granularity=granularity,
                      max_length=32)
    per_block = 2 if granularity == "sublayer" else 1  # units 2i (attention), 2i+1 (MLP)
    assert len(res.removed) == 2 and all(per_block <= u < 6 * per_block for u in res.removed)
    if name == "block_influence" and granularity == "block":
        # block 3 writes nothing: its influence is zero, it goes first
        assert 3 in res.removed and res.scores[3] == pytest.approx(0.0, abs=1e-6)


def test_score_command_end_to_end_and_the_mask_fits_only_qwen2(tiny, tmp_path, demo_model):
    from tabp_vllm.scoring.commands import score
    import typer

    _, _, path = tiny
    app = typer.Typer()
    app.command("score")(score)
    app.command("noop")(lambda: None)
    out = tmp_path / "q.json"
    r = CliRunner().invoke(app, ["score", "--task", "demo", "--model", path, "--samples", "6",
                                 "--k", "2", "--batch-size", "3", "-o", str(out)])
    assert r.exit_code == 0, r.output
    mask = load_mask(out, path)
    assert mask.fingerprint["architecture"] == "Qwen2ForCausalLM" and mask.method == "tabp"
    assert len(mask.removed_layers) == 2 and len(mask.scores) == 6
    # a Llama mask is refused on the Qwen2 model, and this mask on the Llama
    with pytest.raises(TabpError, match="architecture 'LlamaForCausalLM' != 'Qwen2ForCausalLM'"):
        load_mask_path = tmp_path / "llama.json"
        load_mask_path.write_text(json.dumps(make_mask(demo_model, [20], task="t").to_json()))
        load_mask(load_mask_path, path)
    with pytest.raises(TabpError, match="Qwen2ForCausalLM"):
        load_mask(out, demo_model)


def test_weight_bytes_and_flops_are_the_real_parameters(tiny):
    from tabp_vllm.flops import DecoderShape
    from tabp_vllm.memory import weight_bytes

    model, _, path = tiny
    config = load_model_config(path)
    params = sum(p.numel() for p in model.parameters())  # embedding and untied head both
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert weight_bytes(config, 6, 4) == 4 * params
    assert weight_bytes(config, 4, 4) == 4 * (params - 2 * block)
    # a multiply-add per weight, an add per q/k/v bias
    attn = model.model.layers[0].self_attn
    weights = sum(m.weight.numel() for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    biases = sum(m.bias.numel() for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    shape = DecoderShape.from_config(config)
    assert shape.qkv_bias and shape.attention_projection_flops() == 2 * weights + biases
    assert shape.lm_head_flops() == 2 * model.lm_head.weight.numel()


class _Encoder:
    """Digits vs letters: two kinds of prompt far apart."""

    name, dimension = "fake", 2

    def record(self):
        return {"name": "fake", "id": "fake", "dimension": 2, "pooling": "none", "normalize": "l2"}

    def encode(self, texts):
        rows = [[sum(c.isdigit() for c in t) + 0.1, sum(c.isalpha() for c in t) + 0.1]
                for t in texts]
        return np.array([np.array(r) / np.linalg.norm(r) for r in rows], dtype=np.float32)


def test_route_fit_hooks_qwen2_blocks(tiny, tmp_path):
    from tabp_vllm.routing.fit import Calibration, fit_router
    from tabp_vllm.routing.options import RouteFitOptions
    from tabp_vllm.routing.router import load_router

    _, _, path = tiny
    arith = [TextItem(f"{i} + {i} = {2 * i}") for i in range(6)]
    words = [TextItem(w) for w in ("apple pie", "green tree", "blue sky", "cold milk", "red rose",
                                   "wet rain")]
    cal = Calibration(arith + words, ["arith"] * 6 + ["words"] * 6,
                      [{"data": t, "split": "train", "sha256": t} for t in ("arith", "words")])
    o = RouteFitOptions(task=["arith", "words"], clusters=2, k=2, steps=3, batch_size=4,
                        max_length=16, kl_positions=4, lr=0.5, output=tmp_path / "r.json")
    router = fit_router(o, encoder=_Encoder(), model_path=path, calibration=cal)
    back = load_router(router.save(o.output), path)
    assert back.fingerprint["architecture"] == "Qwen2ForCausalLM"
    for m in back.masks:
        assert len(m.removed_layers) == 2 and all(1 <= b <= 4 for b in m.removed_layers)
