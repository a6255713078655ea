"""The task mask file: the contract between the scorer and the server.

A mask is JSON, versioned and self-describing. It names the model it was made for by a fingerprint
of that model's config, so a mask made for one model is refused on another, and it records how it
was made (method, parameters, per-block scores, calibration provenance). Every check happens here,
before any engine starts, and fails with one `MaskError` line.

Version 2 adds sublayer removal: `removed_attention` / `removed_mlp` list blocks whose attention /
MLP alone is left out (the block's other sublayer stays); `removed_layers` still lists whole blocks.
A version 1 file is a whole-block mask and loads as one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabp_vllm.errors import TabpError
from tabp_vllm.models import (FINGERPRINT_KEYS, fingerprint_diffs, load_model_config,
                              model_fingerprint, save_json_atomically)

MASK_FORMAT = "tabp-vllm-mask"
MASK_VERSION = 2  # the version written
MASK_VERSIONS_READ = (1, 2)
# A mask keeping fewer than this share of the blocks is refused unless forced (`check_depth`).
# Why half: one-shot block pruning without fine-tuning already costs a fifth of the accuracy at a
# quarter removed (TaBP, Llama-3-8B, 8 of 32 blocks: 60.9 vs dense 76.5 average over 7 tasks) and
# falls towards chance past half; on the demo model 4 of 30 removed cost ARC-Easy .521 -> .460.
# A sublayer mask is measured in units (each block = an attention and an MLP unit, 2L in all):
# it must keep this share of the 2L units. For a whole-block mask that is the same rule; for
# sublayers it counts an attention or an MLP as half a block, which lets through the attention-only
# masks known to be mild (He et al. 2024, "What Matters in Transformers?": half of Llama-2-70B's
# attention sublayers dropped keeps 97.6 % of its performance), while a mask that removes more than
# half of all the model's sublayers is refused like a whole-block mask removing more than half.
MIN_KEPT_FRACTION = 0.5


class MaskError(TabpError):
    """A mask file that cannot be used: the message is one line naming the file and the fault."""


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class TaskMask:
    """One task's pruning decision for one model."""

    task: str
    model_id: str
    fingerprint: dict[str, Any]
    removed_layers: list[int]
    method: str = "manual"
    removed_attention: list[int] = field(default_factory=list)
    removed_mlp: list[int] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    scores: list[float | None] | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=now_iso)

    @property
    def num_hidden_layers(self) -> int:
        return int(self.fingerprint["num_hidden_layers"])

    @property
    def kept_layers(self) -> list[int]:
        removed = set(self.removed_layers)
        return [i for i in range(self.num_hidden_layers) if i not in removed]

    @property
    def num_kept(self) -> int:
        """Blocks not removed whole (a block that lost one sublayer still counts)."""
        return self.num_hidden_layers - len(self.removed_layers)

    @property
    def is_sublayer(self) -> bool:
        """Whether any attention or MLP sublayer is removed on its own (served through the
        heterogeneous-layer model, not by renumbering blocks)."""
        return bool(self.removed_attention or self.removed_mlp)

    @property
    def attention_kept(self) -> list[int]:
        """Blocks whose attention is served."""
        gone = set(self.removed_layers) | set(self.removed_attention)
        return [i for i in range(self.num_hidden_layers) if i not in gone]

    @property
    def mlp_kept(self) -> list[int]:
        """Blocks whose MLP is served."""
        gone = set(self.removed_layers) | set(self.removed_mlp)
        return [i for i in range(self.num_hidden_layers) if i not in gone]

    @property
    def num_attention_kept(self) -> int:
        return len(self.attention_kept)

    @property
    def num_mlp_kept(self) -> int:
        return len(self.mlp_kept)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MASK_FORMAT,
            "version": MASK_VERSION,
            "task": self.task,
            "model": {"id": self.model_id, "fingerprint": self.fingerprint},
            "num_hidden_layers": self.num_hidden_layers,
            "removed_layers": sorted(self.removed_layers),
            "removed_attention": sorted(self.removed_attention),
            "removed_mlp": sorted(self.removed_mlp),
            "method": {"name": self.method, "params": self.params},
            "scores": self.scores,
            "calibration": self.calibration,
            "created_at": self.created_at,
        }

    def content_hash(self) -> str:
        """Short hash of what decides the served model: fingerprint + removed layers (+ removed
        sublayers, only when there are any: a whole-block mask keeps its version 1 hash)."""
        parts: list[Any] = [self.fingerprint, sorted(self.removed_layers)]
        if self.is_sublayer:
            parts += [sorted(self.removed_attention), sorted(self.removed_mlp)]
        key = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    def save(self, path: str | Path) -> Path:
        return save_json_atomically(path, self.to_json())

    def check_model(self, model_config: dict[str, Any], model_name: str, where: str) -> None:
        """Refuse a mask made for a different model. Both models are named by their public name
        (an alias, an HF id or a checkpoint folder's name, never a local path) and fingerprint."""
        actual = model_fingerprint(model_config)
        diffs = fingerprint_diffs(self.fingerprint, actual)
        if diffs:
            raise MaskError(
                f"{where}: mask was made for model {public_name(self.model_id)!r} "
                f"[{fingerprint_text(self.fingerprint)}], not for {public_name(model_name)!r} "
                f"[{fingerprint_text(actual)}] ({'; '.join(diffs)})"
            )


