"""eval through lm-eval on the vLLM engine: log-likelihoods match transformers, JSON and table
come out, every failure is one line (exit 2), a killed child runs again."""

import json

import pytest
import typer
from typer.testing import CliRunner

from tabp_vllm.evaluation.commands import eval as eval_cmd


def _app():
    a = typer.Typer()
    a.command("eval")(eval_cmd)
    a.command("noop")(lambda: None)
    return a


def transformers_loglik(model: str, pairs: list[tuple[str, str]]) -> list[float]:
    """lm-eval's transformers backend (float32) on the same (context, continuation) pairs."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=model, dtype="float32", batch_size=8, device="cpu")
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    return [ll for ll, _ in hf.loglikelihood(reqs)]


QUIZ = [  # a user's own data, in a schema of its own
    {"q": "2 + 2 =", "options": ["3", "4", "5"], "answer": 1},
    {"q": "The sky is", "options": ["blue", "green", "loud"], "answer": 0},
    {"q": "Ice is", "options": ["hot", "cold", "fast"], "answer": 1},
    {"q": "A cat says", "options": ["moo", "woof", "meow"], "answer": 2},
    {"q": "Fire is", "options": ["hot", "cold", "wet"], "answer": 0},
]


def user_task_folder(folder) -> str:
    """A user's lm-eval task folder: one YAML task (lm-eval's own format) over a local JSONL file."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "quiz.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in QUIZ))
    # lm-eval reads data_files from the working directory: an absolute path, as a user would give
    (folder / "my_quiz.yaml").write_text(
        "task: my_quiz\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Q: {{q}}\\nA:"\ndoc_to_choice: "{{options}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    return str(folder)


def _kill_first_crash_second(monkeypatch) -> list:
    """evaluate._run_once wrapped: its first child is killed before it wrote results (rc -9),
    its second runs and then reports a crash in teardown (rc -6); later ones run as they are.
    Returns the list of calls (their log paths)."""
    import os
    import subprocess

    from tabp_vllm.evaluation import evaluate

    real = evaluate._run_once
    calls = []

    def flaky(spec, out, err, log_path):
        calls.append(log_path)
        if len(calls) == 1:  # killed before it did anything
            open(log_path, "w").close()
            return subprocess.CompletedProcess([], -9)
        proc = real(spec, out, err, log_path)  # (its own teardown may abort for real: rc -6)
        if len(calls) > 2:
            return proc
        assert os.path.exists(out)
        return subprocess.CompletedProcess([], -6)  # as if it aborted in teardown

    monkeypatch.setattr(evaluate, "_run_once", flaky)
    return calls


def test_eval_cli_matches_transformers(tmp_path, demo_model, write_mask, monkeypatch):
    """Our offline task and a user's own task folder (--include-path), dense and one mask, in one
    lm-eval run per variant. The dense variant's first child is killed before it wrote results
    (it runs again) and its second crashes in teardown after writing them (they count): the
    checks against transformers below read those results. (One engine start for both.)"""
    calls = _kill_first_crash_second(monkeypatch)
    mask = write_mask([26, 27, 28, 29], task="demo", name="k4.json")
    out = tmp_path / "res.json"
    tasks = user_task_folder(tmp_path / "my-tasks")
    r = CliRunner().invoke(_app(), ["eval", "--task", "tabp_demo,my_quiz", "--limit", "4",
                                    "--include-path", tasks, "--task-mask", str(mask),
                                    "-o", str(out)])
    assert r.exit_code == 0, r.output
    # a killed child runs again; results written before a crash count
    assert len(calls) == 3  # dense killed, dense crashed after writing, the mask
    assert "killed by signal 9" in r.stderr and "running it once more" in r.stderr
    assert "exited with code -6 after writing its results" in r.stderr
    doc = json.loads(out.read_text())
    dense, pruned = doc["results"]
    assert dense["variant"] == "dense" and pruned["blocks_kept"] == 26
    assert pruned["removed_layers"] == [26, 27, 28, 29]
    assert "acc_norm" in r.output and "dense" in r.output and "tabp_demo" in r.output
    # lm-eval's own results document per variant: its metric keys, its sample counts
    res = dense["results"]["tabp_demo"]
    assert {"acc,none", "acc_norm,none", "acc_stderr,none"} <= set(res)
    assert dense["n-samples"]["tabp_demo"]["effective"] == 4
    samples = dense["samples"]["tabp_demo"]
    assert len(samples) == 4 and all(len(s["loglik"]) == 4 for s in samples)  # 4 choices each
    # acc is lm-eval's: the argmax of the choices' log-likelihoods against the gold index
    acc = sum(max(range(4), key=lambda j: s["loglik"][j]) == s["target"] for s in samples) / 4
    assert res["acc,none"] == pytest.approx(acc)
    # the served log-likelihoods equal transformers' for the dense model
    pairs = [tuple(a) for s in samples for a in s["arguments"]]
    assert pairs[0][0].startswith("Question: ") and pairs[0][0].endswith("\nAnswer:")
    ref = transformers_loglik(demo_model, pairs)
    got = [ll for s in samples for ll in s["loglik"]]
    for g, e in zip(got, ref):
        # vLLM serves an fp32 checkpoint in bf16 on CPUs with native bf16 ("auto" dtype): seen
        # up to 0.25 nats on 4.2 against transformers fp32
        assert g == pytest.approx(e, rel=0.1, abs=0.15)
    assert [s["loglik"] for s in pruned["samples"]["tabp_demo"]] != [s["loglik"] for s in samples]
    # the user's task: its prompts and choices as its YAML makes them, lm-eval's acc, both variants
    assert "my_quiz" in r.output and doc["include_path"] == tasks
    for variant in (dense, pruned):
        quiz = variant["samples"]["my_quiz"]
        assert variant["n-samples"]["my_quiz"]["effective"] == 4
        assert [s["target"] for s in quiz] == [d["answer"] for d in QUIZ[:4]]
        assert quiz[0]["arguments"] == [["Q: 2 + 2 =\nA:", " 3"], ["Q: 2 + 2 =\nA:", " 4"],
                                        ["Q: 2 + 2 =\nA:", " 5"]]
        acc = sum(max(range(3), key=lambda j: s["loglik"][j]) == s["target"] for s in quiz) / 4
        assert variant["results"]["my_quiz"]["acc,none"] == pytest.approx(acc)
    assert pruned["samples"]["my_quiz"][0]["loglik"] != dense["samples"]["my_quiz"][0]["loglik"]


def test_eval_bad_mask_exit_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    r = CliRunner().invoke(_app(), ["eval", "--task", "tabp_demo", "--task-mask", str(bad)])
    assert r.exit_code == 2 and "not a mask file" in r.output


def test_eval_include_path_errors_are_one_line(tmp_path):
    """A folder that is not there, or a task the folder does not have: one line, exit 2, before
    any engine starts."""
    for argv, says in [
        (["--include-path", str(tmp_path / "nowhere"), "--task", "my_quiz"], "not a folder"),
        (["--include-path", user_task_folder(tmp_path / "t"), "--task", "my_quizz"],
         "unknown lm-eval task 'my_quizz'"),
    ]:
        r = CliRunner().invoke(_app(), ["eval", *argv])
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], r.output


