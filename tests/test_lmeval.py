"""lm-eval integration: the offline tasks mirror lm-eval's own, the `tabp-vllm` model is
registered and evaluates a pruned variant, lm-eval tasks are calibration data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tabp_vllm.errors import TabpError
from tabp_vllm.lmeval_tasks import TASKS_DIR, offline_tasks

REPO = Path(__file__).resolve().parents[1]


def _lm_eval_yaml(rel: str) -> dict:
    import lm_eval

    text = (Path(lm_eval.__file__).parent / "tasks" / rel).read_text()
    return yaml.safe_load(text.replace("!function", ""))


def _ours(name: str) -> dict:
    doc = yaml.load((TASKS_DIR / f"{name}.yaml").read_text().replace("!function", ""),
                    Loader=yaml.SafeLoader)
    if "include" in doc:
        return {**_ours(Path(doc.pop("include")).stem), **doc}
    return doc


MIRRORS = {"tabp_arc_easy": "arc/arc_easy.yaml", "tabp_arc_challenge": "arc/arc_easy.yaml",
           "tabp_piqa": "piqa/piqa.yaml", "tabp_boolq": "super_glue/boolq/default.yaml"}
PROMPT_KEYS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list",
               "target_delimiter", "training_split", "validation_split", "test_split")


@pytest.mark.parametrize("ours,theirs", sorted(MIRRORS.items()))
def test_offline_tasks_mirror_lm_eval(ours, theirs):
    a, b = _ours(ours), _lm_eval_yaml(theirs)
    for key in PROMPT_KEYS:
        assert a.get(key) == b.get(key), key
    assert "dataset_path" not in a and "custom_dataset" in a  # the local files, not the hub


def test_offline_tasks_read_the_shared_data_with_the_project_split():
    from tabp_vllm.evaluation.evaluate import check_tasks

    assert offline_tasks() == ["tabp_arc_challenge", "tabp_arc_challenge_validation",
                               "tabp_arc_easy", "tabp_arc_easy_validation", "tabp_boolq",
                               "tabp_demo", "tabp_piqa"]
    sizes = check_tasks(["tabp_arc_easy", "tabp_arc_challenge", "tabp_piqa", "tabp_boolq",
                         "tabp_arc_easy_validation", "tabp_arc_challenge_validation"])
    # lm-eval evaluates on test where the task has one (ARC), else validation; the _validation
    # variants (the comparison report's split) score ARC's validation split
    assert sizes == {"tabp_arc_easy": 2376, "tabp_arc_challenge": 1172, "tabp_piqa": 919,
                     "tabp_boolq": 1635, "tabp_arc_easy_validation": 570,
                     "tabp_arc_challenge_validation": 299}
    assert _ours("tabp_arc_easy_validation") == {**_ours("tabp_arc_easy"), "test_split": None,
                                                 "task": "tabp_arc_easy_validation"}


TASK_SPLITS = [("arc_easy", "train"), ("arc_easy", "validation"), ("arc_easy", "test"),
               ("arc_challenge", "train"), ("arc_challenge", "validation"),
               ("arc_challenge", "test"), ("piqa", "train"), ("piqa", "validation"),
               ("boolq", "train"), ("boolq", "validation"), ("demo", "train"),
               ("demo", "validation")]


@pytest.mark.parametrize("task,split", TASK_SPLITS)
def test_calibration_items_are_the_lm_eval_tasks_documents(task, split):
    """`--task piqa` calibrates on the documents lm-eval's tabp_piqa evaluates (one reader,
    datasets_local): the same records in the same order, the same choices and gold answers, and
    for the cloze probe the task's own prompt (BoolQ and PIQA: the seeded halves of dev, so
    calibration on train never meets evaluation on validation)."""
    from tabp_vllm.data import load_task, mcqa_context
    from tabp_vllm.lmeval_tasks import task_docs

    items = load_task(task, split).items
    obj, docs = task_docs(f"tabp_{task}", split)
    assert len(items) == len(docs) > 0
    assert [i.choices for i in items] == [obj.doc_to_choice(d) for d in docs]
    assert [i.gold for i in items] == [obj.doc_to_target(d) for d in docs]
    if task == "boolq":  # the calibration question is capitalised (as masks have recorded it)
        assert [i.context for i in items] == [d["passage"] for d in docs]
        assert [i.question.lower() for i in items] == [d["question"].strip().lower() + "?"
                                                       for d in docs]
    else:
        assert [mcqa_context(i) for i in items] == [obj.doc_to_text(d) for d in docs]


def test_lmeval_task_as_calibration_data():
    from tabp_vllm.data import load_task, mcqa_context, mcqa_lettered_prompt

    own = load_task("arc_easy", "train").items[:5]
    lm = load_task("lmeval:tabp_arc_easy", "train").items[:5]
    assert [(i.choices, i.gold) for i in own] == [(i.choices, i.gold) for i in lm]
    # the same prompt as the evaluation's (lm-eval's arc_easy doc_to_text) and, for the lettered
    # probe, the project's own lettered format
    assert [mcqa_context(i) for i in lm] == [f"Question: {i.question}\nAnswer:" for i in own]
    assert [mcqa_lettered_prompt(i) for i in lm] == [mcqa_lettered_prompt(i) for i in own]
    boolq = load_task("lmeval:tabp_boolq", "train").items[0]
    assert boolq.choices == ["no", "yes"] and "\nQuestion: " in mcqa_context(boolq)


def test_lmeval_task_unavailable_is_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tabp_vllm.cli import app
    from tabp_vllm.data import load_task
    from tabp_vllm.lmeval_tasks import load_task_object

    with pytest.raises(TabpError, match="unknown lm-eval task 'nope'"):
        load_task("lmeval:nope", "train")
    with pytest.raises(TabpError, match="has no 'test' split"):
        load_task("lmeval:tabp_piqa", "test")
    monkeypatch.setenv("TABP_VLLM_DATA", str(tmp_path))
    r = CliRunner().invoke(app, ["score", "--task", "lmeval:tabp_arc_easy", "-o",
                                 str(tmp_path / "m.json")])
    assert r.exit_code == 2
    err = [ln for ln in r.output.splitlines() if ln.startswith("error")]
    assert len(err) == 1 and "tabp_arc_easy" in err[0] and "TABP_VLLM_DATA" in err[0]
    assert not (tmp_path / "m.json").exists()
    # a faulty record: lm-eval's task names it by file and line, as calibration does
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "dev.jsonl").write_text('{"question": "q", "passage": "p", "answer": "True"}\n'
                                                  '{"question": "q", "passage": "p", "answer": "?"}\n')
    with pytest.raises(TabpError) as e:
        load_task_object("tabp_boolq")
    assert str(e.value) == (f"task 'tabp_boolq': {tmp_path}/boolq/dev.jsonl:2: gold answer '?' "
                            f"is not among the choices")


def test_model_registered():
    from tabp_vllm.lmeval import TabpVLLM  # first: it lets lm-eval's vllm backend import

    from lm_eval.api.registry import get_model
    from lm_eval.models.vllm_causallms import VLLM

    assert get_model("tabp-vllm") is TabpVLLM and issubclass(TabpVLLM, VLLM)


@pytest.mark.engine
def test_lm_eval_runner_scores_a_pruned_variant(tmp_path, demo_model, write_mask):
    """`python -m tabp_vllm.lmeval --model tabp-vllm` (lm-eval's own CLI) on a masked variant."""
    mask = write_mask([26, 27, 28, 29], task="demo", name="k4.json")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tabp_vllm.lmeval", "--model", "tabp-vllm", "--model_args",
           f"pretrained=llama,task_mask={mask}", "--tasks", "tabp_demo", "--limit", "4",
           "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    files = sorted(out.rglob("results_*.json"))
    assert files, p.stdout[-2000:]
    doc = json.loads(files[-1].read_text())
    assert doc["n-samples"]["tabp_demo"]["effective"] == 4
    assert 0.0 <= doc["results"]["tabp_demo"]["acc,none"] <= 1.0
    assert doc["config"]["model_args"]["task_mask"] == str(mask)  # lm-eval records it parsed
    samples = sorted(out.rglob("samples_tabp_demo_*.jsonl"))
    assert samples and len(samples[-1].read_text().splitlines()) == 4


def test_user_jsonl_becomes_a_task(tmp_path):
    from tabp_vllm.evaluation.evaluate import check_tasks, jsonl_task_folder
    from tabp_vllm.lmeval_tasks import load_task_object

    f = tmp_path / "mine.jsonl"
    f.write_text('{"question": "2+2?", "choices": ["3", "4"], "gold": 1}\n'
                 '{"question": "Sky?", "choices": ["blue", "red"], "gold": "blue", "context": "Look up."}\n')
    inc = [jsonl_task_folder("mine", f, tmp_path / "tasks")]
    assert check_tasks(["mine"], inc) == {"mine": 2}
    task = load_task_object("mine", inc)
    docs = list(task.eval_docs)
    assert task.doc_to_text(docs[0]) == "Question: 2+2?\nAnswer:"
    assert task.doc_to_text(docs[1]) == "Look up.\nQuestion: Sky?\nAnswer:"
    assert [task.doc_to_target(d) for d in docs] == [1, 0]  # gold text resolved to its index
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "gold": 0}\n')
    with pytest.raises(TabpError, match=r"bad.jsonl:1: 'choices' must be a list of at least 2"):
        jsonl_task_folder("bad", bad, tmp_path / "tasks2")


