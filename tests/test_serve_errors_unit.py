"""Every error path of the ingress app, without Ray: each answer is an OpenAI error object with
the right status, and no exception text, class name or stack of ours reaches the client."""

from __future__ import annotations

import json

import pytest
from fastapi import Request
from fastapi.testclient import TestClient
# module level: FastAPI resolves the route's (string) annotations in the module's globals
from ray.llm._internal.serve.core.configs.openai_api_models import CompletionRequest

from tabp_vllm.serve.app import TabpIngress, ingress_app

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODELS = ["llama", "llama-arc", "llama-gsm8k"]
SECRET = "/home/secret/path.py line 42 RuntimeError internals"


def _ingress() -> TabpIngress:
    ing = object.__new__(TabpIngress)  # no Ray: only the parts the routes below use
    ing._model_cards = {m: None for m in MODELS}  # noqa: SLF001
    return ing


@pytest.fixture(scope="module")
def client():
    from ray.exceptions import RayActorError
    from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException
    from ray.serve.exceptions import BackPressureError
    from starlette.responses import StreamingResponse

    from tabp_vllm.serve.errors import guard_stream

    app, ing = ingress_app(KEY), _ingress()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        await ing._get_model_id(body.model)  # noqa: SLF001 - our 400 / 404 for `model`
        prompt = body.prompt if isinstance(body.prompt, str) else ""
        if prompt == "too long":  # what vLLM's ErrorResponse becomes in Ray Serve LLM
            raise OpenAIHTTPException(400, "This model's maximum context length is 512 tokens "
                                      "(parameter=input_tokens, value=513)",
                                      type="BadRequestError", internal_message=SECRET)
        if prompt == "negative":
            raise OpenAIHTTPException(400, "vllm.exceptions.VLLMValidationError: max_tokens must "
                                      "be at least 1, got -1. (parameter=max_tokens, value=-1)",
                                      type="BadRequestError", internal_message=SECRET)
        if prompt == "vllm 500":
            raise OpenAIHTTPException(500, SECRET, type="EngineDeadError", internal_message=SECRET)
        if prompt == "replica died":
            raise RayActorError()
        if prompt == "busy":
            raise BackPressureError(num_queued_requests=9, max_queued_requests=8)
        if prompt == "bug":
            raise RuntimeError(SECRET)
        if prompt == "stream dies":
            async def chunks():
                yield 'data: {"choices": [{"text": "a"}]}\n\n'
                raise RayActorError()
            return StreamingResponse(guard_stream(chunks(), "rid-1"), media_type="text/event-stream")
        return {"ok": True}

    @app.get("/v1/models/{model}")
    async def model_data(model: str):
        raise ing._not_found(model)  # noqa: SLF001

    return TestClient(app, raise_server_exceptions=False)


def _post(client, body, headers=AUTH, raw=False):
    content = body if raw else json.dumps(body).encode()
    return client.post("/v1/completions", content=content,
                       headers={**headers, "Content-Type": "application/json"})


