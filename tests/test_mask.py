"""Mask validation: every bad mask is refused with one line and exit code 2, before any engine."""

import json

import pytest
from typer.testing import CliRunner

from tabp_vllm.cli import app
from tabp_vllm.mask import MaskError, load_mask, make_mask

runner = CliRunner()


def validate(path, model="llama"):
    result = runner.invoke(app, ["masks", "validate", str(path), "--model", model])
    return result.exit_code, result.output.strip()


def assert_one_line_error(code, out, *fragments):
    assert code == 2, out
    lines = out.splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith("error: ")
    assert "Traceback" not in out
    for frag in fragments:
        assert frag in lines[0], lines[0]


def test_valid_mask_passes_and_roundtrips(write_mask, demo_model):
    path = write_mask([12, 3, 7], task="arc_easy")
    code, out = validate(path)
    assert code == 0, out
    assert "removes 3 of 30 blocks: [3, 7, 12]" in out
    mask = load_mask(path, demo_model)
    assert mask.removed_layers == [3, 7, 12]
    assert mask.kept_layers == [i for i in range(30) if i not in (3, 7, 12)]
    assert mask.num_kept == 27


def test_missing_file(tmp_path):
    assert_one_line_error(*validate(tmp_path / "nope.json"), "nope.json", "not found")


def test_invalid_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"format": "tabp-vllm-mask", "version": 1,,}')
    assert_one_line_error(*validate(path), "bad.json", "invalid JSON at line 1")


def test_binary_garbage(tmp_path):
    path = tmp_path / "garbage.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert_one_line_error(*validate(path), "garbage.json")


def test_not_a_mask(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"hello": "world"}))
    assert_one_line_error(*validate(path), "not a mask file")


def test_unknown_schema_version(write_mask):
    path = write_mask([1], edit=lambda d: d.update(version=99))
    assert_one_line_error(*validate(path), "unsupported mask version 99")


def test_mask_for_another_model(write_mask):
    def other_model(doc):
        doc["model"]["id"] = "meta-llama/Llama-3.1-8B"
        doc["model"]["fingerprint"].update(hidden_size=4096, vocab_size=128256)

    path = write_mask([1], edit=other_model)
    assert_one_line_error(*validate(path), "made for model 'meta-llama/Llama-3.1-8B'",
                          "hidden_size 4096 != 576")


def test_mask_for_another_depth(write_mask):
    def deeper(doc):
        doc["model"]["fingerprint"]["num_hidden_layers"] = 32
        doc["num_hidden_layers"] = 32

    path = write_mask([1], edit=deeper)
    assert_one_line_error(*validate(path), "num_hidden_layers 32 != 30")


@pytest.mark.parametrize("bad", [30, -1, 1000])
def test_index_out_of_range(write_mask, bad):
    path = write_mask([1], edit=lambda d: d.update(removed_layers=[1, bad]))
    assert_one_line_error(*validate(path), f"removed layer {bad} is out of range", "0..29")


def test_duplicate_index(write_mask):
    path = write_mask([1], edit=lambda d: d.update(removed_layers=[4, 5, 4]))
    assert_one_line_error(*validate(path), "removed layer 4 is listed more than once")


def test_every_block_removed(write_mask):
    path = write_mask([1], edit=lambda d: d.update(removed_layers=list(range(30))))
    assert_one_line_error(*validate(path), "removes every block (30 of 30)")


@pytest.mark.parametrize("bad", ["3", 3.0, True, None])
def test_non_integer_index(write_mask, bad):
    path = write_mask([1], edit=lambda d: d.update(removed_layers=[2, bad]))
    assert_one_line_error(*validate(path), "is not an integer")


def test_removed_layers_not_a_list(write_mask):
    path = write_mask([1], edit=lambda d: d.update(removed_layers="3,4"))
    assert_one_line_error(*validate(path), "must be a list")


def test_scores_length_checked(write_mask):
    path = write_mask([1], edit=lambda d: d.update(scores=[0.1, 0.2]))
    assert_one_line_error(*validate(path), "one value per block (30)")


def test_make_mask_refuses_bad_indices(demo_model):
    with pytest.raises(MaskError, match="out of range"):
        make_mask(demo_model, [31], task="t")


def test_show_prints_table(write_mask):
    doc_scores = [float(i) / 10 for i in range(30)]
    path = write_mask([5, 6], task="gsm8k", edit=lambda d: d.update(scores=doc_scores))
    result = runner.invoke(app, ["masks", "show", str(path)])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines()
            if line.count("│") >= 3 and line.split("│")[1].strip().isdigit()}
    assert len(rows) == 30
    assert "removed" in rows["5"] and "removed" in rows["6"]
    assert "removed" not in rows["4"] and "kept" in rows["4"]
    assert "0.5" in rows["5"]
    assert "kept 28/30" in result.output and "task=gsm8k" in result.output


