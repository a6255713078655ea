"""GPU defaults without a GPU: compiled mode, per-variant `gpu_memory_utilization`, tensor
parallelism, computed for a fake 80 GiB card and the Llama-3.1-8B shape (config only, no weights)."""

from __future__ import annotations

import json
import os

import pytest

from tabp_vllm.engine import engine_args_for
from tabp_vllm.memory import (GPU_ENGINE_OVERHEAD_GIB, GPU_USABLE_FRACTION, GiB, kv_bytes_per_token,
                              weight_bytes)
from tabp_vllm.errors import TabpError
from tabp_vllm.mask import make_mask
from tabp_vllm.serve.commands import build_spec
from tabp_vllm.serve.deploy import (ENGINE_IN_REPLICA_ENV, SHARED_GPU_ENV, STREAM_BATCHING_ENV,
                                    TABP_SERVER_CLS, UNIPROC_ENV)
from tabp_vllm.synth import ARCHS

CARD = 80 * GiB
MAX_LEN = 2048


def server_cls(config):
    """The dotted path of an LLMConfig's server class (it resolves the path it is given)."""
    cls = config.server_cls
    return None if cls is None else f"{cls.__module__}.{cls.__qualname__}"


@pytest.fixture()
def llama8b(tmp_path):
    """A Llama-3.1-8B checkpoint directory with its published config and no weights, plus
    hand-made k=4 and k=8 masks (the last blocks removed)."""
    model = tmp_path / "llama-3.1-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**ARCHS["llama-3.1-8b"], "torch_dtype": "bfloat16"}))
    masks = []
    for k in (4, 8):
        masks.append(make_mask(str(model), list(range(31 - k, 31)), task=f"k{k}",
                               model_id="llama-3.1-8b").save(tmp_path / f"k{k}.json"))
    return str(model), masks


def test_eager_is_the_cpu_default_graphs_the_gpu_one(llama8b):
    model, _ = llama8b
    gpu = engine_args_for(model, gpu=True)
    assert gpu["enforce_eager"] is False and gpu["dtype"] == "auto"
    assert "kv_cache_memory_bytes" not in gpu        # vLLM sizes it from gpu_memory_utilization
    cpu = engine_args_for(model, gpu=False, dtype="float32")
    assert cpu["enforce_eager"] is True and cpu["kv_cache_memory_bytes"] == GiB
    assert engine_args_for(model, gpu=True, enforce_eager=True)["enforce_eager"] is True
    assert engine_args_for(model, gpu=True, tensor_parallel_size=2)["tensor_parallel_size"] == 2
    assert "tensor_parallel_size" not in gpu


def test_offline_engine_in_process_on_cpu_only(llama8b, monkeypatch):
    from tabp_vllm.engine import IN_PROCESS_ENV, offline_engine

    model, _ = llama8b
    monkeypatch.delenv(IN_PROCESS_ENV, raising=False)
    cpu = engine_args_for(model, gpu=False, dtype="float32")
    with offline_engine(cpu, gpu=False) as args:
        assert args["distributed_executor_backend"] == "uni" and os.environ[IN_PROCESS_ENV] == "0"
    assert IN_PROCESS_ENV not in os.environ  # only while the engine is built
    # a GPU, tensor parallelism: vLLM's own processes
    for args, gpu in ((engine_args_for(model, gpu=True), True),
                      (engine_args_for(model, gpu=False, tensor_parallel_size=2), False)):
        with offline_engine(args, gpu=gpu):
            assert "distributed_executor_backend" not in args and IN_PROCESS_ENV not in os.environ
    # the user's choice stands: an engine-core process, and their executor
    monkeypatch.setenv(IN_PROCESS_ENV, "1")
    cpu = engine_args_for(model, gpu=False, extra={"distributed_executor_backend": "mp"})
    with offline_engine(cpu, gpu=False):
        assert os.environ[IN_PROCESS_ENV] == "1" and cpu["distributed_executor_backend"] == "mp"
    assert os.environ[IN_PROCESS_ENV] == "1"