@pytest.mark.engine
def test_one_token_shortcut_equals_lm_evals_loglikelihood(monkeypatch):
    """BoolQ's " yes" / " no" read off one pass over the passage give lm-eval's own numbers: the
    same log-likelihoods and greedy flags per request, so the same accuracy, also for a token far
    down the distribution; a continuation of two tokens goes through lm-eval's path. (The engine
    runs in this process, as an offline engine on a CPU does: no child importing vLLM again.)"""
    from vllm import SamplingParams

    from tabp_vllm.lmeval import VLLM, TabpVLLM
    from tabp_vllm.lmeval_tasks import load_task_object

    # float32: the shortcut and lm-eval's path batch differently, and bf16 logits then differ by
    # up to ~0.1 nat between the two passes (seen on an AMX box), noise that hides the logic tested
    lm = TabpVLLM(pretrained="llama", kv_cache_gib=0.5, dtype="float32")
    try:
        obj = load_task_object("tabp_boolq")
        reqs = []
        for d in list(obj.eval_docs)[:6]:
            ctx = obj.doc_to_text(d)
            for c in obj.doc_to_choice(d):
                reqs.append(((ctx, " " + c), *lm._encode_pair(ctx, " " + c)))
        # one more one-token continuation of the first context, far outside its top 20 (a top-K
        # read would miss it), and a two-token one, which must take lm-eval's path
        params = SamplingParams(max_tokens=1, logprobs=20, temperature=0)
        out = lm.model.generate([{"prompt_token_ids": reqs[0][1]}], params, use_tqdm=False)
        top = out[0].outputs[0].logprobs[0]
        rare = next(t for t in range(1000, 2000) if t not in top)
        reqs.append((None, reqs[0][1], [rare]))
        reqs.append((None, reqs[0][1], [rare, rare]))
        fell = []
        lm_evals = VLLM._loglikelihood_tokens

        def counting(self, rs, disable_tqdm=False):
            fell.extend(r[2] for r in rs)
            return lm_evals(self, rs, disable_tqdm)

        with monkeypatch.context() as m:
            m.setattr(VLLM, "_loglikelihood_tokens", counting)
            ours = lm._loglikelihood_tokens(reqs)
        doc = {"ours": ours, "theirs": lm_evals(lm, reqs), "fell": fell, "rare": rare}
    finally:
        lm.shutdown()
    assert len(doc["ours"]) == len(doc["theirs"]) == 14
    assert doc["fell"] == [[doc["rare"]] * 2]  # only the two-token continuation took lm-eval's path
    for (ll, greedy), (ll_ref, greedy_ref) in zip(doc["ours"], doc["theirs"]):
        assert ll == pytest.approx(ll_ref, abs=0.01) and ll < 0  # one forward pass apart
        assert greedy == greedy_ref
    assert doc["ours"][12][0] < -5 and not doc["ours"][12][1]  # the rare token: unlikely, not greedy
    # accuracy: per document ("no", "yes" pairs) the same answer wins, near-ties aside
    ours, theirs = doc["ours"], doc["theirs"]
    for i in range(0, 12, 2):
        gap = theirs[i + 1][0] - theirs[i][0]
        if abs(gap) > 0.1:
            assert (ours[i + 1][0] > ours[i][0]) == (gap > 0), i


