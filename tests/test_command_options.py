"""`serve` and `bench` options: CLI flag > config file > model default, one-line errors (fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from tabp_vllm.errors import TabpError
from tabp_vllm.loadtest.options import BenchOptions
from tabp_vllm.serve.options import EngineOptions, ServeOptions
from tabp_vllm.serve.commands import serve_options


def _cli(command) -> typer.Typer:
    app = typer.Typer()
    app.command()(command)
    return app


def _one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


# ---- bench --------------------------------------------------------------------------------------

@pytest.fixture()
def bench_runs(monkeypatch):
    """The options each `tabp-vllm bench` invocation hands to run_bench (nothing is measured)."""
    from tabp_vllm.loadtest import commands

    seen: list[BenchOptions] = []
    monkeypatch.setattr(commands, "run_bench", lambda options, **kw: seen.append(options))
    return seen


def test_bench_cli_over_file_over_default(tmp_path, bench_runs):
    from tabp_vllm.loadtest.commands import bench

    cfg = tmp_path / "bench.yaml"
    cfg.write_text(yaml.safe_dump({"duration": 12.5, "rounds": 2, "levels": "1,2",
                                   "masks": ["a.json"], "stem": "from-file", "kv_cache_gib": 0.5}))
    res = CliRunner().invoke(_cli(bench), ["--config", str(cfg), "--rounds", "6",
                                           "--name", "from-cli"])
    assert res.exit_code == 0, res.output
    (o,) = bench_runs
    assert o.rounds == 6 and o.stem == "from-cli"                  # flag given: the CLI's
    assert o.duration == 12.5 and o.levels == [1.0, 2.0]           # only in the file: the file's
    assert o.masks == ["a.json"] and o.kv_cache_gib == 0.5
    assert o.ramp == BenchOptions.default("ramp") == 5.0           # neither: the model's
    assert o.range_ratio == 0.5 and o.mode == "closed"


def test_bench_defaults_are_the_models(bench_runs):
    from tabp_vllm.loadtest.commands import bench

    assert CliRunner().invoke(_cli(bench), []).exit_code == 0
    assert bench_runs[0] == BenchOptions()
    assert BenchOptions().kv_cache_gib is None  # the engine's DEFAULT_CPU_KV_CACHE_GIB applies


@pytest.mark.parametrize("doc, named", [
    ({"rounds": 2, "durration": 5}, "unknown option 'durration'"),
    ({"rounds": 0}, "option 'rounds'"),
    ({"levels": "1,x"}, "option 'levels': expected numbers"),
    ({"levels": "1.5"}, "closed-loop levels are whole concurrencies"),
    ({"mode": "sideways"}, "option 'mode'"),
])
def test_bench_bad_config_is_one_line_exit_2(tmp_path, bench_runs, doc, named):
    from tabp_vllm.loadtest.commands import bench

    cfg = tmp_path / "bench.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    line = _one_error_line(CliRunner().invoke(_cli(bench), ["--config", str(cfg)]))
    assert named in line and str(cfg) in line
    assert not bench_runs


def test_bench_bad_flag_names_the_command_line(bench_runs):
    from tabp_vllm.loadtest.commands import bench

    line = _one_error_line(CliRunner().invoke(_cli(bench), ["--levels", "0,4"]))
    assert line.startswith("error: command line: option 'levels'") and "positive" in line


def test_run_bench_fields_override_given_options(monkeypatch):
    """run_bench(options, **fields): fields win, then the options' set fields, then defaults."""
    from tabp_vllm.loadtest import commands

    seen = {}

    def stop(model):  # the first thing run_bench does with the merged options
        seen["model"] = model
        raise TabpError("stop")

    monkeypatch.setattr("tabp_vllm.models.resolve_model", stop)
    with pytest.raises(TabpError, match="stop"):
        commands.run_bench(BenchOptions(model="from-options"), model="from-fields", progress=False)
    assert seen["model"] == "from-fields"
    with pytest.raises(TabpError, match="option 'rounds'"):
        commands.run_bench(rounds=0, progress=False)


