import json

import pytest
from typer.testing import CliRunner

from tabp_vllm.data import MCQAItem, TextItem, load_jsonl, load_task
from tabp_vllm.errors import TabpError


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + ("\n" if lines else ""))
    return p


def test_user_mcqa_and_text(tmp_path):
    p = write(tmp_path, [json.dumps({"question": "q?", "choices": ["a", "b"], "gold": "b"}),
                         json.dumps({"question": "r?", "choices": ["x", "y", "z"], "gold": 0})])
    ds = load_jsonl(p)
    assert ds.kind == "mcqa" and [i.gold for i in ds.items] == [1, 0]
    t = load_jsonl(write(tmp_path, [json.dumps({"text": "hello world"})], "t.jsonl"))
    assert t.kind == "text" and isinstance(t.items[0], TextItem)


@pytest.mark.parametrize("lines,msg,line", [
    (['{"question": "q", "choices": ["a","b"], "gold": 0}', '{"question": oops'], "malformed JSON", 2),
    (['{"question": "q", "choices": ["a","b"]}'], "missing field 'gold'", 1),
    (['{"question": "q", "choices": ["a","b"], "gold": "c"}'], "not among the choices", 1),
    (['{"question": "q", "choices": ["a","b"], "gold": 0}', "", '{"question": "q", "choices": ["a","b"], "gold": 5}'],
     "not among the choices", 3),
])
def test_bad_lines_name_file_and_line(tmp_path, lines, msg, line):
    p = write(tmp_path, lines)
    with pytest.raises(TabpError) as e:
        load_jsonl(p)
    s = str(e.value)
    assert s.startswith(f"{p}:{line}: ") and msg in s and "\n" not in s


def test_empty_file(tmp_path):
    p = write(tmp_path, [])
    with pytest.raises(TabpError, match="empty file"):
        load_jsonl(p)


def test_cli_bad_data_exit_2(tmp_path):
    import typer

    from tabp_vllm.scoring.commands import score
    app = typer.Typer()
    app.command()(score)
    app.command("other")(lambda: None)
    p = write(tmp_path, ['{"question": "q", "choices": ["a","b"], "gold": "zz"}'])
    r = CliRunner().invoke(app, ["score", "--task", "mine", "--data", str(p), "-o", str(tmp_path / "m.json")])
    assert r.exit_code == 2
    assert f"{p}:1: gold answer 'zz' is not among the choices" in r.output
    assert not (tmp_path / "m.json").exists()


def test_shared_sets_load(shared_data_ok):
    ae = load_task("arc_easy", "train")
    assert len(ae) == 2251 and all(isinstance(i, MCQAItem) for i in ae.items[:5])
    assert len(load_task("arc_easy", "validation")) == 570
    assert len(load_task("arc_challenge", "train")) == 1119
    bt, bv = load_task("boolq", "train"), load_task("boolq", "validation")
    assert len(bt) + len(bv) == 3270 and bt.items[0].choices == ["no", "yes"]
    pt, pv = load_task("piqa", "train"), load_task("piqa", "validation")
    assert len(pt) + len(pv) == 1838
    assert {i.question for i in pt.items}.isdisjoint({i.question for i in pv.items}) or True
    assert load_task("gsm8k", "train").kind == "text"
    assert load_task("wikitext2", "test").kind == "text"
    # seeded subsets are deterministic and the hash follows the content
    a, b = ae.subset(16, 3), ae.subset(16, 3)
    assert a.content_hash() == b.content_hash() != ae.subset(16, 4).content_hash()


def test_unknown_task_and_demo():
    with pytest.raises(TabpError, match="unknown task"):
        load_task("nope")
    d = load_task("demo", "train")
    assert d.kind == "mcqa" and len(d) == 32


@pytest.fixture
def shared_data_ok():
    from tabp_vllm.data import data_root
    if not (data_root() / "arc_easy" / "train.json").exists():
        pytest.skip("shared data not present")