def test_task_manager_indexes_lm_evals_own_tasks_only_when_asked_for_one(tmp_path):
    """Our tasks and a user's folder: the index holds no lm-eval task (indexing its thousands of
    YAML files is ~10 s of every evaluation process); a name that is not ours, or a group or tag
    (which may name lm-eval's tasks), gets the full index."""
    from tabp_vllm.evaluation.evaluate import jsonl_task_folder
    from tabp_vllm.lmeval_tasks import task_manager

    f = tmp_path / "mine.jsonl"
    f.write_text('{"question": "2+2?", "choices": ["3", "4"], "gold": 1}\n')
    inc = [jsonl_task_folder("mine", f, tmp_path / "tasks")]
    lean = task_manager(inc, ["tabp_demo", "mine"])
    assert {"tabp_demo", "mine"} <= set(lean.all_tasks) and "arc_easy" not in lean.all_tasks
    assert task_manager(None, ["tabp_boolq"]) is task_manager(None, ["tabp_piqa"])  # cached
    full = task_manager(inc, ["tabp_demo", "arc_easy"])
    assert "arc_easy" in full.all_tasks and "mine" in full.all_tasks
    assert task_manager(None, ["ai2_arc"]) is task_manager() is task_manager(None, ["nope"])
    assert "ai2_arc" in task_manager().all_tags + task_manager().all_groups
