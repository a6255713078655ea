"""Every error the server returns is an OpenAI error object, whatever layer raised it.

    {"error": {"message": str, "type": str, "param": str | null, "code": int}}

`code` is the HTTP status (as Ray Serve LLM and vLLM already send it), `type` follows from the
status (`invalid_request_error`, `invalid_api_key`, `rate_limit_error`, `server_error`), `param`
names the offending request field where one is known. No exception text, class name or stack of
ours, Ray's or vLLM's reaches a client on a 5xx: the message is fixed and the exception goes to
the server log with the request id the client also gets.

Layers and where each is caught, innermost first:
- FastAPI request validation (missing `model`, malformed JSON, wrong types): `RequestValidationError`
  handler; Starlette's own `HTTPException` (unknown route 404, wrong method 405, Ray's 400 for a
  missing `model`): handler; Ray Serve LLM / vLLM errors (`OpenAIHTTPException`, carrying vLLM's
  `ErrorResponse`, e.g. an over-long prompt): handler;
- anything else escaping a route before the response started (a dead replica's `RayActorError`,
  Ray Serve back-pressure, a bug): `OpenAIErrorMiddleware`, innermost middleware, so Ray's own
  exception middleware (which pastes `str(exc)` into the message) never sees it;
- a routed-model request that cannot be routed (`serve/routed.py`): 400 / 503 with our message;
- a request for a variant that is still starting (`serve/readiness.py`): 503 with our message and
  a Retry-After header;
- after a stream started, headers are gone: `guard_stream` ends the stream with one SSE error event
  and `[DONE]`, which the OpenAI clients raise as `APIError`.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, AsyncIterator, Optional

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.responses import JSONResponse

logger = logging.getLogger("tabp_vllm.serve")

UNAVAILABLE = ("The model is temporarily unavailable (its replica is restarting or overloaded); "
               "retry in a few seconds")


def error_type(status: int) -> str:
    if status == 401:
        return "invalid_api_key"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(status: int, message: str, param: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param,
                      "code": status}}


def error_response(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param))


def _request_id(scope_or_request) -> str:
    state = getattr(scope_or_request, "state", None)
    rid = getattr(state, "request_id", None) if state is not None else None
    if rid is None and isinstance(scope_or_request, dict):
        rid = (scope_or_request.get("state") or {}).get("request_id")
    return str(rid or "-")


_CLASS_PREFIX = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception): ")
_PARAM = re.compile(r"\(parameter=([\w.]+)")


def client_message(message: str) -> tuple[str, Optional[str]]:
    """A 4xx message as the client sees it: vLLM's text without the exception's class path that
    Ray Serve LLM prefixes (`vllm.exceptions.VLLMValidationError: ...`), and the parameter vLLM
    names in it (`(parameter=max_tokens, ...)`) as `param`."""
    message = _CLASS_PREFIX.sub("", message.strip().splitlines()[0] if message.strip() else "")
    m = _PARAM.search(message)
    return message or "Request failed", m.group(1) if m else None


def vllm_client_errors() -> tuple[type[Exception], ...]:
    """vLLM's exceptions for a bad request: `VLLMClientError` (vLLM 0.32, its base class of them
    all), or the classes themselves where vLLM has no base class yet (0.26, the GPU image's)."""
    import vllm.exceptions as vllm_exceptions

    if hasattr(vllm_exceptions, "VLLMClientError"):
        return (vllm_exceptions.VLLMClientError,)
    names = ("VLLMValidationError", "VLLMNotFoundError", "VLLMUnprocessableEntityError")
    return tuple(getattr(vllm_exceptions, n) for n in names if hasattr(vllm_exceptions, n))


def describe_exception(exc: BaseException, request_id: str = "-") -> tuple[int, str, Optional[str]]:
    """(status, client-safe message, param) for an exception no handler knew; logs it in full.
    vLLM's request errors are the client's fault (400, their text); an unavailable replica is
    503; anything else is 500 with a fixed text."""
    from ray.exceptions import RayActorError, TaskCancelledError
    from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError,
                                      ReplicaUnavailableError)

    param = None
    if isinstance(exc, vllm_client_errors()):
        status = 400
        message, param = client_message(str(exc))
    elif isinstance(exc, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError,
                          BackPressureError, TaskCancelledError)):
        status, message = 503, f"{UNAVAILABLE} (request id {request_id})"
    else:
        status, message = 500, f"Internal server error (request id {request_id})"
    logger.warning("request %s failed with %d: %r", request_id, status, exc)
    return status, message, param


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors() or [{"msg": "invalid request", "loc": ("body",)}]
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return error_response(400, "The request body is not valid JSON")
    param = ".".join(loc) or None
    # pydantic's message, never its `input` (the user's whole body) nor its internal type name
    msg = str(first.get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    where = f"'{param}': " if param else ""
    return error_response(400, f"Invalid request: {where}{msg}{more}", param)


async def _on_validation(request, exc: RequestValidationError) -> JSONResponse:
    return _validation_response(exc)


async def _on_http(request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else "Request failed"
    if exc.status_code >= 500:
        detail = describe_exception(exc, _request_id(request))[1]
    resp = error_response(exc.status_code, detail, None)
    if exc.headers:
        resp.headers.update(exc.headers)  # e.g. 405's Allow
    return resp


async def _on_routing(request, exc) -> JSONResponse:
    """A routed-model request that cannot be routed: 400 (nothing to route by) or 503 (the
    encoder failed or is not loaded); our own text, which names the cause."""
    from tabp_vllm.serve.routed import RoutingUnavailable

    status = 503 if isinstance(exc, RoutingUnavailable) else 400
    logger.warning("routing failed (%d): %s", status, exc)
    return error_response(status, str(exc), "model" if status == 503 else None)


async def _on_openai(request, exc) -> JSONResponse:
    """Ray Serve LLM's `OpenAIHTTPException` (its own errors and vLLM's `ErrorResponse`s)."""
    status = int(getattr(exc, "status_code", 500) or 500)
    if status >= 500:
        return error_response(*describe_exception(exc, _request_id(request)))
    message, param = client_message(str(getattr(exc, "message", "") or ""))
    return error_response(status, message, getattr(exc, "param", None) or param)


async def _on_not_ready(request, exc) -> JSONResponse:
    """A request for a variant with no running replica yet (`serve/readiness.py`): 503 at once,
    our own text naming the variant and its state."""
    from tabp_vllm.serve.readiness import RETRY_AFTER_S

    resp = error_response(503, str(exc), "model")
    resp.headers["Retry-After"] = str(RETRY_AFTER_S)
    return resp


class OpenAIErrorMiddleware:
    """Innermost middleware: an exception escaping a route before its response started becomes
    a clean OpenAI error (503 for an unavailable replica, else 500), never its text."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def _send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception as exc:  # noqa: BLE001 - the last line before the client
            if started:
                raise
            await error_response(*describe_exception(exc, _request_id(scope)))(scope, receive, send)


def install_openai_errors(app) -> None:
    """Handlers on the ingress FastAPI app (overriding Ray Serve LLM's and FastAPI's defaults)
    plus the innermost middleware; call before the app serves its first request."""
    from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException

    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(OpenAIHTTPException, _on_openai)
    from tabp_vllm.serve.routed import NotRoutable, RoutingUnavailable

    app.add_exception_handler(RoutingUnavailable, _on_routing)
    app.add_exception_handler(NotRoutable, _on_routing)
    from tabp_vllm.serve.readiness import VariantNotReady

    app.add_exception_handler(VariantNotReady, _on_not_ready)
    # add_middleware() puts a middleware outermost; this one must sit inside Ray's exception
    # middleware, right around the routes.
    app.user_middleware.append(Middleware(OpenAIErrorMiddleware))


async def guard_stream(chunks: AsyncIterator[Any], request_id: str = "-") -> AsyncIterator[Any]:
    """A started SSE stream that fails (its replica died) ends with an OpenAI error event and
    `[DONE]` instead of a cut connection. A cancelled stream (client gone) stays cancelled."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as exc:  # noqa: BLE001 - CancelledError is a BaseException, not caught
        yield f"data: {json.dumps(error_body(*describe_exception(exc, request_id)))}\n\n"
        yield "data: [DONE]\n\n"