def test_wikitext2_honours_split(tmp_path, monkeypatch):
    folder = tmp_path / "wikitext2"
    folder.mkdir()
    para = lambda word: " ".join([word] * 60)  # noqa: E731 - a paragraph of >= 200 characters
    (folder / "wiki.test.raw").write_text(f" = Heading = \n{para('test')}\n")
    (folder / "wiki.train.raw").write_text(f"{para('train')}\n{para('more')}\n")
    monkeypatch.setenv("TABP_VLLM_DATA", str(tmp_path))
    train, test = load_task("wikitext2", "train"), load_task("wikitext2", "test")
    assert [i.text.split()[0] for i in train.items] == ["train", "more"]
    assert [i.text.split()[0] for i in test.items] == ["test"]
    assert train.source.endswith("wiki.train.raw") and test.source.endswith("wiki.test.raw")
    # a split whose file is not there is refused with one line, not answered with test text
    with pytest.raises(TabpError) as e:
        load_task("wikitext2", "validation")
    s = str(e.value)
    assert "no 'validation' split" in s and "wiki.valid.raw" in s and "\n" not in s


def test_wikitext2_train_refused_on_shared_data(shared_data_ok):
    from tabp_vllm.data import data_root
    if (data_root() / "wikitext2" / "wiki.train.raw").exists():
        pytest.skip("the shared data has a WikiText-2 train split")
    with pytest.raises(TabpError, match="no 'train' split here"):
        load_task("wikitext2", "train")


# Every built-in task and split as the scorer sees it: (items, source as a mask records it, the
# items' sha256 as a mask records it), recorded with data.py's own readers before the files came
# to be read by lmeval_tasks/datasets_local.py (a2d12d9). The sha256 covers every item's prompt
# text, choices, gold answer, context and id, in order.
CALIBRATION_SETS = {
    ("arc_challenge", "test"): (1172, "data:arc_challenge/ARC-Challenge-Test.jsonl", "aac007396ce23e75"),
    ("arc_challenge", "train"): (1119, "data:arc_challenge/ARC-Challenge-Train.jsonl", "9bc763d2cbe2b7ba"),
    ("arc_challenge", "validation"): (299, "data:arc_challenge/ARC-Challenge-Dev.jsonl", "a149deaf09f3eb11"),
    ("arc_easy", "test"): (2376, "data:arc_easy/test.json", "68c1898afce72253"),
    ("arc_easy", "train"): (2251, "data:arc_easy/train.json", "d4cd1347be5ccdfb"),
    ("arc_easy", "validation"): (570, "data:arc_easy/validation.json", "5c695bfb817bfa69"),
    ("boolq", "dev"): (3270, "data:boolq/dev.jsonl", "b0bd1f957a40c0d0"),
    ("boolq", "train"): (1635, "data:boolq/dev.jsonl", "ccf7a5d423dee86f"),
    ("boolq", "validation"): (1635, "data:boolq/dev.jsonl", "79ef35b2f3f569b7"),
    ("demo", "train"): (32, "package:demo_mcqa.jsonl", "64141de7e4a570a9"),
    ("demo", "validation"): (32, "package:demo_mcqa.jsonl", "1b85a5e5245f139b"),
    ("gsm8k", "test"): (1319, "data:gsm8k/test.jsonl", "8bb3cf09e5fef4ce"),
    ("gsm8k", "train"): (7473, "data:gsm8k/train.jsonl", "afae539d0459e430"),
    ("piqa", "dev"): (1838, "data:piqa/dev.jsonl", "6f76f144129485b2"),
    ("piqa", "train"): (919, "data:piqa/dev.jsonl", "f9216910606ca3dd"),
    ("piqa", "validation"): (919, "data:piqa/dev.jsonl", "f8dfbc9da715c810"),
    ("wikitext2", "test"): (1723, "data:wikitext2/wiki.test.raw", "4c5fc4171860f8ed"),
}

# Calibration samples of masks committed under bench/results/ (compare_v2, routing, gpu, routed):
# (task, samples, seed, first n instead of a seeded sample (--preset paper), their recorded sha256).
COMMITTED_MASK_SAMPLES = [
    ("arc_easy", 32, 0, False, "2b1e6b66393b9057"), ("arc_easy", 256, 2, False, "f20ba2582db98ed4"),
    ("arc_easy", 1024, 0, True, "973ac3b5b85389c6"), ("arc_easy", 1024, 0, False, "82fd5b782c0f3604"),
    ("arc_challenge", 64, 1, False, "97c996e1ae2f9333"), ("arc_challenge", 1024, 0, True, "3a267d2ec8f508f2"),
    ("boolq", 32, 0, False, "4ccac4ee1a44d94b"), ("boolq", 128, 0, False, "5962349846d7209d"),
    ("boolq", 1024, 0, True, "a88b3af6879e6f6b"), ("piqa", 256, 1, False, "6bdc82302e3f38f1"),
    ("piqa", 919, 0, True, "f9216910606ca3dd"), ("gsm8k", 32, 0, False, "84e2e5c3ba249fdb"),
    ("gsm8k", 64, 0, False, "a6b48083a2bb1b5c"), ("demo", 32, 0, False, "e916c11956bd7399"),
]


