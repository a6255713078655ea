"""Which variants can answer now, as the ingress sees it: from Ray Serve's own status.

Ray Serve starts the ingress first, so `/v1/models` lists every variant while their engines still
load (minutes on a CPU), and a request sent then would wait in Ray's queue with no word why. The
ingress asks Ray Serve (`serve.status()`, the controller's view) how many replicas of each
variant run:
- `GET /health` answers 503 until every variant has a running replica, then 200; the body names
  each variant's state (`ready`, `starting`, `failed`) and its replicas running / wanted;
  `GET /health/<variant>` answers for one variant (or a routed name: all its variants);
- a completion or chat request to a variant with no running replica gets an OpenAI-shaped 503
  at once (`VariantNotReady`, `serve/errors.py`), naming its state, instead of waiting.
Once a variant has been seen ready, requests to it are no longer checked (no status call on the
request path after startup); a replica that dies later is Ray Serve's to restart, as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterable, Mapping, Optional

logger = logging.getLogger("tabp_vllm.serve")

READY, STARTING, FAILED = "ready", "starting", "failed"
RETRY_AFTER_S = 5  # what a 503 for a starting variant suggests (Retry-After)


class VariantNotReady(Exception):
    """A request for a variant that has no running replica yet: 503 with this message."""


def deployment_key(model_id: str) -> str:
    # Ray Serve LLM names a variant's deployment "LLMServer:<model_id>", '/' and '.' replaced.
    return model_id.replace("/", "--").replace(".", "_")


def variant_states(app: Any, replicas: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """Each variant's state from Ray Serve's status of the app (`serve.status().applications[...]`,
    None before the app exists): `ready` with at least one replica running, `failed` when its
    deployment failed, else `starting`. `replicas`: how many each variant asks for."""
    deployments = {} if app is None else app.deployments
    out: dict[str, dict[str, Any]] = {}
    for name, wanted in replicas.items():
        dep = deployments.get(f"LLMServer:{deployment_key(name)}")
        running = dep.replica_states.get("RUNNING", 0) if dep is not None else 0
        state = (READY if running else
                 FAILED if dep is not None and dep.status == "DEPLOY_FAILED" else STARTING)
        out[name] = {"state": state, "replicas_running": running, "replicas": wanted}
        if state == FAILED and dep.message:
            out[name]["message"] = dep.message.strip().splitlines()[0]
    return out


def overall(states: Iterable[Mapping[str, Any]]) -> str:
    """One state for several variants: ready if all are, failed if any failed, else starting."""
    seen = {s["state"] for s in states}
    return READY if seen <= {READY} else FAILED if FAILED in seen else STARTING


def health(states: Mapping[str, Mapping[str, Any]]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of `GET /health` for these variants: 200 when all are ready, else 503."""
    state = overall(states.values())
    return (200 if state == READY else 503), {"status": state, "variants": dict(states)}


def not_ready_message(name: str, state: Mapping[str, Any]) -> str:
    """What a client asking for a variant that cannot answer yet is told."""
    where = f"{state['replicas_running']}/{state['replicas']} replicas running"
    if state["state"] == FAILED:
        why = f": {state['message']}" if state.get("message") else ""
        return f"The model '{name}' failed to start ({where}){why}. See the server's log."
    return (f"The model '{name}' is still starting ({where}); retry in a few seconds "
            f"(GET /health answers 200 once every model can answer).")


def app_status() -> Any:
    """Ray Serve's status of our app (None before it exists); blocks on the controller."""
    from ray import serve

    from tabp_vllm.serve.deploy import APP_NAME

    return serve.status().applications.get(APP_NAME)


class Readiness:
    """The variants' states for one ingress replica: fetched from Ray Serve (`fetch`, off the
    event loop) at most every `min_interval_s`, concurrent askers sharing one fetch."""

    def __init__(self, replicas: Mapping[str, int], fetch: Callable[[], Any] = app_status,
                 min_interval_s: float = 0.5, clock: Callable[[], float] = time.monotonic):
        self._replicas = dict(replicas)
        self._fetch, self._min_interval_s, self._clock = fetch, min_interval_s, clock
        self._states: Optional[dict[str, dict[str, Any]]] = None
        self._at = 0.0
        self._seen_ready: set[str] = set()
        self._lock = asyncio.Lock()

    async def states(self) -> dict[str, dict[str, Any]]:
        async with self._lock:
            if self._states is None or self._clock() - self._at >= self._min_interval_s:
                app = await asyncio.to_thread(self._fetch)
                self._states, self._at = variant_states(app, self._replicas), self._clock()
                self._seen_ready |= {n for n, s in self._states.items() if s["state"] == READY}
            return self._states

    async def check(self, name: str) -> None:
        """Raise `VariantNotReady` when variant `name` has no running replica; return at once for
        one seen ready before, or a name that is not a variant here (the ingress answers it)."""
        if name in self._seen_ready or name not in self._replicas:
            return
        try:
            state = (await self.states())[name]
        except Exception as exc:  # noqa: BLE001 - no status: let the request through, as before
            logger.warning("readiness of %s unknown (%r): request passed on", name, exc)
            return
        if state["state"] != READY:
            raise VariantNotReady(not_ready_message(name, state))