def test_eval_unknown_task_or_missing_data_exit_2(tmp_path, monkeypatch):
    r = CliRunner().invoke(_app(), ["eval", "--task", "no_such_task"])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown lm-eval task 'no_such_task'" in lines[0]
    assert "tabp_arc_easy" in lines[0]
    monkeypatch.setenv("TABP_VLLM_DATA", str(tmp_path / "nowhere"))
    r = CliRunner().invoke(_app(), ["eval", "--task", "tabp_arc_easy"])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip() and not ln.startswith(" ")]
    assert lines[-1].startswith("error: task 'tabp_arc_easy': ") and "TABP_VLLM_DATA" in lines[-1]


def test_eval_child_error_is_one_line(tmp_path):
    from tabp_vllm.errors import TabpError
    from tabp_vllm.evaluation.evaluate import evaluate_variant

    with pytest.raises(TabpError) as exc:
        evaluate_variant(str(tmp_path / "no-such-model"), ["tabp_demo"], None, limit=1)
    msg = str(exc.value)
    assert msg.startswith("evaluation of dense failed: ") and "\n" not in msg
    assert "no-such-model" in msg and "Traceback" not in msg


def test_eval_router_routes_each_item_by_its_question(tmp_path, demo_model):
    """`eval --router`: every document routed by its question alone, each distinct mask run by
    lm-eval on its own documents, the per-document values pooled (equal to lm-eval's own
    per-run aggregates, weighted by their document counts). The router is a sublayer router
    (k = 10 units: 4 blocks and 2 attention or 2 MLP sublayers), as `route fit --units
    sublayers` writes, so its masks run on the sublayer engine path."""
    from routers import MIXED_MCQA, build_two_kind_router

    from tabp_vllm.lmeval_tasks import load_task_object
    from tabp_vllm.routing.router import open_encoder, route_input

    router = build_two_kind_router(demo_model, {"arithmetic": [20, 21, 22, 23],
                                                "commonsense": [10, 11, 12, 13]}, tmp_path / "mix.json",
                                   sublayers={"arithmetic": {"removed_attention": [5, 6]},
                                              "commonsense": {"removed_mlp": [5, 6]}})
    assert router.units == "sublayers" and router.k == 10
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in MIXED_MCQA))
    out = tmp_path / "routed.json"
    r = CliRunner().invoke(_app(), ["eval", "--task", "mixed", "--data", str(data), "--no-dense",
                                    "--router", str(tmp_path / "mix.json"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    routed = json.loads(out.read_text())["routed"]
    # the routing: each document's question as lm-eval prompts it, no choice in it
    from tabp_vllm.evaluation.evaluate import jsonl_task_folder

    task = load_task_object("mixed", [jsonl_task_folder("mixed", data, tmp_path / "tasks")])
    texts = [task.doc_to_text(d) for d in task.eval_docs]
    assert all("Question: " in t and "freezer" not in t for t in texts)
    want = route_input(router, texts, open_encoder(router))
    kinds = [item["id"][0] for item in MIXED_MCQA]
    arithmetic = next(c for c, m in enumerate(router.masks) if m.task == "arithmetic")
    assert [c == arithmetic for c in want] == [k == "a" for k in kinds]  # each kind its cluster
    assert routed["cluster_mix"]["mixed"] == {"0": 3, "1": 3}
    assert len(routed["runs"]) == 2
    for run in routed["runs"]:
        mask = router.masks[run["clusters"][0]]
        assert (run["removed_layers"], run["removed_attention"], run["removed_mlp"]) == \
            (mask.removed_layers, mask.removed_attention, mask.removed_mlp)
        assert run["docs"]["mixed"] == 3
    assert routed["router"]["units"] == "sublayers"
    # pooled = lm-eval's per-run means weighted by their document counts
    for metric in ("acc", "acc_norm"):
        pooled = routed["results"]["mixed"][metric]
        assert pooled["n"] == 6
        weighted = sum(run["results"]["mixed"][f"{metric},none"] * run["docs"]["mixed"]
                       for run in routed["runs"]) / 6
        assert pooled["value"] == pytest.approx(weighted)
    assert "routed (2 clusters)" in r.output and "documents per cluster" in r.output
    # k counts units: the table says so rather than "blocks kept 20/30"
    assert "50/60 sublayers" in r.output