def test_three_variants_share_an_80_gib_card(llama8b):
    from tabp_vllm.serve.deploy import llm_configs

    model, masks = llama8b
    spec = build_spec(model=model, task_mask=masks, max_model_len=MAX_LEN)
    configs = llm_configs(spec, gpu=True, gpu_bytes=CARD)
    assert [c.model_id for c in configs] == ["llama-3.1-8b", "llama-3.1-8b-k4", "llama-3.1-8b-k8"]
    util = {c.model_id: c.engine_kwargs["gpu_memory_utilization"] for c in configs}
    assert sum(util.values()) <= GPU_USABLE_FRACTION
    assert sum(util.values()) > GPU_USABLE_FRACTION - 0.001      # nothing left unused
    kept = {"llama-3.1-8b": 32, "llama-3.1-8b-k4": 28, "llama-3.1-8b-k8": 24}
    tokens = {}
    for name, f in util.items():
        w = weight_bytes(ARCHS["llama-3.1-8b"], kept[name], 2)
        kv = f * CARD - w - GPU_ENGINE_OVERHEAD_GIB * GiB
        tokens[name] = kv / kv_bytes_per_token(ARCHS["llama-3.1-8b"], kept[name], 2)
        assert tokens[name] >= MAX_LEN                           # one full sequence at least
    # the rest is split so that every variant caches the same number of tokens
    assert max(tokens.values()) / min(tokens.values()) == pytest.approx(1, abs=1e-3)
    assert util["llama-3.1-8b"] > util["llama-3.1-8b-k4"] > util["llama-3.1-8b-k8"]
    # by hand: weights 14.96 / 13.33 / 11.71 GiB, + 2 GiB each; 72 - 46.0 = 26 GiB of KV at
    # 128 + 112 + 96 KiB a token = 81,139 tokens each: 9.90 / 8.67 / 7.43 GiB
    assert util == {"llama-3.1-8b": pytest.approx(26.86 / 80, abs=2e-4),
                    "llama-3.1-8b-k4": pytest.approx(24.00 / 80, abs=2e-4),
                    "llama-3.1-8b-k8": pytest.approx(21.14 / 80, abs=2e-4)}
    for c in configs:
        f = c.engine_kwargs["gpu_memory_utilization"]
        assert c.engine_kwargs["enforce_eager"] is False
        # Ray packs the three onto one GPU: each asks for its fraction of it
        assert c.placement_group_config == {"bundles": [{"GPU": f, "CPU": 1}]}
        # ... and they start one at a time under the engine-start lock (serve/app.py)
        assert server_cls(c) == TABP_SERVER_CLS
        assert c.runtime_env["env_vars"][SHARED_GPU_ENV] == "1"
        assert UNIPROC_ENV not in c.runtime_env["env_vars"]


def test_only_engines_that_share_a_card_take_the_start_lock(llama8b, tmp_path):
    """A single engine on its card, or engines on separate cards, start as Ray Serve LLM starts
    them; CPU engines (KV cache sized by --kv-cache-gib, nothing profiled) only get the
    uni-process executor. Every variant streams leading-edge unless told `ray`."""
    from tabp_vllm.serve.deploy import llm_configs

    model, masks = llama8b
    for spec in (build_spec(model=model), build_spec(model=model, task_mask=masks,
                                                     engine_arg=["gpu_memory_utilization=0.3"])):
        for c in llm_configs(spec, gpu=True, gpu_bytes=CARD):
            env = c.runtime_env["env_vars"]
            assert server_cls(c) == TABP_SERVER_CLS and SHARED_GPU_ENV not in env
            assert env[STREAM_BATCHING_ENV] == "leading-edge"
    for c in llm_configs(build_spec(model=model, task_mask=masks, kv_cache_gib=0.25), gpu=False):
        env = c.runtime_env["env_vars"]
        assert server_cls(c) == TABP_SERVER_CLS and env[UNIPROC_ENV] == "1"
        assert SHARED_GPU_ENV not in env and ENGINE_IN_REPLICA_ENV not in env
    for c in llm_configs(build_spec(model=model, kv_cache_gib=0.25, cpu_engine_in_replica=True),
                         gpu=False):  # serve --engine-in-replica
        assert c.runtime_env["env_vars"][ENGINE_IN_REPLICA_ENV] == "1"
    conf = tmp_path / "serve.yaml"
    conf.write_text("engine:\n  cpu_uniproc: false\nrequest_path:\n  stream_batching: ray\n")
    for c in llm_configs(build_spec(model=model, config=conf, kv_cache_gib=0.25), gpu=False):
        env = c.runtime_env["env_vars"]
        assert UNIPROC_ENV not in env and env[STREAM_BATCHING_ENV] == "ray"


