"""eval on the vLLM engine: log-likelihoods match transformers, JSON and table come out."""

import json
import math

import pytest
import torch
import typer
from typer.testing import CliRunner

from tabp_vllm.commands_score import eval as eval_cmd
from tabp_vllm.data import MCQAItem
from tabp_vllm.evaluate import accuracy, build_requests


def test_accuracy_conventions():
    items = [MCQAItem("q", ["a", "bbbbbbbb"], 1), MCQAItem("q", ["x", "y"], 0)]
    ll = {(0, 0): -1.0, (0, 1): -3.0, (1, 0): -0.5, (1, 1): -2.0}
    r = accuracy(items, ll)
    # item 0: acc picks 'a' (wrong); acc_norm -1/2 vs -3/9 picks 'bbbbbbbb' (right)
    assert r == {"acc": 0.5, "acc_norm": 1.0, "n": 2}


def test_eval_cli_matches_transformers(tmp_path, demo_model, write_mask):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mask = write_mask([26, 27, 28, 29], task="demo", name="k4.json")
    out = tmp_path / "res.json"
    a = typer.Typer()
    a.command("eval")(eval_cmd)
    a.command("noop")(lambda: None)
    r = CliRunner().invoke(a, ["eval", "--task", "demo", "--limit", "4", "--task-mask", str(mask),
                               "-o", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    dense, pruned = doc["results"]
    assert dense["variant"] == "dense" and pruned["blocks_kept"] == 26
    assert "acc_norm" in r.output and "dense" in r.output
    # the served log-likelihoods equal transformers' for the dense model
    from tabp_vllm.data import load_task
    items = load_task("demo", "validation").first(4).items
    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    for n, j, ids, start in build_requests(tok, items):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        ref = sum(float(lp[p - 1, ids[p]]) for p in range(start, len(ids)))
        # vLLM serves an fp32 checkpoint in bf16 by default on CPU ("auto" dtype): seen up to
        # 0.25 nats on 4.2 against transformers fp32
        assert dense["loglik"][n][j] == pytest.approx(ref, rel=0.1, abs=0.15)
    assert pruned["loglik"] != dense["loglik"]


def test_eval_bad_mask_exit_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    a = typer.Typer()
    a.command("eval")(eval_cmd)
    a.command("noop")(lambda: None)
    r = CliRunner().invoke(a, ["eval", "--task", "demo", "--task-mask", str(bad)])
    assert r.exit_code == 2 and "not a mask file" in r.output


def test_eval_child_error_is_one_line(tmp_path):
    from tabp_vllm.errors import TabpError
    from tabp_vllm.evaluate import evaluate_variant

    items = [MCQAItem("q", ["a", "b"], 0)]
    with pytest.raises(TabpError) as exc:
        evaluate_variant(str(tmp_path / "no-such-model"), items, None)
    msg = str(exc.value)
    assert msg.startswith("evaluation of dense failed: ") and "\n" not in msg
    assert "no-such-model" in msg and "Traceback" not in msg


def test_eval_survives_a_killed_child_and_a_teardown_crash(monkeypatch, capsys, demo_model):
    """A child killed before it wrote results runs again; results written before a crash count."""
    import os
    import subprocess

    from tabp_vllm import evaluate

    real = evaluate._run_once
    calls = []

    def flaky(spec, out, err, log_path):
        calls.append(log_path)
        if len(calls) == 1:  # killed before it did anything
            open(log_path, "w").close()
            return subprocess.CompletedProcess([], -9)
        real(spec, out, err, log_path)  # (its own teardown may abort for real: rc -6)
        assert os.path.exists(out)
        return subprocess.CompletedProcess([], -6)  # as if it aborted in teardown

    monkeypatch.setattr(evaluate, "_run_once", flaky)
    from tabp_vllm.data import load_task

    items = load_task("demo", "validation").first(2).items
    res = evaluate.evaluate_variant(demo_model, items, None)
    assert len(calls) == 2 and res["n"] == 2 and len(res["loglik"]) == 2
    err = capsys.readouterr().err
    assert "killed by signal 9" in err and "running it once more" in err
    assert "exited with code -6 after writing its results" in err