def test_show_bad_file_one_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2")
    result = runner.invoke(app, ["masks", "show", str(path)])
    assert_one_line_error(result.exit_code, result.output.strip(), "invalid JSON")


def test_saved_mask_is_atomic_and_valid(tmp_path, demo_model):
    mask = make_mask(demo_model, [29, 0], task="t", model_id="llama")
    path = mask.save(tmp_path / "sub" / "m.json")
    assert not list(tmp_path.glob("sub/*.tmp"))
    again = load_mask(path, demo_model)
    assert again.removed_layers == [0, 29]
    assert again.content_hash() == mask.content_hash()


# ---- masks that cannot mislead (issue 14) -------------------------------------------------------

def test_empty_removed_list_refused(write_mask):
    path = write_mask([1], edit=lambda d: d.update(removed_layers=[]))
    assert_one_line_error(*validate(path), "removes no block", "dense")
    result = runner.invoke(app, ["masks", "make", str(path.with_name("e.json")), "--remove", "",
                                 "--task", "t"])
    assert_one_line_error(result.exit_code, result.output.strip(), "removes no block")


def test_serve_refuses_empty_mask(write_mask):
    path = write_mask([1], edit=lambda d: d.update(removed_layers=[]))
    result = runner.invoke(app, ["serve", "--task-mask", str(path), "--dry-run"])
    lines = [ln for ln in result.output.strip().splitlines() if not ln.startswith("dtype:")]
    assert_one_line_error(result.exit_code, "\n".join(lines), "removes no block")


SHALLOW = list(range(1, 30))  # keeps 1 block of 30


@pytest.mark.parametrize("removed,refused", [(SHALLOW, True), (list(range(16)), True),
                                             (list(range(15)), False)])
def test_shallow_mask_needs_force(write_mask, removed, refused):
    path = write_mask(removed)
    code, out = validate(path)
    if not refused:
        assert code == 0 and "warning" not in out, out
        return
    kept = 30 - len(removed)
    assert_one_line_error(code, out, f"keeps {kept} of 30 blocks", "under the minimum of 50%",
                          "near chance", "--force")
    result = runner.invoke(app, ["masks", "validate", str(path), "--model", "llama", "--force"])
    assert result.exit_code == 0, result.output
    assert any(ln.startswith("warning: ") and f"keeps {kept} of 30" in ln
               for ln in result.output.splitlines())


def test_make_shallow_mask_needs_force(tmp_path):
    out = tmp_path / "m.json"
    args = ["masks", "make", str(out), "--remove", "1-29", "--task", "t"]
    result = runner.invoke(app, args)
    assert_one_line_error(result.exit_code, result.output.strip(), "keeps 1 of 30 blocks")
    assert not out.exists()
    result = runner.invoke(app, args + ["--force"])
    assert result.exit_code == 0 and out.exists(), result.output
    assert "warning: " in result.output


def test_serve_shallow_mask_needs_force(write_mask):
    path = write_mask(SHALLOW)
    result = runner.invoke(app, ["serve", "--task-mask", str(path), "--dry-run"])
    lines = [ln for ln in result.output.strip().splitlines() if not ln.startswith("dtype:")]
    assert_one_line_error(result.exit_code, "\n".join(lines), "keeps 1 of 30 blocks", "--force")
    result = runner.invoke(app, ["serve", "--task-mask", str(path), "--dry-run", "--force"])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "1/30" in result.output


def test_model_mismatch_names_alias_and_fingerprint_never_a_path(write_mask, demo_model):
    def other_model(doc):
        doc["model"]["id"] = "/home/someone/ckpts/Llama-3.1-8B"  # an old mask with a path
        doc["model"]["fingerprint"].update(num_hidden_layers=32)
        doc["num_hidden_layers"] = 32

    path = write_mask([1], edit=other_model)
    code, out = validate(path)
    assert_one_line_error(code, out, "made for model 'Llama-3.1-8B' [architecture=",
                          "num_hidden_layers=32", "not for 'llama' [", "num_hidden_layers=30")
    assert "/home/someone" not in out and demo_model not in out
    with pytest.raises(MaskError) as exc:
        load_mask(path, demo_model)  # no alias given: the checkpoint folder's name, not its path
    assert demo_model not in str(exc.value) and "smollm2" in str(exc.value).lower()


def test_made_mask_records_no_local_path(demo_model):
    assert make_mask(demo_model, [3], task="t").model_id == "smollm2-135m-instruct"
    assert make_mask(demo_model, [3], task="t", model_id="llama").model_id == "llama"


