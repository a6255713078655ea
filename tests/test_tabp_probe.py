"""TaBP as published (`--preset paper`) and the cloze probe, on a tiny random Llama (seconds)."""

import pytest
import torch

from tabp_vllm.data import Dataset, MCQAItem, mcqa_context
from tabp_vllm.errors import TabpError
from tabp_vllm.scoring import parse_range, run_scoring
from tabp_vllm.scoring.probe import ScoreContext, option_token_ids
from tabp_vllm.scoring.tabp import (PAPER_PRESET, _continuation_loglik, cloze_token_ids, ddf,
                                    paper_prompt, per_sample_statistics, probe_text)
from tests.tiny_llama import tiny_llama


@pytest.fixture(scope="module")
def tiny(demo_model):
    return tiny_llama(demo_model)


def items():
    return [MCQAItem("Which is a fruit?", ["apple", "stone", "cloud"], 0),
            MCQAItem("What color is the sky?", ["green", "blue", "red", "black"], 1),
            MCQAItem("Two plus two?", ["four", "five"], 0)]


def ctx_for(tiny, data, **kw):
    model, tok = tiny
    return ScoreContext(model=model, tokenizer=tok, dataset=Dataset("t", "train", "mcqa", data),
                        k=1, candidates=list(range(6)), **kw)


def test_paper_prompt_is_the_official_text_and_keys(tiny):
    _, tok = tiny
    item = MCQAItem("Which gas do plants take in?", ["oxygen", "carbon dioxide"], 1)
    assert paper_prompt(item) == (
        "Answer the following multiple choice question by giving the most appropriate response.\n"
        "Question: Which gas do plants take in?\nA. oxygen\nB. carbon dioxide\nAnswer: ")
    # bare letters (the official convert_tokens_to_ids("A")), not " A"
    assert option_token_ids(tok, 2, bare=True) == tok.convert_tokens_to_ids(["A", "B"])
    assert option_token_ids(tok, 2) != option_token_ids(tok, 2, bare=True)
    ctx = ctx_for(tiny, [item], preset="paper")
    assert probe_text(ctx)(item) == paper_prompt(item)


def test_paper_preset_records_itself_and_uses_its_range(tiny):
    data = Dataset("t", "train", "mcqa", items())
    res = run_scoring("unused", data, k=2, model_and_tokenizer=tiny, preset="paper",
                      **{k: v for k, v in PAPER_PRESET.items() if k != "method"})
    p = res.params
    assert (p["preset"], p["prompt"], p["probe"], p["ddf_ties"]) == ("paper", "paper", "letters",
                                                                       "neutral")
    assert (p["statistic"], p["aggregate"], p["final_norm"]) == ("entropy", "ddf", False)
    assert p["candidate_range"] == [4, 6]  # latter: B/2+1 .. B-1 of 6 blocks
    assert all(s is None for s in res.scores[:4])


def test_named_ranges():
    assert parse_range("latter", 32) == list(range(17, 32))
    assert parse_range("whole", 32) == list(range(1, 31))
    assert parse_range(None, 30) == list(range(15, 30))
    assert parse_range("after-first", 28) == list(range(1, 28))
    # the sublayer configurations' depth-relative candidates are the demo model's original
    # indices (15:30 and 1:30 of its 30 blocks), and fit a 28-block Qwen2 too
    from tabp_vllm.comparison import CONFIGS
    assert parse_range(CONFIGS["tabp-sub-both"]["block_range"], 30) == list(range(15, 30))
    assert parse_range(CONFIGS["tabp-sub-attention"]["block_range"], 30) == list(range(1, 30))
    assert parse_range(CONFIGS["tabp-sub-both"]["block_range"], 28) == list(range(14, 28))
    with pytest.raises(TabpError, match="latter, whole, after-first or START:END"):
        parse_range("most", 30)


def test_ddf_ties_neutral_or_against():
    d = torch.tensor([[0.0, -1.0], [0.0, 1.0], [1.0, 0.0]])
    # entropy: alpha = -1, a drop is desirable
    assert ddf(d, -1).tolist() == pytest.approx([0.0, 1 / 3])
    assert ddf(d, -1, ties="neutral").tolist() == pytest.approx([2 / 3, 2 / 3])


