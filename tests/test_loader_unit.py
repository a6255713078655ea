"""The loader's weight renaming, without an engine."""

from tabp_vllm.engine import engine_args_for, per_layer_overrides
from tabp_vllm.loader import LOAD_FORMAT, layer_renumbering, prune_weights
from tabp_vllm.mask import make_mask


def test_renumbering_is_contiguous():
    assert layer_renumbering(6, [1, 4]) == {0: 0, 2: 1, 3: 2, 5: 3}
    assert layer_renumbering(3, []) == {0: 0, 1: 1, 2: 2}


def test_prune_weights_drops_and_renames():
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.2.input_layernorm.weight",
        "model.layers.10.mlp.up_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
        "vision_tower.encoder.layers.1.weight",  # not the decoder stack: untouched
    ]
    out = [n for n, _ in prune_weights(((n, None) for n in names),
                                       layer_renumbering(11, [1, 5]))]
    assert out == [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.8.mlp.up_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
        "vision_tower.encoder.layers.1.weight",
    ]


def test_per_layer_config_lists_are_sliced(demo_model):
    mask = make_mask(demo_model, [0, 2], task="t")
    config = {"num_hidden_layers": 30, "layer_types": [f"t{i}" for i in range(30)],
              "architectures": ["A"] * 30, "other": [1, 2]}
    over = per_layer_overrides(config, mask)
    assert over["num_hidden_layers"] == 28
    assert over["layer_types"] == [f"t{i}" for i in range(30) if i not in (0, 2)]
    assert "architectures" not in over and "other" not in over


def test_engine_args_carry_the_mask(demo_model):
    mask = make_mask(demo_model, [3, 4], task="t")
    args = engine_args_for(demo_model, mask, kv_cache_gib=0.5)
    assert args["load_format"] == LOAD_FORMAT
    assert args["hf_overrides"] == {"num_hidden_layers": 28}
    assert args["model_loader_extra_config"]["tabp_removed_layers"] == [3, 4]
    assert args["model_loader_extra_config"]["tabp_num_hidden_layers"] == 30
    assert args["kv_cache_memory_bytes"] == 512 * 1024**2
    dense = engine_args_for(demo_model, None)
    assert "hf_overrides" not in dense
    assert dense["model_loader_extra_config"]["tabp_removed_layers"] == []


def test_plugin_entry_point_registers_load_format():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.value.startswith("tabp_vllm")]
    assert len(eps) == 1
    eps[0].load()()
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER

    assert _LOAD_FORMAT_TO_MODEL_LOADER[LOAD_FORMAT].__name__ == "PrunedModelLoader"
