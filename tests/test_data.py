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