# (name, request, status, fragment of the message, param)
CASES = [
    ("no api key", lambda c: _post(c, {"model": "llama", "prompt": "x"}, headers={}), 401,
     "API key", None),
    ("wrong api key", lambda c: _post(c, {"model": "llama", "prompt": "x"},
                                      headers={"Authorization": "Bearer nope"}), 401, "API key", None),
    ("unknown model", lambda c: _post(c, {"model": "llama-nope", "prompt": "x"}), 404,
     "'llama-nope' does not exist. Valid models: llama, llama-arc, llama-gsm8k", "model"),
    ("unknown model card", lambda c: c.get("/v1/models/llama-nope", headers=AUTH), 404,
     "'llama-nope' does not exist", "model"),
    ("missing model", lambda c: _post(c, {"prompt": "x"}), 400, "'model' field is required", "model"),
    ("malformed json", lambda c: _post(c, b"{not json", raw=True), 400, "not valid JSON", None),
    ("body not an object", lambda c: _post(c, b"[1, 2]", raw=True), 400, "Invalid request", None),
    ("wrong type", lambda c: _post(c, {"model": "llama", "prompt": "x", "max_tokens": "many"}),
     400, "'max_tokens'", "max_tokens"),
    ("missing prompt", lambda c: _post(c, {"model": "llama"}), 400,
     "Either prompt or prompt_embeds must be provided", "prompt"),
    ("over-long prompt (vLLM)", lambda c: _post(c, {"model": "llama", "prompt": "too long"}), 400,
     "maximum context length", "input_tokens"),
    ("max_tokens=-1 (vLLM)", lambda c: _post(c, {"model": "llama", "prompt": "negative"}), 400,
     "max_tokens must be at least 1", "max_tokens"),
    ("engine 500 (vLLM)", lambda c: _post(c, {"model": "llama", "prompt": "vllm 500"}), 500,
     "Internal server error", None),
    ("replica died (Ray)", lambda c: _post(c, {"model": "llama", "prompt": "replica died"}), 503,
     "temporarily unavailable", None),
    ("back-pressure (Ray Serve)", lambda c: _post(c, {"model": "llama", "prompt": "busy"}), 503,
     "temporarily unavailable", None),
    ("a bug of ours", lambda c: _post(c, {"model": "llama", "prompt": "bug"}), 500,
     "Internal server error", None),
    ("unknown route", lambda c: c.post("/v1/nothing", headers=AUTH), 404, "Not Found", None),
    ("wrong method", lambda c: c.get("/v1/completions", headers=AUTH), 405, "Method Not Allowed",
     None),
]


@pytest.mark.parametrize("name,call,status,fragment,param", CASES, ids=[c[0] for c in CASES])
def test_error_is_openai_shaped(client, name, call, status, fragment, param):
    r = call(client)
    assert r.status_code == status, (name, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == status and err["param"] == param
    assert err["type"] == {401: "invalid_api_key", 500: "server_error",
                           503: "server_error"}.get(status, "invalid_request_error")
    assert fragment in err["message"], err["message"]
    for leak in ("secret", "Traceback", "Internal exception", "RayActorError", "original exception",
                 "RuntimeError", "'input'", "vllm.exceptions", "ValidationError"):
        assert leak not in err["message"], (leak, err["message"])


def test_validation_error_does_not_echo_the_body(client):
    r = _post(client, {"model": "llama", "prompt": "x", "max_tokens": "a-secret-value"})
    assert r.status_code == 400 and "a-secret-value" not in r.text


def test_allow_header_kept_on_405(client):
    assert "POST" in client.get("/v1/completions", headers=AUTH).headers.get("allow", "")


def test_stream_that_dies_ends_with_an_error_event(client):
    r = _post(client, {"model": "llama", "prompt": "stream dies", "stream": True})
    assert r.status_code == 200
    events = [ln[len("data: "):] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert events[0].startswith('{"choices"') and events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == 503 and "temporarily unavailable" in err["message"]
    assert "rid-1" in err["message"] and "RayActorError" not in err["message"]


def test_vllm_request_errors_are_the_clients_400():
    """vLLM's own request errors (raised in the engine, not wrapped by Ray Serve LLM) are 400 with
    vLLM's text and parameter; anything else is a 500 that hides its text."""
    from vllm.exceptions import VLLMNotFoundError, VLLMValidationError

    from tabp_vllm.serve.errors import describe_exception

    bad = VLLMValidationError("max_tokens must be at least 1, got -1.", parameter="max_tokens",
                              value=-1)
    status, message, param = describe_exception(bad, "rid-2")
    assert status == 400 and "max_tokens must be at least 1" in message and param == "max_tokens"
    assert describe_exception(VLLMNotFoundError("no adapter x"), "rid-3")[0] == 400
    status, message, _ = describe_exception(RuntimeError(SECRET), "rid-4")
    assert status == 500 and SECRET not in message and "rid-4" in message