def test_tensor_parallel_passes_through_and_halves_each_rank(llama8b):
    from tabp_vllm.serve.deploy import gpu_fractions, llm_configs

    model, masks = llama8b
    one = gpu_fractions(build_spec(model=model, task_mask=masks), CARD)
    spec = build_spec(model=model, task_mask=masks, tensor_parallel_size=2)
    two = gpu_fractions(spec, CARD)
    assert sum(two.values()) <= GPU_USABLE_FRACTION and two != one
    for c in llm_configs(spec, gpu=True, gpu_bytes=CARD):
        assert c.engine_kwargs["tensor_parallel_size"] == 2
        f = c.engine_kwargs["gpu_memory_utilization"]
        assert c.placement_group_config["bundles"] == [{"GPU": f, "CPU": 1}] * 2


def test_user_sizing_and_a_single_engine_keep_vllms_default(llama8b):
    from tabp_vllm.serve.deploy import gpu_fractions

    model, masks = llama8b
    assert gpu_fractions(build_spec(model=model), CARD) is None
    assert gpu_fractions(build_spec(model=model, task_mask=masks,
                                    engine_arg=["gpu_memory_utilization=0.3"]), CARD) is None
    assert gpu_fractions(build_spec(model=model, task_mask=masks, kv_cache_gib=4), CARD) is None
    # replicas count as engines
    assert len(gpu_fractions(build_spec(model=model, replicas=2), CARD)) == 1


def test_too_many_variants_for_the_card_is_one_line(llama8b, tmp_path):
    from tabp_vllm.serve.deploy import gpu_fractions

    model, masks = llama8b
    with pytest.raises(TabpError) as exc:
        gpu_fractions(build_spec(model=model, task_mask=masks, replicas=2), 40 * GiB)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("6 engines need ") and "GPU offers 36.0 GiB" in msg


def test_gpu_memory_share_leaves_the_rest_of_the_card_free(llama8b):
    """`--gpu-memory-share 0.6`: the variants split 0.6 of the card (e.g. a bare vLLM server
    beside them for a comparison), each still caching the same number of tokens; one engine
    gets the share itself; a share outside (0, 1] is one error line."""
    from tabp_vllm.serve.deploy import gpu_fractions, llm_configs

    model, masks = llama8b
    full = gpu_fractions(build_spec(model=model, task_mask=masks, max_model_len=MAX_LEN), CARD)
    spec = build_spec(model=model, task_mask=masks, max_model_len=MAX_LEN, gpu_memory_share=0.6)
    part = {c.model_id: c.engine_kwargs["gpu_memory_utilization"]
            for c in llm_configs(spec, gpu=True, gpu_bytes=CARD)}
    assert 0.599 < sum(part.values()) <= 0.6
    assert all(part[name] < full[name] for name in full)
    # same weights and overhead, less KV cache: the 0.3 x 80 GiB given up comes out of the KV
    assert sum(full.values()) - sum(part.values()) == pytest.approx(0.3, abs=1e-3)
    assert gpu_fractions(build_spec(model=model, gpu_memory_share=0.5), CARD) == {"llama-3.1-8b": 0.5}
    with pytest.raises(TabpError) as exc:
        gpu_fractions(build_spec(model=model, task_mask=masks, gpu_memory_share=0.3), CARD)
    assert "(0.3 x 80.0)" in str(exc.value) and "\n" not in str(exc.value)
    for bad in (0, 1.5):
        with pytest.raises(TabpError) as exc:
            build_spec(model=model, gpu_memory_share=bad)
        assert "gpu_memory_share" in str(exc.value) and "\n" not in str(exc.value)
