"""The soak's load and bookkeeping (tabp_vllm.loadtest.soak) against a fake OpenAI app (no Ray, no
engine; seconds)."""

from __future__ import annotations

import asyncio
import json

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tabp_vllm.loadtest import soak

def _fake_app(broken_stream=False):
    app = FastAPI()

    def err(status):
        return JSONResponse(status_code=status, content={"error": {
            "message": "x", "type": "invalid_request_error", "param": None, "code": status}})

    async def handle(request: Request):
        try:
            body = json.loads(await request.body())
        except ValueError:
            return err(400)
        if body.get("model") not in soak.VARIANTS or body.get("max_tokens", 1) < 1:
            return err(404 if body.get("model") else 400)
        if "messages" in body and not isinstance(body["messages"], list):
            return err(400)
        if body.get("stream"):
            async def events():
                for i in range(3):
                    yield f'data: {{"choices": [{{"text": "{i}"}}]}}\n\n'
                if not broken_stream:
                    yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"choices": [{"text": "hi"}], "usage": {"completion_tokens": 3}}

    app.post("/v1/completions")(handle)
    app.post("/v1/chat/completions")(handle)
    return app


def test_load_counts_every_kind_of_request():
    load = soak.Load("http://fake", seed=1, disconnect_share=0.3, malformed_every=5,
                     transport=httpx.ASGITransport(app=_fake_app()))
    asyncio.run(load.run(clients=3, seconds=1.5))
    c = load.counts
    assert c["errors"] == 0, load.errors
    assert c["ok"] and c["stream_ok"] and c["hung_up"] and c["malformed_ok"]
    assert all(load.per_variant.values())


def test_a_stream_without_done_is_an_error():
    load = soak.Load("http://fake", seed=2, disconnect_share=0.0, malformed_every=0,
                     transport=httpx.ASGITransport(app=_fake_app(broken_stream=True)))
    asyncio.run(load.run(clients=1, seconds=0.5))
    assert load.counts["stream_ok"] == 0 and load.counts["errors"] > 0
    assert "without [DONE]" in load.errors[0]


def test_rss_growth_after_warmup_only():
    grow = [(t, 1000.0 if t < 60 else 200.0 + t) for t in range(0, 300, 10)]
    flat = [(t, 500.0) for t in range(0, 300, 10)]
    tiny = [(t, 10.0 + t) for t in range(0, 300, 10)]
    rep = soak.rss_report({"a[1]": grow, "b[2]": flat, "c[3]": tiny}, warmup_s=60)
    assert rep["b[2]"]["growth"] == 0 and rep["b[2]"]["checked"]
    assert rep["a[1]"]["growth"] > 0.05 and rep["a[1]"]["warm_mib"] == 270.0
    assert not rep["c[3]"]["checked"]  # under RSS_FLOOR_MIB: reported, not judged