def public_name(model: str) -> str:
    """How a model is named in messages and mask files: an alias or HF id as given, a local
    checkpoint by its folder's name (a path says nothing on another machine, and leaks)."""
    from tabp_vllm.models import alias_of

    return alias_of(model) if model.startswith(("/", "~", ".")) or Path(model).exists() else model


def fingerprint_text(fp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={fp.get(k)}" for k in FINGERPRINT_KEYS)


def check_depth(mask: TaskMask, where: str, force: bool = False) -> str | None:
    """Refuse (MaskError) a mask keeping fewer than MIN_KEPT_FRACTION of the blocks (of the 2L
    attention and MLP units, for a sublayer mask), naming the damage to expect; with `force`,
    return that text as a warning instead. None: deep enough."""
    n, kept = mask.num_hidden_layers, mask.num_kept
    if not mask.is_sublayer:
        if kept >= MIN_KEPT_FRACTION * n:
            return None
        what = f"{kept} of {n} blocks ({kept / n:.0%})"
    else:
        units = mask.num_attention_kept + mask.num_mlp_kept
        if units >= MIN_KEPT_FRACTION * 2 * n:
            return None
        what = (f"{units} of {2 * n} sublayers ({units / (2 * n):.0%}; attention "
                f"{mask.num_attention_kept}/{n}, MLP {mask.num_mlp_kept}/{n})")
    text = (f"{where}: mask keeps {what}, under the minimum of "
            f"{MIN_KEPT_FRACTION:.0%}: expect answers near chance (one-shot block pruning loses "
            f"about a fifth of task accuracy at a quarter of the blocks removed and falls towards "
            f"chance past half)")
    if not force:
        raise MaskError(text + "; pass --force to use it anyway")
    return text


def _fail(where: str, msg: str) -> MaskError:
    return MaskError(f"{where}: {msg}")


def read_json_artefact(path: Path, what: str, fail) -> Any:
    """The decoded JSON of a mask or router file; `fail(where, msg)` builds the one-line error."""
    where = str(path)
    if not path.exists():
        raise fail(where, f"{what} file not found")
    if path.is_dir():
        raise fail(where, f"is a directory, not a {what} file")
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError:
        raise fail(where, f"not a {what} file (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise fail(where, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def check_envelope(data: Any, where: str, fmt: str, version: int | tuple[int, ...], what: str,
                   fail) -> tuple[dict[str, Any], int]:
    """What every tabp-vllm artefact (mask, router) starts with: a JSON object of format `fmt` at
    `version` (or one of several read), made for a model fingerprint. Returns (fingerprint,
    num_hidden_layers); `fail(where, msg)` builds the one-line error."""
    versions = version if isinstance(version, tuple) else (version,)
    if not isinstance(data, dict):
        raise fail(where, f"not a {what} file (expected a JSON object)")
    if data.get("format") != fmt:
        raise fail(where, f"not a {what} file (format is {data.get('format')!r}, expected {fmt!r})")
    if data.get("version") not in versions or isinstance(data.get("version"), bool):
        raise fail(where, f"unsupported {what} version {data.get('version')!r} "
                          f"(this tabp-vllm reads version {' or '.join(map(str, versions))})")
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), dict):
        raise fail(where, "missing 'model.fingerprint'")
    fingerprint = model["fingerprint"]
    missing = [k for k in FINGERPRINT_KEYS if k not in fingerprint]
    if missing:
        raise fail(where, f"model fingerprint lacks {', '.join(missing)}")
    n = fingerprint["num_hidden_layers"]
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise fail(where, f"model fingerprint has an invalid num_hidden_layers {n!r}")
    return fingerprint, n


