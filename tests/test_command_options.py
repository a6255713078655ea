"""Every command's options, one test for all: each field of its options model is a flag (none
left out), the help shows the field's own default, and a value comes from the CLI flag, else the
--config file, else the model's default. Bad input is one error line, exit 2. (Fast: the commands
are invoked through the real `tabp-vllm` app with their run step replaced by a capture.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from tabp_vllm.cli import app
from tabp_vllm.errors import TabpError
from tabp_vllm.evaluation.options import EvalOptions
from tabp_vllm.loadtest.options import BenchOptions
from tabp_vllm.options import cli_flags, flag_of, shown_default
from tabp_vllm.routing.options import RouteFitOptions
from tabp_vllm.scoring.options import ScoreOptions
from tabp_vllm.serve.options import EngineOptions, ServeOptions


@dataclass
class Case:
    argv: list[str]                 # the command
    cls: type                       # its options model
    runner: str                     # "module:function" the command hands the options to
    file: dict[str, Any]            # the --config file
    cli: list[str]                  # flags given
    expect: dict[str, Any]          # dotted field -> value (the CLI's where given, else the file's)
    file_only: set[str] = field(default_factory=set)  # config-file-only fields (no flag)


CASES = {
    "score": Case(["score"], ScoreOptions, "tabp_vllm.scoring.commands:run_score",
                  file={"task": "arc_easy", "k": 2, "seed": 7, "block_range": "20:30",
                        "norm": False, "output": "from_file.json"},
                  cli=["--k", "3", "--norm", "-o", "cli.json"],
                  expect={"task": "arc_easy", "k": 3, "seed": 7, "block_range": "20:30",
                          "norm": True, "output": "cli.json"}),
    "eval": Case(["eval"], EvalOptions, "tabp_vllm.evaluation.commands:run_eval",
                 file={"task": "arc_easy", "limit": 20, "kv_cache_gib": 0.5,
                       "task_mask": ["a.json"]},
                 cli=["--no-dense", "--task-mask", "b.json", "--task-mask", "c.json", "--limit", "5",
                      "--include-path", "tasks"],
                 expect={"task": "arc_easy", "limit": 5, "kv_cache_gib": 0.5, "dense": False,
                         "task_mask": ["b.json", "c.json"], "include_path": "tasks"}),
    "route fit": Case(["route", "fit"], RouteFitOptions, "tabp_vllm.routing.commands:run_fit",
                      file={"task": ["arc_easy"], "clusters": 3, "k": 2, "output": "r.json"},
                      cli=["--k", "5", "--task", "piqa", "--task", "boolq", "--range", "latter"],
                      expect={"task": ["piqa", "boolq"], "clusters": 3, "k": 5,
                              "block_range": "latter", "output": "r.json"}),
    "bench": Case(["bench"], BenchOptions, "tabp_vllm.loadtest.commands:run_bench",
                  file={"duration": 12.5, "rounds": 2, "levels": "1,2", "masks": ["a.json"],
                        "stem": "from-file", "kv_cache_gib": 0.5},
                  cli=["--rounds", "6", "--name", "from-cli", "-v", "a", "-v", "b@http://h:1"],
                  expect={"duration": 12.5, "rounds": 6, "levels": [1.0, 2.0], "masks": ["a.json"],
                          "stem": "from-cli", "kv_cache_gib": 0.5,
                          "variants": ["a", "b@http://h:1"]}),
    "serve": Case(["serve"], ServeOptions, "tabp_vllm.serve.commands:run_serve",
                  file={"port": 8050, "host": "0.0.0.0", "replicas": 2,
                        "engine": {"max_model_len": 256, "kv_cache_gib": 0.5},
                        "request_path": {"ray_serve": "lean"}},
                  cli=["--port", "8060", "--kv-cache-gib", "0.75", "--no-eager", "-tp", "2",
                       "--engine-arg", "max_num_seqs=4"],
                  expect={"port": 8060, "host": "0.0.0.0", "replicas": 2,
                          "engine.max_model_len": 256, "engine.kv_cache_gib": 0.75,
                          "engine.enforce_eager": False, "engine.tensor_parallel_size": 2,
                          "engine.extra": {"max_num_seqs": 4}, "request_path.ray_serve": "lean"},
                  file_only={"variants", "engine.extra"}),
}


def _fields(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every field of `cls`, nested models flattened, as dotted name -> FieldInfo."""
    out = {}
    for name, f in cls.model_fields.items():
        sub = f.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            out.update(_fields(sub, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = f
    return out


def _get(o: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        o = getattr(o, part)
    return o


def _plain(v: Any) -> Any:
    from pathlib import Path

    if isinstance(v, Path):
        return str(v)
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


@pytest.fixture()
def captured(monkeypatch):
    """Each command's options as handed to its run step (nothing runs)."""
    import importlib

    seen: list[Any] = []
    for case in CASES.values():
        module, name = case.runner.split(":")
        monkeypatch.setattr(importlib.import_module(module), name,
                            lambda o, *a, **kw: seen.append(o))
    return seen


def _command(argv: list[str]):
    cmd = typer.main.get_command(app)
    for name in argv:
        cmd = cmd.commands[name]
    return cmd


@pytest.mark.parametrize("name", CASES)
def test_every_field_is_a_flag_with_the_models_default(name):
    case = CASES[name]
    params = {p.name: p for p in _command(case.argv).params}
    fields = _fields(case.cls)
    flags = {".".join(f.path): f for f in cli_flags(case.cls)}
    assert set(fields) - set(flags) == case.file_only       # every other field has its flag
    for dotted, f in fields.items():
        if dotted in case.file_only:
            continue
        p = params[dotted.split(".")[-1]]
        assert p.default is None, dotted                         # None: "not given"
        assert f"[default: {shown_default(f)}]" in p.help or (
            f.is_required() and "[required, here or in --config]" in p.help), (dotted, p.help)
        # a bad value from the command line is reported under the flag the user typed
        assert flag_of(case.cls, tuple(dotted.split("."))) in p.opts, (dotted, p.opts)
    for dotted in case.file_only:
        assert flag_of(case.cls, tuple(dotted.split("."))) is None, dotted


@pytest.mark.parametrize("name", CASES)
def test_cli_over_file_over_default(name, tmp_path, captured):
    case = CASES[name]
    cfg = tmp_path / "options.yaml"
    cfg.write_text(yaml.safe_dump(case.file))
    res = CliRunner().invoke(app, case.argv + ["--config", str(cfg)] + case.cli)
    assert res.exit_code == 0, res.output
    (o,) = captured
    for dotted, f in _fields(case.cls).items():
        got = _get(o, dotted)
        if dotted in case.expect:
            assert _plain(got) == case.expect[dotted], dotted
        elif not f.is_required():                                # neither: the model's
            want = f.get_default(call_default_factory=True)
            assert got == want, (dotted, got, want)


@pytest.mark.parametrize("name, doc, named", [
    ("score", {"task": "demo", "output": "m.json", "statistc": "kl"}, "unknown option 'statistc'"),
    ("score", {"task": "demo", "output": "m.json", "method": "magic"}, "unknown method"),
    ("score", {"task": "demo", "output": "m.json", "samples": 0}, "option 'samples': must be positive"),
    ("eval", {"task": "demo", "limit": "many"}, "option 'limit'"),
    ("route fit", {"task": [], "output": "r.json"}, "option 'task'"),
    ("bench", {"rounds": 2, "durration": 5}, "unknown option 'durration'"),
    ("bench", {"levels": "1.5"}, "closed-loop levels are whole concurrencies"),
    ("bench", {"mode": "sideways"}, "option 'mode'"),
    ("serve", {"engine": {"dtype": "float8"}}, "option 'engine.dtype'"),
    ("serve", {"engine": {"max_model_lenn": 5}}, "unknown option 'engine.max_model_lenn'"),
    ("serve", {"variants": [{"task": "gsm8k"}]}, "option 'variants.0.mask'"),
])
def test_bad_config_is_one_line_exit_2(name, doc, named, tmp_path, captured):
    cfg = tmp_path / "options.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    line = _one_error_line(CliRunner().invoke(app, CASES[name].argv + ["--config", str(cfg)]))
    assert named in line and str(cfg) in line
    assert not captured


@pytest.mark.parametrize("argv, starts", [
    (["score", "--task", "demo", "--samples", "-3", "-o", "m.json"],
     "error: command line: option 'samples': must be positive (got -3) (flag --samples)"),
    (["bench", "--levels", "0,4"], "error: command line: option 'levels'"),
    (["serve", "--dtype", "float8"], "error: command line: option 'engine.dtype'"),
    (["serve", "--ray-serve", "fast"], "error: command line: option 'request_path.ray_serve'"),
])
def test_bad_flag_names_the_command_line(argv, starts, captured):
    line = _one_error_line(CliRunner().invoke(app, argv))
    bad = next(a for a in argv if a.startswith("--") and a[2:] not in ("task", "output"))
    assert line.startswith(starts) and line.endswith(f"(flag {bad})"), line
    assert not captured


def _one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


# ---- what is particular to one command ------------------------------------------------------------

def test_help_names_the_engine_defaults():
    """Defaults that mean "the engine's" are named from the engine's constants, not copied."""
    from tabp_vllm.engine import DEFAULT_MAX_MODEL_LEN
    from tabp_vllm.memory import DEFAULT_CPU_KV_CACHE_GIB

    for cls in (EvalOptions, BenchOptions, EngineOptions):
        assert f"{DEFAULT_CPU_KV_CACHE_GIB:g}" in shown_default(cls.model_fields["kv_cache_gib"])
    assert EngineOptions().max_model_len == BenchOptions().max_model_len == DEFAULT_MAX_MODEL_LEN


def test_api_key_from_the_environment(captured):
    res = CliRunner().invoke(app, ["serve"], env={"TABP_VLLM_API_KEY": "sekret"})
    assert res.exit_code == 0, res.output
    assert captured[0].api_key == "sekret"


def test_score_defaults_are_run_scorings():
    import inspect

    from tabp_vllm.scoring import run_scoring

    params = inspect.signature(run_scoring).parameters
    for name in ("method", "statistic", "aggregate", "p", "mode", "norm", "batch_size", "max_length",
                 "text_positions", "probe", "seed", "device", "block_range"):
        assert ScoreOptions.model_fields[name].default == params[name].default, name
    assert ScoreOptions(task="demo", output="m.json").blocks() == (ScoreOptions.DEFAULT_K, None)
    assert ScoreOptions(task="demo", ratio=0.2, output="m.json").blocks() == (None, 0.2)


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


def test_serve_options_by_flag_name(tmp_path):
    """`serve_options` (the scripts' and tests' way in) takes the flags by name, nested or not."""
    from tabp_vllm.serve.commands import serve_options

    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"engine": {"extra": {"max_num_seqs": 4, "a": 1}},
                                   "variants": [{"mask": "m/g.json", "name": "g"}]}))
    o = serve_options(config=cfg, kv_cache_gib=0.75, engine_arg=["a=2"],
                      task_mask=["/x/k4.json"], task=["k4"])
    assert o.engine.kv_cache_gib == 0.75
    assert o.engine.extra == {"max_num_seqs": 4, "a": 2}           # extra merged, CLI key wins
    # the file's variants (mask relative to the file), then the CLI's
    assert [(v.mask, v.task, v.name) for v in o.variants] == [
        (str(tmp_path / "m/g.json"), None, "g"), ("/x/k4.json", "k4", None)]
    assert serve_options() == ServeOptions()
    assert serve_options(port=8000).model_fields_set == {"port"}   # given = default still counts
    with pytest.raises(TypeError, match="no serve option named"):
        serve_options(prot=1)


def test_serve_dry_run_shows_the_merged_options(tmp_path, write_mask):
    write_mask([26, 27, 28, 29], task="k4", name="k4.json")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"port": 8050, "dense": False, "api_key": "from-file",
                                   "variants": [{"mask": "k4.json"}]}))
    res = CliRunner().invoke(app, ["serve", "--config", str(cfg), "--port", "8060", "--dry-run",
                                   "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    assert "http://127.0.0.1:8060/v1/models" in res.stdout and "8050" not in res.stdout
    assert "llama-k4" in res.stdout and "(Bearer API key required)" in res.stdout
    assert res.stdout.splitlines()[0] == "dtype: float32 (as given)"
