"""The scoring registry and the one batch iterator, on the tiny random Llama."""

import pytest
import torch

from tabp_vllm.data import Dataset, MCQAItem, TextItem
from tabp_vllm.scoring import METHOD_NAMES, all_methods, get_method, result_for_k, run_scoring
from tabp_vllm.scoring.base import ScoringMethod
from tabp_vllm.scoring.probe import ScoreContext, decoder_layers, forward_batches, lm_text
from tiny_llama import tiny_llama


@pytest.fixture(scope="module")
def tiny(demo_model):
    return tiny_llama(demo_model)


def mcqa(n=5):
    return Dataset("m", "train", "mcqa", [MCQAItem(f"Is {i} > 1?", ["no", "yes"], int(i > 1)) for i in range(n)])


def test_registry_names_are_the_methods_names():
    methods = all_methods()
    assert tuple(methods) == METHOD_NAMES and len(set(METHOD_NAMES)) == len(METHOD_NAMES)
    for name, m in methods.items():
        assert isinstance(m, ScoringMethod) and m.name == name and m.summary
        assert get_method(name) is m  # one instance per method
    assert {n for n, m in methods.items() if not m.ranks_all_k} == {"angular"}
    assert {n for n, m in methods.items() if m.sublayer_only} == {"what_matters"}


def test_unknown_method_is_one_line():
    from tabp_vllm.errors import TabpError
    with pytest.raises(TabpError) as e:
        get_method("magic")
    assert "unknown method 'magic'" in str(e.value) and "tabp" in str(e.value) and "\n" not in str(e.value)


def test_cli_method_choices_are_the_registry(tmp_path):
    import typer
    from pydantic import ValidationError
    from typer.testing import CliRunner

    from tabp_vllm.scoring.commands import score
    from tabp_vllm.scoring.options import ScoreOptions
    for name in METHOD_NAMES:
        assert ScoreOptions(task="t", output=tmp_path / "m.json", method=name).method == name
    with pytest.raises(ValidationError, match="unknown method"):
        ScoreOptions(task="t", output=tmp_path / "m.json", method="magic")
    app = typer.Typer()
    app.command("score")(score)
    app.command("noop")(lambda: None)
    out = CliRunner().invoke(app, ["score", "--help"]).output
    help_text = " ".join(out.replace("│", " ").split())  # the help's table wraps lines
    assert ", ".join(METHOD_NAMES) in help_text


@pytest.mark.parametrize("name,granularity", [(n, g) for g in ("block", "sublayer") for n in METHOD_NAMES
                                              if g == "sublayer" or not get_method(n).sublayer_only])
def test_every_method_records_its_params_and_costs_what_it_reports(tiny, name, granularity):
    ds = mcqa(5)
    # max_length 32: WikiText paragraphs (sleb, ppl, what_matters) cut short, as the cost is in passes
    res = run_scoring("unused", ds, name, k=2, block_range="1:6", batch_size=2, model_and_tokenizer=tiny,
                      probe="letters", granularity=granularity,  # auto may add a pass (tests/test_tabp_probe.py)
                      max_length=32)
    method = get_method(name)
    per_block = 2 if granularity == "sublayer" else 1  # sublayers: units 2i (attention), 2i+1 (MLP)
    candidates = list(range(per_block, 6 * per_block))  # those of blocks 1..5
    ctx = ScoreContext(model=tiny[0], tokenizer=tiny[1], dataset=ds, k=2, candidates=candidates,
                       mode="mcqa", batch_size=2, probe="letters", granularity=granularity, max_length=32)
    assert res.method == name
    assert res.params["k"] == 2 and res.params["candidate_range"] == [1, 6] and res.params["seed"] == 0
    assert method.params(ctx).items() <= res.params.items()
    assert res.forward_passes == res.calibration["forward_passes"] == method.forward_passes(5, len(candidates), 2)
    assert len(res.scores) == 6 * per_block and len(res.removed) == 2
    scored = [u for u, s in enumerate(res.scores) if s is not None]
    assert set(res.removed) <= set(scored) <= set(candidates)  # angular's blocks: the starts of runs
    if granularity == "sublayer":
        assert scored == candidates
        assert res.params["granularity"] == "sublayer" and res.params["units"] == "both"
        assert len(res.params["unit_flops"]) == 12
    else:  # whole-block runs record what they always did
        assert not {"granularity", "units", "unit_flops", "flops_ratio"} & set(res.params)


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if get_method(n).ranks_all_k
                                  and not get_method(n).sublayer_only])
def test_ranks_all_k_means_one_run_serves_smaller_k(tiny, name):
    big = run_scoring("unused", mcqa(), name, k=3, block_range="0:6", model_and_tokenizer=tiny)
    for k in (1, 2):
        own = run_scoring("unused", mcqa(), name, k=k, block_range="0:6", model_and_tokenizer=tiny)
        assert result_for_k(big, k).removed == own.removed, (name, k)


# --------------------------------------------------------------------------- the batch iterator

def text_ctx(tiny, n=6, batch_size=4):
    ds = Dataset("t", "train", "text", [TextItem("word " * (i + 1)) for i in range(n)])
    return ScoreContext(model=tiny[0], tokenizer=tiny[1], dataset=ds, k=1, candidates=list(range(6)),
                        mode="text", batch_size=batch_size)


def test_batches_cover_the_set_in_order_count_passes_and_tick_after_use(tiny):
    ctx = text_ctx(tiny)
    events = []
    seen = []
    for b in forward_batches(ctx, lm_text, tick=lambda n=1: events.append("tick")):
        events.append("use")
        seen += b.items
        assert b.hidden == []  # not asked for
        att = b.inputs["attention_mask"]
        assert att.shape[0] == len(b.items) and bool(att[:, -1].all())  # left padded
        assert b.output.shape[:2] == att.shape
    assert seen == ctx.dataset.items
    assert events == ["use", "tick", "use", "tick"]  # 6 samples, batches of 4
    assert ctx.forward_passes == 6


def test_hidden_states_and_output_are_the_models(tiny):
    model = tiny[0]
    ctx = text_ctx(tiny, n=3)
    (b,) = list(forward_batches(ctx, lm_text, hidden=True))
    assert len(b.hidden) == 6 + 1  # embeddings and every block
    assert all(h.shape == b.hidden[0].shape for h in b.hidden)
    with torch.no_grad():
        ref = model(**b.inputs, use_cache=False, output_hidden_states=True)
        assert torch.allclose(model.model.norm(b.hidden[-1]), b.output, atol=1e-5)
        assert torch.allclose(model.lm_head(b.output), ref.logits, atol=1e-5)
        for mine, theirs in zip(b.hidden[:-1], ref.hidden_states[:-1]):  # HF's last one is normed
            assert torch.allclose(mine, theirs, atol=1e-5)


def test_skipped_blocks_are_left_out_and_put_back(tiny):
    model = tiny[0]
    layers = decoder_layers(model)
    full = list(forward_batches(text_ctx(tiny), lm_text))
    no3 = list(forward_batches(text_ctx(tiny), lm_text, hidden=True, skip={3}))
    no2 = list(forward_batches(text_ctx(tiny), lm_text, skip={2}))
    assert len(no3[0].hidden) == 6  # one block fewer
    for f, s3, s2 in zip(full, no3, no2):
        assert torch.allclose(f.output, s3.output, atol=1e-5)  # block 3 is the identity
        assert not torch.allclose(f.output, s2.output, atol=1e-3)
    assert decoder_layers(model) is layers and len(layers) == 6