def test_provenance_relative_to_data_root(tmp_path, monkeypatch):
    from tabp_vllm.data import Dataset, load_task, portable_source

    root = tmp_path / "root"
    (root / "sets").mkdir(parents=True)
    monkeypatch.setenv("TABP_VLLM_DATA", str(root))
    f = root / "sets" / "x.jsonl"
    f.write_text('{"text": "hello"}\n')
    assert Dataset("x", "user", "text", [], str(f)).provenance(0)["source"] == "data:sets/x.jsonl"
    outside = tmp_path / "mine.jsonl"
    outside.write_text('{"text": "hello"}\n')
    assert portable_source(str(outside)) == "user:mine.jsonl"
    prov = load_task("demo").provenance(0)
    assert prov["source"] == "package:demo_mcqa.jsonl"
    assert str(tmp_path) not in json.dumps(prov)


def test_cut_gives_the_smaller_k_from_the_masks_own_scores(demo_model, tmp_path):
    # per-block scores over candidates 15..29 (lower = more removable): the k lowest go
    scores = [None] * 15 + [float(s) for s in (9, 1, 7, 3, 8, 2, 10, 11, 12, 13, 14, 15, 16, 17, 4)]
    scored = make_mask(demo_model, [15, 16, 18, 20], task="t", method="tabp", scores=scores,
                       params={"k": 4, "candidate_range": [15, 30], "statistic": "entropy"})
    src = scored.save(tmp_path / "k4.json")
    out = tmp_path / "k2.json"
    result = runner.invoke(app, ["masks", "cut", str(src), "--k", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    cut = load_mask(out, demo_model)
    assert cut.removed_layers == [16, 20]  # scores 1 and 2
    assert cut.params["k"] == 2 and cut.params["statistic"] == "entropy"
    assert cut.scores == scores and cut.method == "tabp"
    # SLEB: its greedy removal order, not the scores, decides
    ppl = make_mask(demo_model, [4, 9, 21], task="t", method="sleb", scores=[0.0] * 30,
                    params={"k": 3, "candidate_range": [1, 29], "removal_order": [21, 4, 9]})
    result = runner.invoke(app, ["masks", "cut", str(ppl.save(tmp_path / "p.json")), "--k", "1",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert load_mask(out).removed_layers == [21]


@pytest.mark.parametrize("case,fragment", [
    ("larger", "k = 5 is larger than the scored k = 4"),
    ("angular", "angular: the mask for k = 2 needs its own scoring run"),
    ("manual", "recorded no per-block scores to cut"),
])
def test_cut_refuses_what_it_cannot_cut(demo_model, tmp_path, case, fragment):
    if case == "manual":
        mask = make_mask(demo_model, [3], task="t")
    else:
        mask = make_mask(demo_model, [15, 16, 17, 18], task="t", scores=[0.5] * 30,
                         method="angular" if case == "angular" else "tabp",
                         params={"k": 4, "candidate_range": [15, 30]})
    src = mask.save(tmp_path / "m.json")
    out = tmp_path / "out.json"
    result = runner.invoke(app, ["masks", "cut", str(src), "--k", "5" if case == "larger" else "2",
                                 "-o", str(out)])
    assert_one_line_error(result.exit_code, result.output.strip(), str(src), fragment)
    assert not out.exists()


# ---- mask format v2: sublayers (issue 33) -------------------------------------------------------

def test_v2_written_and_v1_files_load_as_whole_block_masks(write_mask, demo_model):
    import hashlib

    path = write_mask([3, 7])
    doc = json.loads(path.read_text())
    assert doc["version"] == 2 and doc["removed_attention"] == [] and doc["removed_mlp"] == []
    v1 = dict(doc, version=1)
    del v1["removed_attention"], v1["removed_mlp"]
    path.write_text(json.dumps(v1))
    code, out = validate(path)
    assert code == 0, out
    mask = load_mask(path, demo_model)
    assert mask.removed_layers == [3, 7] and not mask.is_sublayer
    assert mask.attention_kept == mask.mlp_kept == mask.kept_layers
    # the hash of a whole-block mask is the version 1 one (committed hashes hold)
    key = json.dumps([mask.fingerprint, [3, 7]], sort_keys=True)
    assert mask.content_hash() == hashlib.sha256(key.encode()).hexdigest()[:12]
    path.write_text(json.dumps(dict(v1, removed_attention=[4])))
    assert_one_line_error(*validate(path), "need mask version 2")


def test_sublayer_mask_roundtrips(demo_model, tmp_path):
    mask = make_mask(demo_model, [2], task="t", removed_attention=[20, 15], removed_mlp=[7])
    assert mask.is_sublayer
    assert mask.removed_attention == [15, 20] and mask.removed_mlp == [7]
    assert mask.attention_kept == [i for i in range(30) if i not in (2, 15, 20)]
    assert mask.mlp_kept == [i for i in range(30) if i not in (2, 7)]
    assert (mask.num_attention_kept, mask.num_mlp_kept, mask.num_kept) == (27, 28, 29)
    again = load_mask(mask.save(tmp_path / "m.json"), demo_model)
    assert again == mask
    whole = make_mask(demo_model, [2], task="t")
    other = make_mask(demo_model, [2], task="t", removed_attention=[15, 20], removed_mlp=[6])
    assert len({mask.content_hash(), whole.content_hash(), other.content_hash()}) == 3
    # attention-only, nothing removed whole
    assert make_mask(demo_model, [], task="t", removed_attention=[29]).removed_layers == []


@pytest.mark.parametrize("edit,fragment", [
    (dict(removed_attention=[30]), "removed attention of block 30 is out of range"),
    (dict(removed_mlp=[-1]), "removed MLP of block -1 is out of range"),
    (dict(removed_mlp=[4, 4]), "removed MLP of block 4 is listed more than once"),
    (dict(removed_attention=[1.0]), "is not an integer"),
    (dict(removed_attention="3"), "'removed_attention' must be a list"),
    (dict(removed_attention=[5, 9], removed_mlp=[9]),
     "block 9 has both its attention and its MLP removed: that is a removed block: list it in "
     "removed_layers"),
    (dict(removed_attention=[1]), "block 1 is in removed_layers and also has a sublayer listed"),
    (dict(removed_layers=[], removed_attention=list(range(30))),
     "removes every attention sublayer (30 of 30"),
    (dict(removed_layers=list(range(15)), removed_attention=list(range(15, 30))),
     "removes every attention sublayer"),
])
def test_bad_sublayer_lists_refused(write_mask, edit, fragment):
    path = write_mask([1], edit=lambda d: d.update(edit))
    assert_one_line_error(*validate(path), fragment)


def test_sublayer_depth_counts_units(write_mask):
    # 10 blocks whole + 11 attentions = 31 of 60 units gone: under half kept
    path = write_mask([1], edit=lambda d: d.update(removed_layers=list(range(10)),
                                                   removed_attention=list(range(10, 21))))
    assert_one_line_error(*validate(path), "keeps 29 of 60 sublayers", "attention 9/30",
                          "MLP 20/30", "--force")
    # every attention sublayer but one: 31 of 60 kept, allowed (attention is the mild unit)
    path = write_mask([1], edit=lambda d: d.update(removed_layers=[],
                                                   removed_attention=list(range(1, 30))))
    code, out = validate(path)
    assert code == 0 and "warning" not in out, out
    assert "attention removed in blocks [1, 2," in out and "attention kept 1/30" in out


def test_make_and_show_sublayer_mask(tmp_path):
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["masks", "make", str(out), "--remove-attention", "15-17",
                                 "--remove-mlp", "20", "--task", "t"])
    assert result.exit_code == 0, result.output
    mask = load_mask(out)
    assert (mask.removed_layers, mask.removed_attention, mask.removed_mlp) == ([], [15, 16, 17],
                                                                              [20])
    result = runner.invoke(app, ["masks", "show", str(out)])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines()
            if line.count("│") >= 3 and line.split("│")[1].strip().isdigit()}
    assert "attention removed" in rows["16"] and "MLP removed" in rows["20"]
    assert "removed" not in rows["14"]
    flat = " ".join(result.output.split())  # rich wraps long lines
    assert "attention kept 27/30" in flat and "MLP kept 29/30" in flat
    result = runner.invoke(app, ["masks", "make", str(out), "--remove-mlp", "x", "--task", "t"])
    assert_one_line_error(result.exit_code, result.output.strip(), "--remove-mlp: 'x'")
    result = runner.invoke(app, ["masks", "make", str(out), "--remove", "3", "--remove-mlp", "3",
                                 "--task", "t"])
    assert_one_line_error(result.exit_code, result.output.strip(), "block 3 is in removed_layers")


def test_per_unit_scores_accepted_and_shown(write_mask):
    scores = [float(u) for u in range(60)]
    path = write_mask([1], edit=lambda d: d.update(removed_layers=[], removed_attention=[4],
                                                   scores=scores))
    result = runner.invoke(app, ["masks", "show", str(path)])
    assert result.exit_code == 0, result.output
    row4 = next(line for line in result.output.splitlines()
                if line.count("│") >= 3 and line.split("│")[1].strip() == "4")
    assert "8" in row4.split("│")[3] and "9" in row4.split("│")[4]