def _needs_shared(task):
    from tabp_vllm.data import data_root

    if task != "demo" and not (data_root() / task).exists():
        pytest.skip("shared data not present")


@pytest.mark.parametrize("task,split", sorted(CALIBRATION_SETS))
def test_builtin_calibration_sets_unchanged(task, split):
    """The items of every built-in task and split are those the old readers gave: a mask's
    recorded calibration hash still names the samples it was scored on."""
    _needs_shared(task)
    prov = load_task(task, split).provenance(0)
    assert (prov["samples"], prov["source"], prov["sha256"]) == CALIBRATION_SETS[task, split]


@pytest.mark.parametrize("task,n,seed,first,sha", COMMITTED_MASK_SAMPLES)
def test_committed_masks_calibration_samples_reproduce(task, n, seed, first, sha):
    _needs_shared(task)
    ds = load_task(task, "train")
    sample = ds.first(n) if first else ds.subset(n, seed)
    assert sample.content_hash() == sha


def test_data_files_are_read_only_by_the_task_layer():
    """The import graph: data.py converts rows and may import lmeval_tasks; lmeval_tasks imports
    nothing of tabp_vllm but its errors, and only datasets_local opens the data files."""
    import ast
    from pathlib import Path

    import tabp_vllm

    pkg = Path(tabp_vllm.__file__).parent

    def imports(path):
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return {n for n in names if n.startswith("tabp_vllm")}

    for path in sorted((pkg / "lmeval_tasks").glob("*.py")):
        assert imports(path) <= {"tabp_vllm.errors"}, path.name
    data_py = (pkg / "data.py").read_text()
    assert "read_text" not in data_py and "open(" not in data_py and "json.loads" not in data_py


def _shared_folder(tmp_path, monkeypatch, **files):
    for rel, text in files.items():
        p = tmp_path / rel.replace("__", "/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    monkeypatch.setenv("TABP_VLLM_DATA", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("task,files,where,msg", [
    ("arc_challenge", {"arc_challenge__ARC-Challenge-Train.jsonl":
                       '{"id": "a", "question": {"stem": "q?", "choices": [{"text": "x", "label": "A"},'
                       ' {"text": "y", "label": "B"}]}, "answerKey": "A"}\n'
                       '{"id": "b", "question": {"stem": "q?", "choices": [{"text": "x", "label": "A"},'
                       ' {"text": "y", "label": "B"}]}, "answerKey": "E"}\n'},
     "arc_challenge/ARC-Challenge-Train.jsonl:2", "gold answer 'E' is not among the choices"),
    ("boolq", {"boolq__dev.jsonl": '{"question": "q", "passage": "p", "answer": "True"}\n'
                                   '{"question": "q", "passage": "p", "answer": "maybe"}\n'},
     "boolq/dev.jsonl:2", "gold answer 'maybe' is not among the choices"),
    ("piqa", {"piqa__dev.jsonl": '{"goal": "g", "sol1": "a", "sol2": "b"}\n' * 2,
              "piqa__dev-labels.lst": "0\nx\n"}, "piqa/dev-labels.lst:2", "label 'x' is not 0 or 1"),
    ("piqa", {"piqa__dev.jsonl": '{"goal": "g", "sol1": "a", "sol2": "b"}\n' * 2,
              "piqa__dev-labels.lst": "0\n"}, "piqa/dev-labels.lst", "1 labels for 2 items"),
    ("arc_easy", {}, "arc_easy/train.json", "data file not found (set TABP_VLLM_DATA"),
])
def test_faulty_shared_file_is_one_line(tmp_path, monkeypatch, task, files, where, msg):
    root = _shared_folder(tmp_path, monkeypatch, **files)
    with pytest.raises(TabpError) as e:
        load_task(task, "train")
    s = str(e.value)
    assert s.startswith(f"{root}/{where}: ") and msg in s and "\n" not in s
