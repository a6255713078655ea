"""The loader's weight renaming, without an engine."""

from tabp_vllm.engine import engine_args_for, per_layer_overrides
from tabp_vllm.loader import LOAD_FORMAT, layer_renumbering, prune_sublayer_weights, prune_weights
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
    from vllm import ModelRegistry

    assert "TabpSublayerForCausalLM" in ModelRegistry.get_supported_archs()


# ---- sublayer masks (issue 33) ------------------------------------------------------------------

def test_prune_sublayer_weights_drops_units_without_renumbering():
    names = [f"model.layers.{i}.{t}" for i in range(4) for t in (
        "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_proj.bias",
        "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
        "mlp.down_proj.weight")] + ["model.norm.weight", "lm_head.weight"]
    out = [n for n, _ in prune_sublayer_weights(((n, None) for n in names), removed_layers=[3],
                                                removed_attention=[0], removed_mlp=[2])]
    assert not any(n.startswith("model.layers.3.") for n in out)  # a removed block: all of it
    assert [n for n in out if n.startswith("model.layers.0.")] == [
        "model.layers.0.post_attention_layernorm.weight", "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.down_proj.weight"]
    assert [n for n in out if n.startswith("model.layers.2.")] == [
        "model.layers.2.input_layernorm.weight", "model.layers.2.self_attn.q_proj.weight",
        "model.layers.2.self_attn.q_proj.bias", "model.layers.2.self_attn.o_proj.weight"]
    assert len([n for n in out if n.startswith("model.layers.1.")]) == 7
    assert out[-2:] == ["model.norm.weight", "lm_head.weight"]


def test_sublayer_engine_args_are_picklable_deci_overrides(demo_model):
    import pickle

    import cloudpickle
    from transformers import AutoConfig

    mask = make_mask(demo_model, [3], task="t", removed_attention=[15, 16], removed_mlp=[0])
    args = engine_args_for(demo_model, mask)
    extra = args["model_loader_extra_config"]
    assert (extra["tabp_removed_layers"], extra["tabp_removed_attention"],
            extra["tabp_removed_mlp"], extra["tabp_num_hidden_layers"]) == ([3], [15, 16], [0], 30)
    # what vLLM's workers and Ray Serve's replicas receive: a pickled callable
    for dumps in (pickle.dumps, cloudpickle.dumps):
        fn = pickle.loads(dumps(args["hf_overrides"]))
        config = fn(AutoConfig.from_pretrained(demo_model))
        assert config.architectures == ["TabpSublayerForCausalLM"]
        assert config.num_hidden_layers == 30
        bcs = config.block_configs
        assert len(bcs) == 30
        assert [i for i, b in enumerate(bcs) if b.attention.no_op] == [3, 15, 16]
        assert [i for i, b in enumerate(bcs) if b.ffn.no_op] == [0, 3]
        # shapes are the checkpoint's: 9 heads over 3 KV heads, the real MLP width
        assert {(b.attention.n_heads_in_group, b.ffn.intermediate_size) for b in bcs} == {(3, 1536)}
        assert not hasattr(bcs[0].ffn, "ffn_mult") and bcs[0].get("block_type", "") == ""
        config.to_json_string()  # still serialisable, as vLLM writes configs out
    # vLLM probes the model type on a bare config first: left alone
    from transformers import PretrainedConfig

    bare = PretrainedConfig(architectures=[""], model_type="dummy_llama")
    assert args["hf_overrides"](bare).architectures == [""]


def test_qwen2_overrides_give_qkv_bias_without_o_proj_bias():
    from transformers import Qwen2Config

    from tabp_vllm.engine import apply_sublayer_overrides

    config = apply_sublayer_overrides(
        Qwen2Config(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    hidden_size=128, intermediate_size=256), [], [1], [])
    assert (config.qkv_bias, config.attention_bias) == (True, False)
    assert [b.attention.no_op for b in config.block_configs] == [False, True, False, False]
    assert config.block_configs[0].attention.n_heads_in_group == 2


def test_sublayer_mask_refused_on_an_api_server_command_line(demo_model):
    import pytest

    from tabp_vllm.errors import TabpError
    from tabp_vllm.loadtest.servers import api_server_command

    mask = make_mask(demo_model, [], task="t", removed_attention=[20])
    with pytest.raises(TabpError, match="sublayer mask cannot go on an api_server command line"):
        api_server_command(demo_model, 8000, "x", mask=mask)
    assert "--hf-overrides" in api_server_command(demo_model, 8000, "x",
                                                  mask=make_mask(demo_model, [20], task="t"))


def test_api_servers_on_a_cpu_run_the_worker_in_the_engine_core(demo_model, monkeypatch):
    """Our variant servers, dense or pruned: vLLM's uni-process executor on a CPU (no third
    process re-importing vLLM), as offline engines and serve's replicas; a GPU, and the bare
    server (plain vLLM, the baseline of serve-vs-bare), keep vLLM's own."""
    from tabp_vllm import hardware
    from tabp_vllm.loadtest.servers import api_server_command

    def backend(cmd):
        return cmd[cmd.index("--distributed-executor-backend") + 1] \
            if "--distributed-executor-backend" in cmd else None

    pruned = make_mask(demo_model, [20], task="t")
    monkeypatch.setattr(hardware, "on_gpu", lambda: False)
    assert backend(api_server_command(demo_model, 8000, "x", mask=pruned)) == "uni"
    assert backend(api_server_command(demo_model, 8000, "x")) == "uni"
    assert backend(api_server_command(demo_model, 8000, "x", bare=True)) is None
    monkeypatch.setattr(hardware, "on_gpu", lambda: True)
    assert backend(api_server_command(demo_model, 8000, "x", mask=pruned)) is None