# ---- serve --------------------------------------------------------------------------------------

def test_serve_cli_over_file_over_default(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({
        "port": 8050, "host": "0.0.0.0", "replicas": 2,
        "engine": {"max_model_len": 256, "kv_cache_gib": 0.5, "extra": {"max_num_seqs": 4, "a": 1}},
        "variants": [{"mask": "m/g.json", "name": "g"}],
    }))
    o = serve_options(config=cfg, port=8060, kv_cache_gib=0.75, engine_arg=["a=2"],
                      task_mask=[Path("/x/k4.json")], task=["k4"])
    assert o.port == 8060 and o.engine.kv_cache_gib == 0.75        # flag given: the CLI's
    assert o.host == "0.0.0.0" and o.replicas == 2                 # only in the file: the file's
    assert o.engine.max_model_len == 256
    assert o.engine.extra == {"max_num_seqs": 4, "a": 2}           # extra merged, CLI key wins
    assert o.metrics_port == ServeOptions.default("metrics_port") == 8090  # neither: the model's
    assert o.engine.enforce_eager is None and o.engine.dtype == "auto"  # None: per device
    # the file's variants (mask relative to the file), then the CLI's
    assert [(v.mask, v.task, v.name) for v in o.variants] == [
        (str(tmp_path / "m/g.json"), None, "g"), ("/x/k4.json", "k4", None)]


def test_serve_defaults_are_the_models():
    o = serve_options()
    assert o == ServeOptions() and o.engine == EngineOptions()
    assert o.engine.kv_cache_gib is None and o.engine.max_model_len == 2048
    # a flag explicitly given equal to the default still wins over the file
    assert serve_options(port=8000).model_fields_set == {"port"}


def test_serve_file_values_win_over_defaults_only_where_set(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("dense: false\nengine:\n  enforce_eager: false\n")
    o = serve_options(config=cfg)
    assert o.dense is False and o.engine.enforce_eager is False
    assert o.engine.max_model_len == 2048 and o.port == 8000
    assert serve_options(config=cfg, dense=True, enforce_eager=True).dense is True


@pytest.mark.parametrize("text, named", [
    ("model: llama\nvariantz: []\n", "unknown key(s) ['variantz']"),
    ("engine:\n  dtype: float8\n", "option 'engine.dtype'"),
    ("engine:\n  max_model_lenn: 5\n", "unknown option 'engine.max_model_lenn'"),
    ("port: eighty\n", "option 'port'"),
    ("variants:\n  - task: gsm8k\n", "option 'variants.0.mask'"),
    ("replicas: 0\n", "option 'replicas'"),
])
def test_serve_bad_config_is_one_line_exit_2(tmp_path, text, named):
    from tabp_vllm.serve.commands import serve

    cfg = tmp_path / "serve.yaml"
    cfg.write_text(text)
    line = _one_error_line(CliRunner().invoke(_cli(serve), ["--config", str(cfg), "--dry-run"]))
    assert named in line and str(cfg) in line


def test_serve_bad_flag_names_the_command_line():
    from tabp_vllm.serve.commands import serve

    line = _one_error_line(CliRunner().invoke(_cli(serve), ["--dtype", "float8", "--dry-run"]))
    assert line.startswith("error: command line: option 'engine.dtype'")


def test_serve_dry_run_shows_the_merged_options(tmp_path, write_mask):
    from tabp_vllm.serve.commands import serve

    write_mask([26, 27, 28, 29], task="k4", name="k4.json")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"port": 8050, "dense": False, "api_key": "from-file",
                                   "variants": [{"mask": "k4.json"}]}))
    res = CliRunner().invoke(_cli(serve), ["--config", str(cfg), "--port", "8060", "--dry-run",
                                           "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    assert "http://127.0.0.1:8060/v1/models" in res.stdout and "8050" not in res.stdout
    assert "llama-k4" in res.stdout and "(Bearer API key required)" in res.stdout
    assert res.stdout.splitlines()[0] == "dtype: float32 (as given)"