def _block_list(data: dict[str, Any], key: str, what: str, n: int, where: str) -> list[int]:
    """A list of block indices under `key`: integers, in range, each once."""
    values = data.get(key, [])
    if not isinstance(values, list):
        raise _fail(where, f"{key!r} must be a list of block indices")
    for idx in values:
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise _fail(where, f"{what} {idx!r} is not an integer")
    bad = [i for i in values if not 0 <= i < n]
    if bad:
        raise _fail(where, f"{what} {bad[0]} is out of range (model has {n} blocks, "
                           f"valid indices 0..{n - 1})")
    dupes = sorted({i for i in values if values.count(i) > 1})
    if dupes:
        raise _fail(where, f"{what} {dupes[0]} is listed more than once")
    return sorted(values)


def parse_mask(data: Any, where: str = "<mask>") -> TaskMask:
    """Validate a decoded mask document and build a TaskMask; raise MaskError on any fault."""
    fingerprint, n = check_envelope(data, where, MASK_FORMAT, MASK_VERSIONS_READ, "mask", _fail)
    if data.get("num_hidden_layers", n) != n:
        raise _fail(where, f"num_hidden_layers {data.get('num_hidden_layers')!r} disagrees "
                           f"with the model fingerprint ({n})")
    if "removed_layers" not in data or not isinstance(data["removed_layers"], list):
        raise _fail(where, "'removed_layers' must be a list of block indices")
    removed = _block_list(data, "removed_layers", "removed layer", n, where)
    if data["version"] == 1 and ("removed_attention" in data or "removed_mlp" in data):
        raise _fail(where, "sublayer lists ('removed_attention', 'removed_mlp') need mask "
                           "version 2 (this file says version 1)")
    attention = _block_list(data, "removed_attention", "removed attention of block", n, where)
    mlp = _block_list(data, "removed_mlp", "removed MLP of block", n, where)
    both = sorted(set(attention) & set(mlp))
    if both:
        raise _fail(where, f"block {both[0]} has both its attention and its MLP removed: that is "
                           f"a removed block: list it in removed_layers")
    whole = sorted(set(removed) & (set(attention) | set(mlp)))
    if whole:
        raise _fail(where, f"block {whole[0]} is in removed_layers and also has a sublayer listed "
                           f"in removed_attention / removed_mlp: list it once")
    if len(removed) >= n:
        raise _fail(where, f"mask removes every block ({n} of {n}); at least one must stay")
    if not (removed or attention or mlp):
        raise _fail(where, "mask removes no block: it is the dense model (serve that with "
                           "--dense, not as a pruned variant)")
    if attention and len(removed) + len(attention) >= n:
        # No attention left: no token sees another, and vLLM has no KV cache to size.
        raise _fail(where, f"mask removes every attention sublayer ({n} of {n}, whole blocks "
                           f"included); at least one must stay")
    task = data.get("task")
    if not isinstance(task, str) or not task:
        raise _fail(where, "missing 'task' name")
    method = data.get("method") or {}
    scores = data.get("scores")
    if scores is not None and (not isinstance(scores, list) or len(scores) not in (n, 2 * n)):
        raise _fail(where, f"'scores' must list one value per block ({n}) or per sublayer "
                           f"unit ({2 * n}: unit 2*i attention, 2*i+1 MLP of block i)")
    return TaskMask(
        task=task,
        model_id=str(data["model"].get("id", "")),
        fingerprint={k: fingerprint[k] for k in FINGERPRINT_KEYS},
        removed_layers=removed,
        removed_attention=attention,
        removed_mlp=mlp,
        method=str(method.get("name", "manual")),
        params=dict(method.get("params") or {}),
        scores=scores,
        calibration=dict(data.get("calibration") or {}),
        created_at=str(data.get("created_at", "")),
    )


def load_mask(path: str | Path, model: str | None = None,
              model_name: str | None = None) -> TaskMask:
    """Read and validate a mask file; with `model` (a resolved checkpoint), check it fits.
    `model_name`: what the user called that model (an alias), for the message."""
    where = str(path)
    data = read_json_artefact(Path(path), "mask", _fail)
    mask = parse_mask(data, where)
    if model is not None:
        mask.check_model(load_model_config(model), model_name or model, where)
    return mask


def make_mask(
    model_path: str,
    removed_layers: list[int],
    task: str,
    model_id: str | None = None,
    removed_attention: list[int] = (),
    removed_mlp: list[int] = (),
    **extra: Any,
) -> TaskMask:
    """Build (and validate) a mask for a model from the blocks (and sublayers) to remove."""
    fingerprint = model_fingerprint(load_model_config(model_path))
    mask = TaskMask(task=task, model_id=public_name(model_id or model_path), fingerprint=fingerprint,
                    removed_layers=list(removed_layers), removed_attention=list(removed_attention),
                    removed_mlp=list(removed_mlp), **extra)
    return parse_mask(mask.to_json(), where=f"mask for task {task!r}")
