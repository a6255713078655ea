"""`score` / `eval` options: CLI flag > --config YAML > the model's default; bad input is one line."""

import pytest
import typer
from typer.testing import CliRunner

from tabp_vllm import commands_score
from tabp_vllm.commands_score import EvalOptions, ScoreOptions


def app_capturing(monkeypatch, runner_name: str):
    """The score and eval commands with their run step replaced by capturing the options."""
    got = []
    monkeypatch.setattr(commands_score, runner_name, got.append)
    a = typer.Typer()
    a.command("score")(commands_score.score)
    a.command("eval")(commands_score.eval)
    return a, got


def test_score_precedence_cli_over_file_over_default(tmp_path, monkeypatch):
    cfg = tmp_path / "score.yaml"
    cfg.write_text("task: arc_easy\nmethod: sleb\nk: 2\nseed: 7\nblock_range: '20:30'\n"
                   "norm: false\noutput: from_file.json\n")
    app, got = app_capturing(monkeypatch, "run_score")
    r = CliRunner().invoke(app, ["score", "--config", str(cfg), "--k", "3", "--norm", "-o", "cli.json"])
    assert r.exit_code == 0, r.output
    (o,) = got
    assert (o.k, o.norm, str(o.output)) == (3, True, "cli.json")                   # CLI wins
    assert (o.task, o.method, o.seed, o.block_range) == ("arc_easy", "sleb", 7, "20:30")  # file
    assert (o.batch_size, o.statistic, o.samples) == (16, "entropy", 256)         # defaults
    assert o.blocks() == (3, None)


def test_score_defaults_without_file(tmp_path, monkeypatch):
    app, got = app_capturing(monkeypatch, "run_score")
    r = CliRunner().invoke(app, ["score", "--task", "demo", "--ratio", "0.2", "--no-norm", "-o", "m.json"])
    assert r.exit_code == 0, r.output
    (o,) = got
    assert o.model_dump() == ScoreOptions(task="demo", ratio=0.2, norm=False, output="m.json").model_dump()
    assert o.blocks() == (None, 0.2)
    assert ScoreOptions(task="demo", output="m.json").blocks() == (ScoreOptions.DEFAULT_K, None)


def test_score_defaults_are_run_scorings():
    import inspect

    from tabp_vllm.scoring import run_scoring
    params = inspect.signature(run_scoring).parameters
    for name in ("method", "statistic", "aggregate", "p", "mode", "norm", "batch_size", "max_length",
                 "text_positions", "seed", "device", "block_range"):
        assert ScoreOptions.default(name) == params[name].default, name


@pytest.mark.parametrize("yaml_text,expect", [
    ("task: demo\noutput: m.json\nstatistc: kl\n", "unknown option 'statistc'"),
    ("task: demo\noutput: m.json\nk: four\n", "option 'k'"),
    ("task: demo\noutput: m.json\nmethod: magic\n", "unknown method"),
    ("task: demo\noutput: m.json\nsamples: 0\n", "option 'samples': must be positive"),
    ("- just\n- a list\n", "expected a mapping"),
])
def test_score_bad_config_is_one_line_exit_2(tmp_path, monkeypatch, yaml_text, expect):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    app, got = app_capturing(monkeypatch, "run_score")
    r = CliRunner().invoke(app, ["score", "--config", str(cfg)])
    assert r.exit_code == 2 and not got
    errors = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(errors) == 1 and expect in errors[0], r.output
    assert str(cfg) in errors[0]


def test_score_bad_flag_names_the_command_line(tmp_path, monkeypatch):
    app, got = app_capturing(monkeypatch, "run_score")
    r = CliRunner().invoke(app, ["score", "--task", "demo", "--samples", "-3", "-o", "m.json"])
    assert r.exit_code == 2 and not got
    assert r.output.strip() == "error: command line: option 'samples': must be positive (got -3)"


def test_eval_options(tmp_path, monkeypatch):
    from tabp_vllm.engine import DEFAULT_CPU_KV_CACHE_GIB
    app, got = app_capturing(monkeypatch, "run_eval")
    r = CliRunner().invoke(app, ["eval", "--task", "demo"])
    assert r.exit_code == 0, r.output
    o = got.pop()
    assert (o.task_mask, o.dense, o.kv_cache_gib, o.limit) == ([], True, None, None)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("task: arc_easy\nlimit: 20\nkv_cache_gib: 0.5\ntask_mask: [a.json]\n")
    r = CliRunner().invoke(app, ["eval", "-c", str(cfg), "--no-dense", "--task-mask", "b.json",
                                 "--task-mask", "c.json", "--limit", "5"])
    assert r.exit_code == 0, r.output
    o = got.pop()
    assert [p.name for p in o.task_mask] == ["b.json", "c.json"] and not o.dense
    assert (o.task, o.limit, o.kv_cache_gib) == ("arc_easy", 5, 0.5)
    # the KV cache default is the engine's one constant, shown in the help
    assert EvalOptions.default("kv_cache_gib") is None
    assert f"{DEFAULT_CPU_KV_CACHE_GIB:g} on CPU" in EvalOptions.shown("kv_cache_gib")
