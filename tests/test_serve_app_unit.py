"""The serve app's API-key middleware and wiring, without starting Ray (fast)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tabp_vllm.serve.app import ApiKeyMiddleware, ingress_app

KEY = "s3cret-key"


def _client(api_key):
    app = ingress_app(api_key)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": []}

    @app.post("/v1/completions")
    async def completions():
        return {"ok": True}

    return TestClient(app)


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
    {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": ""},
])
def test_every_route_needs_the_key(headers):
    client = _client(KEY)
    for method, path in (("get", "/v1/models"), ("post", "/v1/completions"), ("get", "/docs"),
                         ("get", "/v1/models/llama")):
        r = getattr(client, method)(path, headers=headers)
        assert r.status_code == 401, (path, headers)
        err = r.json()["error"]
        assert err["type"] == "invalid_api_key" and err["code"] == 401 and "Bearer" in err["message"]


def test_the_key_opens_every_route():
    client = _client(KEY)
    for scheme in ("Bearer", "bearer"):
        ok = {"Authorization": f"{scheme} {KEY}"}
        assert client.get("/v1/models", headers=ok).status_code == 200
        assert client.post("/v1/completions", headers=ok).json() == {"ok": True}
    # a CORS preflight carries no credentials; Ray's CORS middleware answers it
    pre = client.options("/v1/completions", headers={"Origin": "http://x",
                                                      "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 200


def test_no_key_no_check():
    client = _client(None)
    assert client.get("/v1/models").status_code == 200
    assert not any(m.cls is ApiKeyMiddleware for m in ingress_app(None).user_middleware)
    with pytest.raises(ValueError):
        ApiKeyMiddleware(None, "")


@pytest.fixture()
def local_ray():
    """Building the app starts a local Ray instance in this process (Ray Serve LLM's deployment
    builder auto-inits Ray): start it small here and shut it down after, so no Ray driver stays
    in the pytest process. (A driver left behind dies with exit code 1, silently, when another
    test's `ray stop` or cluster teardown takes its raylet away.)"""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
    assert not ray.is_initialized()


def test_build_app_wires_ingress_and_variants(write_mask, local_ray):
    """The application graph: one ingress with our middleware's key, one LLM deployment per variant."""
    from tabp_vllm.serve.app import build_app
    from tabp_vllm.serve.commands import build_spec

    spec = build_spec(task_mask=[write_mask([26, 27, 28, 29], task="k4")], max_model_len=256,
                      kv_cache_gib=0.25, api_key=KEY)
    app = build_app(spec)
    ingress = app._bound_deployment  # noqa: SLF001 - the graph has no public accessor
    kwargs = ingress.init_kwargs
    assert sorted(kwargs["llm_deployments"]) == sorted(kwargs["model_cards"]) == ["llama", "llama-k4"]
    assert kwargs["variant_metadata"]["llama-k4"]["blocks_kept"] == 26
    assert "api_key" not in kwargs  # the key is the middleware's config, not module state


def test_a_local_checkpoint_skips_ray_serve_llms_node_download_task(write_mask, local_ray, tmp_path,
                                                                    monkeypatch):
    """Each variant's LLMConfig carries our callback: for a checkpoint in a local folder it turns
    off Ray Serve LLM's per-node download task (a Ray worker process per variant that would
    download nothing); a model Ray would have to fetch keeps the task."""
    import asyncio

    from ray.serve.llm import LLMConfig

    from tabp_vllm.serve.app import LocalCheckpointCallback
    from tabp_vllm.serve.commands import build_spec
    from tabp_vllm.serve.deploy import TABP_CALLBACK_CLS, llm_configs

    spec = build_spec(task_mask=[write_mask([26, 27, 28, 29], task="k4")], max_model_len=256,
                      kv_cache_gib=0.25)
    configs = llm_configs(spec, gpu=False)
    assert len(configs) == 2
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for cfg in configs:
        callback = cfg.get_or_create_callback()
        assert isinstance(callback, LocalCheckpointCallback) and callback.ctx.run_init_node
        asyncio.run(callback.run_callback("on_before_node_init"))
        assert callback.ctx.run_init_node is False
    assert (tmp_path / "torch-home" / "kernels").is_dir()  # what Ray's skipped task would make
    remote = LLMConfig(model_loading_config={"model_id": "x", "model_source": "org/not-local"},
                       accelerator_config={"kind": "cpu"},
                       placement_group_config={"bundles": [{"CPU": 1}]},
                       callback_config={"callback_class": TABP_CALLBACK_CLS})
    callback = remote.get_or_create_callback()
    asyncio.run(callback.run_callback("on_before_node_init"))
    assert callback.ctx.run_init_node is True
