"""Score the demo model on a few samples through the CLI; the mask loads and the engine serves it."""

import typer
from typer.testing import CliRunner

from tabp_vllm.scoring.commands import score
from tabp_vllm.mask import load_mask


def app():
    a = typer.Typer()
    a.command("score")(score)
    a.command("noop")(lambda: None)
    return a


def test_score_writes_valid_mask_that_is_served(tmp_path, demo_model):
    out = tmp_path / "demo.json"
    # 4 samples, batches of 2 (25 s a run on a 2-core AVX2 box with 8): the mask, not its quality
    r = CliRunner().invoke(app(), ["score", "--task", "demo", "--samples", "4", "--k", "4",
                                   "--batch-size", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    mask = load_mask(out, demo_model)
    assert len(mask.removed_layers) == 4 and all(15 <= i < 30 for i in mask.removed_layers)
    assert mask.method == "tabp" and mask.params["statistic"] == "entropy"
    cal = mask.calibration
    # the auto probe judges the lettered format in the probe's own pass; cloze costs a second one
    auto = mask.params["probe_auto"]
    assert auto["n"] == 4 and mask.params["probe"] == auto["choice"]
    # cloze: items whose choices share a first token (" 1" in " 12" and " 15") add a pass a choice
    assert cal["forward_passes"] == 4 if auto["choice"] == "letters" else cal["forward_passes"] >= 8
    assert cal["samples"] == 4 and len(cal["sha256"]) == 16
    assert len(mask.scores) == 30 and mask.scores[0] is None
    # deterministic for a seed
    out2 = tmp_path / "demo2.json"
    CliRunner().invoke(app(), ["score", "--task", "demo", "--samples", "4", "--k", "4",
                               "--batch-size", "4", "-o", str(out2)])
    assert load_mask(out2).removed_layers == mask.removed_layers
    # the loader accepts it and an engine serves it: an offline engine in this process (lm-eval
    # on a mask, through a child process, is tests/test_eval.py's; here it cost ~20 s more)
    from vllm import SamplingParams

    from tabp_vllm.engine import build_llm, engine_model_stats

    llm = build_llm(demo_model, mask, kv_cache_gib=0.25, max_model_len=512)
    try:
        assert engine_model_stats(llm)["num_layers"] == 26
        gen = llm.generate(["The capital of France is"], use_tqdm=False,
                           sampling_params=SamplingParams(temperature=0, max_tokens=4, min_tokens=4))
        assert len(gen[0].outputs[0].token_ids) == 4
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_score_bad_options_exit_2(tmp_path):
    r = CliRunner().invoke(app(), ["score", "--task", "demo", "--method", "magic", "-o", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "unknown method" in r.output
    r = CliRunner().invoke(app(), ["score", "--task", "demo", "--k", "40", "-o", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "k = 40" in r.output
    # refused with one line, before any mask is written
    assert [ln for ln in r.output.splitlines() if ln.startswith("error")] == [
        "error: k = 40: must be between 1 and the 15 candidate blocks"]
    assert not (tmp_path / "x.json").exists()


def test_score_keeps_perplexity_progress_until_the_mask_is_written(tmp_path):
    """`score --method ppl-task`: its per-batch save sits beside the output while it runs and is
    gone once the mask is written; a save of another run there is one error line, exit 2, kept."""
    out = tmp_path / "ppl.json"
    partial = tmp_path / "ppl.json.partial.json"
    argv = ["score", "--task", "demo", "--method", "ppl-task", "--samples", "4", "--k", "2",
            "--batch-size", "2", "-o", str(out)]
    partial.write_text('{"key": {"method": "sleb"}, "rounds": {}}')
    r = CliRunner().invoke(app(), argv)
    assert r.exit_code == 2 and "a save of another scoring run" in r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in r.output
    assert partial.exists() and not out.exists()
    partial.unlink()
    r = CliRunner().invoke(app(), argv)
    assert r.exit_code == 0, r.output
    assert load_mask(out).method == "ppl-task" and not partial.exists()