def test_cloze_distribution_equals_hand_computation(tiny):
    model, tok = tiny
    data = items()
    assert all(cloze_token_ids(tok, i) is not None for i in data)
    ctx = ctx_for(tiny, data, probe="cloze", statistic="entropy", norm=True)
    stats = per_sample_statistics(ctx)  # (N, B+1)
    # by hand: the last context position's hidden state after every block, the LM head restricted
    # to each choice's first token, renormalised, entropy
    for n, item in enumerate(data):
        enc = tok(mcqa_context(item), return_tensors="pt")
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        ids = [tok.encode(f" {c}", add_special_tokens=False)[0] for c in item.choices]
        for b, h in enumerate(hs):
            x = h[0, -1] if b == len(hs) - 1 else model.model.norm(h[0, -1])  # last is normed already
            logp = torch.log_softmax((x @ model.lm_head.weight[ids].T).float(), -1)
            assert stats[n, b].item() == pytest.approx(-(logp.exp() * logp).sum().item(), abs=1e-4)


def test_cloze_collision_falls_back_to_continuation_loglik(tiny):
    model, tok = tiny
    item = MCQAItem("Pick one.", ["blue sky", "blue sea", "red sun"], 2)
    assert cloze_token_ids(tok, item) is None  # " blue" twice
    ctx = ctx_for(tiny, [item], probe="cloze", norm=True)
    ll = _continuation_loglik(ctx, item)  # (B+1, C)
    assert ll.shape == (7, 3) and ctx.forward_passes == 3
    # by hand at the final block: the choice's tokens' log-probs after the context
    context_ids = tok(mcqa_context(item))["input_ids"]
    for c, choice in enumerate(item.choices):
        full = tok(f"{mcqa_context(item)} {choice}", return_tensors="pt")
        with torch.no_grad():
            logits = model(**full).logits[0].float()
        cont = full["input_ids"][0, len(context_ids):]
        lp = torch.log_softmax(logits[len(context_ids) - 1:-1], -1).gather(-1, cont[:, None]).sum()
        assert ll[-1, c].item() == pytest.approx(lp.item(), abs=1e-3)
    stats = per_sample_statistics(ctx)
    assert torch.isfinite(stats).all()


def test_auto_probe_measures_and_records(tiny):
    data = Dataset("t", "train", "mcqa", items() * 4)
    res = run_scoring("unused", data, k=1, block_range="0:6", model_and_tokenizer=tiny)
    auto = res.params["probe_auto"]
    assert set(auto) >= {"lettered_accuracy", "chance", "n", "letters_if_above", "choice"}
    assert auto["n"] == 12 and res.params["probe"] == auto["choice"]
    # a random tiny model does not answer lettered questions: cloze is chosen
    assert auto["choice"] == "cloze" and res.params["probe"] == "cloze"
    # letters and the judgement share one pass; switching to cloze costs a second one
    assert res.forward_passes == 24
    forced = run_scoring("unused", data, k=1, block_range="0:6", model_and_tokenizer=tiny,
                         probe="letters")
    assert forced.forward_passes == 12 and "probe_auto" not in forced.params


def test_left_truncation_keeps_the_answer_tail(demo_model):
    from tabp_vllm.scoring.probe import _encode, load_model

    model, tok = load_model(demo_model)
    item = MCQAItem("word " * 400 + "Which?", ["a", "b"], 0)
    ctx = ctx_for((model, tok), [item], max_length=64)
    ids = _encode(ctx, [paper_prompt(item)])["input_ids"][0]
    assert len(ids) == 64 and tok.decode(ids).endswith("Answer: ")
    with pytest.raises(TabpError, match="unknown probe"):
        run_scoring("unused", Dataset("t", "train", "mcqa", [item]), k=1, probe="letterz",
                    model_and_tokenizer=(model, tok))


def test_paper_preset_options_layer_under_given_flags():
    from tabp_vllm.scoring.options import ScoreOptions
    from tabp_vllm.options import build_options

    o = build_options(ScoreOptions, {"preset": "paper", "output": "m.json"})
    assert (o.task, o.split, o.samples, o.first_samples) == ("arc_easy", "train", 1024, True)
    assert (o.method, o.statistic, o.aggregate, o.norm, o.probe, o.block_range) == (
        "tabp", "entropy", "ddf", False, "letters", "latter")
    mine = build_options(ScoreOptions, {"preset": "paper", "output": "m.json", "aggregate": "ssn",
                                        "task": "piqa"})
    assert (mine.aggregate, mine.task, mine.statistic) == ("ssn", "piqa", "entropy")
    plain = build_options(ScoreOptions, {"task": "arc_easy", "output": "m.json"})
    assert (plain.probe, plain.preset, plain.first_samples) == ("auto", None, False)
    with pytest.raises(TabpError, match="preset"):
        build_options(ScoreOptions, {"preset": "papers", "output": "m.json"})
