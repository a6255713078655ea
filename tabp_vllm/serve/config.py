"""Variants (dense + one per mask) from CLI options or a YAML file -> Ray Serve `LLMConfig`s.

Everything here runs in the driver, before Ray starts: a bad mask or option fails with one line
(`TabpError`) and no process has been spawned yet.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tabp_vllm.errors import TabpError

# Decode-step FLOPs ratio is quoted at this context length (prompt + generated so far).
SPEEDUP_CONTEXT = 256
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


@dataclass
class EngineOptions:
    """Engine options every variant shares (passed through to `engine_args_for`)."""

    max_model_len: int | None = 2048
    dtype: str = "auto"
    kv_cache_gib: float | None = None
    enforce_eager: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Variant:
    """One served model: the dense checkpoint or the checkpoint with a mask's blocks removed."""

    name: str
    model: str               # resolved checkpoint path / HF id
    mask_path: str | None
    task: str | None
    blocks_kept: int
    blocks_total: int
    mask_hash: str | None
    theoretical_speedup: float
    replicas: int = 1

    def metadata(self) -> dict[str, Any]:
        """What `/v1/models` shows for this variant (under `metadata`)."""
        return {
            "variant": self.name,
            "dense": self.mask_path is None,
            "task": self.task,
            "blocks_kept": self.blocks_kept,
            "blocks_total": self.blocks_total,
            "mask_hash": self.mask_hash,
            "theoretical_speedup": round(self.theoretical_speedup, 4),
            "replicas": self.replicas,
        }


@dataclass
class ServeSpec:
    """A whole `serve` invocation: which variants, how they run, where they listen."""

    model_alias: str
    model: str
    variants: list[Variant]
    engine: EngineOptions
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_port: int = 8090
    api_key: str | None = None
    address: str | None = None
    num_cpus: int | None = None

    def ray_cpus_needed(self) -> int:
        # Each CPU LLMServer replica holds 2 logical CPUs (actor + placement bundle); ingress 1.
        return sum(2 * v.replicas for v in self.variants) + 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("api_key")
        return d


def theoretical_speedup(model: str, kept: int, context: int = SPEEDUP_CONTEXT) -> float:
    """Dense / pruned FLOPs of one decode step at `context` keys (LM head included)."""
    from tabp_vllm.flops import DecoderShape, flops_per_token
    from tabp_vllm.models import load_model_config

    shape = DecoderShape.from_config(load_model_config(model))
    dense = flops_per_token(shape, shape.num_hidden_layers, context)["total"]
    pruned = flops_per_token(shape, kept, context)["total"]
    return float(dense / pruned)


def _check_name(name: str, where: str) -> str:
    if not _NAME_RE.match(name):
        raise TabpError(f"{where}: variant name {name!r} must be letters, digits, '.', '_', ':' or '-'")
    return name


def build_variants(
    model: str,
    masks: list[str | Path],
    *,
    tasks: list[str | None] | None = None,
    names: list[str | None] | None = None,
    dense: bool = True,
    replicas: int = 1,
    dense_name: str | None = None,
) -> tuple[str, str, list[Variant]]:
    """Resolve the model, validate every mask against it, name the variants.

    Returns (alias, resolved checkpoint, variants). Names: the alias for dense,
    `<alias>-<task>` per mask (task from the mask unless overridden).
    """
    from tabp_vllm.mask import load_mask
    from tabp_vllm.models import load_model_config, model_fingerprint
    from tabp_vllm.models import alias_of, resolve_model

    if replicas < 1:
        raise TabpError(f"--replicas must be >= 1, got {replicas}")
    resolved = resolve_model(model)
    try:
        total = int(model_fingerprint(load_model_config(resolved))["num_hidden_layers"])
    except TabpError:
        raise
    except Exception as exc:  # noqa: BLE001 - a missing/unreadable config is a user error
        raise TabpError(f"model {model!r}: cannot read its config ({exc})") from None
    alias = alias_of(model)
    variants: list[Variant] = []
    if dense:
        variants.append(Variant(name=_check_name(dense_name or alias, "dense"), model=resolved,
                                mask_path=None, task=None, blocks_kept=total, blocks_total=total,
                                mask_hash=None, theoretical_speedup=1.0, replicas=replicas))
    tasks = list(tasks or [])
    names = list(names or [])
    for i, path in enumerate(masks):
        mask = load_mask(path, resolved)
        task = (tasks[i] if i < len(tasks) else None) or mask.task
        name = (names[i] if i < len(names) else None) or f"{alias}-{task}"
        variants.append(Variant(
            name=_check_name(name, str(path)), model=resolved, mask_path=str(Path(path).resolve()),
            task=task, blocks_kept=mask.num_kept, blocks_total=mask.num_hidden_layers,
            mask_hash=mask.content_hash(),
            theoretical_speedup=theoretical_speedup(resolved, mask.num_kept), replicas=replicas))
    if not variants:
        raise TabpError("nothing to serve: --no-dense and no --task-mask")
    seen: dict[str, str] = {}
    for v in variants:
        if v.name in seen:
            raise TabpError(f"two variants are named {v.name!r} ({seen[v.name]} and "
                            f"{v.mask_path or 'dense'}): give one a different task (--task)")
        seen[v.name] = v.mask_path or "dense"
    return alias, resolved, variants


def load_yaml_spec(path: str | Path) -> dict[str, Any]:
    """Read a serve config file (see examples/serve.yaml); returns its top-level mapping."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise TabpError(f"{p}: config file not found")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise TabpError(f"{p}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise TabpError(f"{p}: expected a mapping at the top level")
    known = {"model", "dense", "dense_name", "variants", "replicas", "host", "port", "metrics_port",
             "api_key", "address", "num_cpus", "engine"}
    unknown = set(doc) - known
    if unknown:
        raise TabpError(f"{p}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    for v in doc.get("variants") or []:
        if not isinstance(v, dict) or "mask" not in v:
            raise TabpError(f"{p}: each entry of 'variants' needs a 'mask' (got {v!r})")
        # Mask paths are relative to the config file.
        mp = Path(str(v["mask"])).expanduser()
        v["mask"] = str(mp if mp.is_absolute() else (p.parent / mp))
    return doc


def llm_configs(spec: ServeSpec) -> list[Any]:
    """One `ray.serve.llm.LLMConfig` per variant, engine kwargs from `engine_args_for`."""
    from ray.serve.llm import LLMConfig

    from tabp_vllm.engine import engine_args_for, on_gpu
    from tabp_vllm.mask import load_mask

    gpu = on_gpu()
    configs = []
    for v in spec.variants:
        mask = load_mask(v.mask_path, v.model) if v.mask_path else None
        kwargs = engine_args_for(
            v.model, mask, dtype=spec.engine.dtype, max_model_len=spec.engine.max_model_len,
            enforce_eager=spec.engine.enforce_eager, kv_cache_gib=spec.engine.kv_cache_gib,
            extra=spec.engine.extra,
        )
        kwargs.pop("model", None)  # model_source below
        kwargs.pop("served_model_name", None)  # Ray Serve names the engine after model_id
        cfg: dict[str, Any] = dict(
            model_loading_config={"model_id": v.name, "model_source": v.model},
            engine_kwargs=kwargs,
            deployment_config={"num_replicas": v.replicas},
            log_engine_metrics=True,
            runtime_env={"env_vars": {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}},
        )
        if not gpu:
            cfg["accelerator_config"] = {"kind": "cpu"}
            cfg["placement_group_config"] = {"bundles": [{"CPU": 1}]}
        configs.append(LLMConfig(**cfg))
    return configs
