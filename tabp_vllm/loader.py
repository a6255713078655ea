"""vLLM model loader that builds a model with a task mask's decoder blocks left out.

Registered through the `vllm.general_plugins` entry point (see pyproject.toml), so every vLLM
process, engine workers included, knows the `tabp_pruned` load format without a fork of vLLM.

The engine is told the reduced depth by `hf_overrides` (see `tabp_vllm.engine`), so it allocates
only the kept blocks and their KV cache. This loader then streams the *original* checkpoint, drops
the removed blocks' tensors and renumbers the kept ones onto the slots 0..kept-1.

A sublayer mask (removed attention / MLP sublayers) is served by the heterogeneous-layer model
(`tabp_vllm.sublayer_model`) at the original depth: nothing is renumbered, and the loader drops the
tensors of each removed sublayer with its RMSNorm (attention: self_attn.* and input_layernorm;
MLP: mlp.* and post_attention_layernorm), and every tensor of a block removed whole.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Generator, Iterable

LOAD_FORMAT = "tabp_pruned"
# Our keys inside vLLM's `model_loader_extra_config`; stripped before DefaultModelLoader sees them.
EXTRA_REMOVED = "tabp_removed_layers"
EXTRA_NUM_LAYERS = "tabp_num_hidden_layers"
EXTRA_MASK_HASH = "tabp_mask_hash"
EXTRA_REMOVED_ATTENTION = "tabp_removed_attention"  # sublayer masks only
EXTRA_REMOVED_MLP = "tabp_removed_mlp"
OUR_KEYS = (EXTRA_REMOVED, EXTRA_NUM_LAYERS, EXTRA_MASK_HASH, EXTRA_REMOVED_ATTENTION,
            EXTRA_REMOVED_MLP)
# The tensors of a block's sublayers (after "model.layers.<i>"), each with the RMSNorm in front of it.
SUBLAYER_PREFIXES = {"attention": (".self_attn.", ".input_layernorm."),
                     "mlp": (".mlp.", ".post_attention_layernorm.")}

SUBLAYER_ARCHITECTURE = "TabpSublayerForCausalLM"  # tabp_vllm.sublayer_model (imports vLLM)

# The decoder stack of HF causal LMs: "model.layers.<i>." (Llama, Mistral, Qwen, Gemma, ...).
# Anchored at a dot or the start so that e.g. a vision tower's "encoder.layers.<i>" is not hit.
_LAYER_RE = re.compile(r"^((?:[\w.]*\.)?model\.layers\.|layers\.)(\d+)(\..*)$")


def layer_renumbering(num_layers: int, removed: Iterable[int]) -> dict[int, int]:
    """Map each kept original block index to its new, contiguous index."""
    removed = set(removed)
    kept = [i for i in range(num_layers) if i not in removed]
    return {old: new for new, old in enumerate(kept)}


def prune_weights(
    weights: Iterable[tuple[str, "object"]], renumber: dict[int, int]
) -> Generator[tuple[str, "object"], None, None]:
    """Drop the removed blocks' tensors and rename the kept ones; other tensors pass through."""
    for name, tensor in weights:
        match = _LAYER_RE.match(name)
        if match is None:
            yield name, tensor
            continue
        new_idx = renumber.get(int(match.group(2)))
        if new_idx is None:
            continue  # a removed block: never materialised
        yield f"{match.group(1)}{new_idx}{match.group(3)}", tensor


def prune_sublayer_weights(
    weights: Iterable[tuple[str, "object"]], removed_layers: Iterable[int],
    removed_attention: Iterable[int], removed_mlp: Iterable[int],
) -> Generator[tuple[str, "object"], None, None]:
    """Drop the tensors of removed blocks and removed sublayers, renumbering nothing (the
    heterogeneous-layer model keeps every block's slot); other tensors pass through."""
    whole, attention, mlp = set(removed_layers), set(removed_attention), set(removed_mlp)
    for name, tensor in weights:
        match = _LAYER_RE.match(name)
        if match is not None:
            idx, rest = int(match.group(2)), match.group(3)
            if (idx in whole
                    or (idx in attention and rest.startswith(SUBLAYER_PREFIXES["attention"]))
                    or (idx in mlp and rest.startswith(SUBLAYER_PREFIXES["mlp"]))):
                continue  # a removed unit: never materialised
        yield name, tensor


def _make_loader_class():
    # Imported lazily: registering the plugin must stay cheap in processes that never load a model.
    import torch
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    class PrunedModelLoader(DefaultModelLoader):
        """DefaultModelLoader that reads the original checkpoint minus the masked blocks."""

        def __init__(self, load_config):
            extra = dict(load_config.model_loader_extra_config or {})
            if EXTRA_REMOVED not in extra or EXTRA_NUM_LAYERS not in extra:
                raise ValueError(
                    f"load format {LOAD_FORMAT!r} needs {EXTRA_REMOVED!r} and {EXTRA_NUM_LAYERS!r} "
                    "in model_loader_extra_config; build engine args with "
                    "tabp_vllm.engine.engine_args_for()"
                )
            self.removed_layers = sorted(int(i) for i in extra[EXTRA_REMOVED])
            self.removed_attention = sorted(int(i) for i in extra.get(EXTRA_REMOVED_ATTENTION) or [])
            self.removed_mlp = sorted(int(i) for i in extra.get(EXTRA_REMOVED_MLP) or [])
            self.original_num_layers = int(extra[EXTRA_NUM_LAYERS])
            self.mask_hash = extra.get(EXTRA_MASK_HASH)
            base_extra = {k: v for k, v in extra.items() if k not in OUR_KEYS}
            super().__init__(
                dataclasses.replace(
                    load_config, load_format="auto", model_loader_extra_config=base_extra
                )
            )
            self.renumber = layer_renumbering(self.original_num_layers, self.removed_layers)

        def get_all_weights(self, model_config, model):
            # Count what the engine materialises (in its dtype), so memory claims can be checked.
            itemsize = torch.empty((), dtype=model_config.dtype).element_size()
            loaded = 0
            weights = super().get_all_weights(model_config, model)
            if self.removed_attention or self.removed_mlp:
                weights = prune_sublayer_weights(weights, self.removed_layers,
                                                 self.removed_attention, self.removed_mlp)
            else:
                weights = prune_weights(weights, self.renumber)
            for name, tensor in weights:
                loaded += tensor.numel() * itemsize
                yield name, tensor
            model.tabp_weight_bytes = loaded
            model.tabp_removed_layers = list(self.removed_layers)

    PrunedModelLoader.__name__ = PrunedModelLoader.__qualname__ = "PrunedModelLoader"
    return PrunedModelLoader


def register() -> None:
    """vLLM general plugin entry point: make the `tabp_pruned` load format and the sublayer
    model (`tabp_vllm.sublayer_model`, registered by name: imported only when built) known."""
    from vllm import ModelRegistry
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, register_model_loader

    if LOAD_FORMAT not in _LOAD_FORMAT_TO_MODEL_LOADER:  # plugins may load more than once
        register_model_loader(LOAD_FORMAT)(_make_loader_class())
    if SUBLAYER_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(SUBLAYER_ARCHITECTURE,
                                     f"tabp_vllm.sublayer_model:{SUBLAYER_ARCHITECTURE}")
