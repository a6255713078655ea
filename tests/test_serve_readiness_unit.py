"""Readiness (serve/readiness.py) without Ray: variant states from Ray Serve's status, `/health`'s
answer, and the immediate OpenAI-shaped 503 for a variant still starting. A fake status stands in
for `serve.status()`; tests/test_serve.py asks the real server."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace as NS

import pytest
from fastapi.testclient import TestClient

from tabp_vllm.serve.readiness import (FAILED, READY, STARTING, Readiness, VariantNotReady,
                                       health, variant_states)

WANTED = {"llama": 1, "llama-k4": 2, "org/m.v2": 1}


def app_status(running: dict[str, int], failed: dict[str, str] | None = None):
    """A fake of `serve.status().applications[app]`: deployments named as Ray Serve LLM names
    them, with their RUNNING replica counts (and DEPLOY_FAILED ones with a message)."""
    deps = {"TabpIngress": NS(status="HEALTHY", replica_states={"RUNNING": 1}, message="")}
    for key, n in running.items():
        deps[f"LLMServer:{key}"] = NS(status="HEALTHY" if n else "UPDATING",
                                      replica_states={"RUNNING": n} if n else {"STARTING": 1},
                                      message="")
    for key, message in (failed or {}).items():
        deps[f"LLMServer:{key}"] = NS(status="DEPLOY_FAILED", replica_states={}, message=message)
    return NS(status="DEPLOYING", deployments=deps, message="")


def test_states_from_serve_status():
    # before the app exists every variant is starting
    assert {n: s["state"] for n, s in variant_states(None, WANTED).items()} == dict.fromkeys(WANTED, STARTING)
    # one replica running is enough to answer; names map to Ray's deployment keys ('/', '.')
    states = variant_states(app_status({"llama": 1, "llama-k4": 0, "org--m_v2": 1}), WANTED)
    assert states["llama"] == {"state": READY, "replicas_running": 1, "replicas": 1}
    assert states["llama-k4"] == {"state": STARTING, "replicas_running": 0, "replicas": 2}
    assert states["org/m.v2"]["state"] == READY
    failed = variant_states(app_status({"llama": 1}, failed={"llama-k4": "replica died\ntrace"}), WANTED)
    assert failed["llama-k4"] == {"state": FAILED, "replicas_running": 0, "replicas": 2,
                                  "message": "replica died"}


def test_health_is_503_until_every_variant_is_ready():
    code, body = health(variant_states(app_status({"llama": 1}), WANTED))
    assert code == 503 and body["status"] == STARTING
    assert body["variants"]["llama"]["state"] == READY
    code, body = health(variant_states(app_status({"llama": 1}, failed={"llama-k4": "x"}), WANTED))
    assert code == 503 and body["status"] == FAILED
    code, body = health(variant_states(app_status({"llama": 1, "llama-k4": 1, "org--m_v2": 1}), WANTED))
    assert code == 200 and body["status"] == READY
    assert body["variants"]["llama-k4"] == {"state": READY, "replicas_running": 1, "replicas": 2}


class FakeStatus:
    """`serve.status()` whose answer the test sets; counts the calls."""

    def __init__(self, running):
        self.running, self.calls = running, 0

    def __call__(self):
        self.calls += 1
        return app_status(self.running)


def test_check_fails_fast_then_passes_and_stops_asking():
    status = FakeStatus({"llama": 0})
    now = [0.0]
    r = Readiness({"llama": 1}, fetch=status, min_interval_s=0.5, clock=lambda: now[0])

    async def run():
        with pytest.raises(VariantNotReady, match=r"'llama' is still starting \(0/1 replicas"):
            await r.check("llama")
        with pytest.raises(VariantNotReady):
            await r.check("llama")           # within min_interval_s: the same answer, no new call
        assert status.calls == 1
        status.running = {"llama": 1}
        with pytest.raises(VariantNotReady):
            await r.check("llama")           # still cached
        now[0] = 0.6
        await r.check("llama")               # fresh: ready now
        calls = status.calls
        status.running = {"llama": 0}
        now[0] = 10.0
        await r.check("llama")               # seen ready: no status call on the request path
        await r.check("not-a-variant")       # the ingress answers unknown names (404)
        assert status.calls == calls
        # /health still asks, and tells the truth
        assert (await r.states())["llama"]["state"] == STARTING

    asyncio.run(run())


def test_concurrent_checks_share_one_fetch_and_a_broken_status_lets_requests_through():
    def slow():
        time.sleep(0.2)
        slow.calls += 1
        return app_status({"llama": 0})
    slow.calls = 0
    r = Readiness({"llama": 1}, fetch=slow)

    async def many():
        return await asyncio.gather(*(r.check("llama") for _ in range(5)), return_exceptions=True)

    results = asyncio.run(many())
    assert all(isinstance(e, VariantNotReady) for e in results) and slow.calls == 1

    def broken():
        raise ConnectionError("controller gone")
    asyncio.run(Readiness({"llama": 1}, fetch=broken).check("llama"))  # no exception: as before


def test_a_starting_variant_is_an_openai_503_within_a_second():
    """Through the ingress app's error handling (serve/errors.py): the status, the OpenAI error
    object naming the variant and its state, a Retry-After, at once."""
    from tabp_vllm.serve.app import ingress_app

    app = ingress_app(None)
    readiness = Readiness({"llama-k4": 2}, fetch=lambda: app_status({"llama-k4": 0}))

    @app.post("/v1/completions")
    async def completions():
        await readiness.check("llama-k4")
        return {"ok": True}

    t = time.monotonic()
    r = TestClient(app).post("/v1/completions", json={"model": "llama-k4", "prompt": "x"})
    assert time.monotonic() - t < 1.0
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    err = r.json()["error"]
    assert err["code"] == 503 and err["type"] == "server_error" and err["param"] == "model"
    assert err["message"].startswith("The model 'llama-k4' is still starting (0/2 replicas running)")
    assert "GET /health" in err["message"]
