"""The Ray Serve application: Ray Serve LLM's OpenAI ingress, one middleware, a thin subclass.

Assembled like `ray.serve.llm.build_openai_app` (one `LLMServer` deployment per variant, one
ingress routing by `model`), with two additions that function cannot take:
- the ingress FastAPI app (Ray Serve LLM's own: its error handling, CORS, HTTP metrics and request
  ids) gets one middleware, `ApiKeyMiddleware`: the Bearer API key on every route (401 otherwise);
  the key is the middleware's configuration, set here in the driver and shipped with the app;
- `TabpIngress` (an `OpenAiIngress`) adds an OpenAI-style 404 for an unknown `model` that names the
  valid ones, per-variant metadata (task, blocks kept/total, attention / MLP sublayers kept, KV
  bytes per token and KV cache tokens, mask hash, speedup) in `/v1/models`,
  the tabp gauges (the same numbers) through Ray's metrics export, and
  readiness (`serve/readiness.py`): `GET /health` and `GET /health/<model>` (503 until every
  variant, or that one, can answer), and an immediate 503 for a request to a variant still starting.
With `serve --router`, the ingress also lists a routed name (`<alias>-auto`) whose requests each
go to the variant of their input's cluster (`serve/routed.py`), with `x-tabp-variant` /
`x-tabp-cluster` response headers and the routing metrics (`serve/metrics.py`).
Every error, whatever layer raises it, leaves as an OpenAI error object (`serve/errors.py`); a
stream whose replica dies ends with an error event instead of a cut connection.
Routing, streaming, logprobs and the engines are Ray Serve LLM + vLLM, unchanged.
"""

from __future__ import annotations

import os
import secrets
from typing import Any, Dict, Optional

from ray.serve.llm import LLMServer
from ray.serve.llm.ingress import OpenAiIngress
from starlette.datastructures import Headers
from starlette.responses import JSONResponse, StreamingResponse

from tabp_vllm.serve.deploy import (ENGINE_IN_REPLICA_ENV, SHARED_GPU_ENV, STREAM_BATCHING_ENV,
                                    UNIPROC_ENV)
from tabp_vllm.serve.errors import error_body, guard_stream, install_openai_errors
from tabp_vllm.serve.streaming import leading_edge_batches

# Private Ray Serve LLM modules (patches/README.md says why no public hook serves).
from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS
from ray.llm._internal.serve.utils.lora_serve_utils import get_base_model_id


# Ray Serve LLM's routes (private: `make_fastapi_ingress` takes a map but none is public) and
# the readiness routes (serve/readiness.py).
ENDPOINTS = {**DEFAULT_ENDPOINTS,
             "health": lambda app: app.get("/health"),
             "variant_health": lambda app: app.get("/health/{model:path}")}
# Response headers of a routed request: the variant that served it and the input's cluster.
VARIANT_HEADER = "x-tabp-variant"
CLUSTER_HEADER = "x-tabp-cluster"
# "1" when the input was farther than the router's fallback radius from every centroid and the
# fallback (static) mask's variant served it; the cluster header still names the nearest one.
FALLBACK_HEADER = "x-tabp-fallback"


class ApiKeyMiddleware:
    """ASGI middleware: every HTTP request needs `Authorization: Bearer <api_key>`, else an
    OpenAI-style 401 (what the OpenAI clients raise as AuthenticationError).

    CORS preflights (OPTIONS) pass: browsers never send credentials with them.
    """

    def __init__(self, app, api_key: str):
        if not api_key:
            raise ValueError("ApiKeyMiddleware needs a non-empty api_key")
        self.app, self._expected = app, f"bearer {api_key}".encode()

    def authorized(self, scope) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        given = f"{scheme.lower()} {token.strip()}".encode()
        return secrets.compare_digest(given, self._expected)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        await JSONResponse(status_code=401, content=error_body(
            401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'"),
        )(scope, receive, send)


class TabpLLMServer(LLMServer):
    """Ray Serve LLM's `LLMServer` with its streamed outputs gathered leading-edge first
    (`serve/streaming.py`: the first output of a burst leaves at once, not after a whole batching
    window; `TABP_VLLM_STREAM_BATCHING=ray` keeps Ray's windows), and three changes to how its
    engine starts, each switched on by the variant's environment (`serve.deploy.llm_configs`):
    - CPU (`TABP_VLLM_CPU_UNIPROC=1`): the one worker runs inside the engine core process (vLLM's
      uni-process executor, vLLM's own default for one worker) instead of a process of its own:
      Ray Serve LLM forces the multiprocess executor on CPU, which costs every variant one more
      Python + torch process (bench/memory.py serve measures it);
    - CPU (`TABP_VLLM_CPU_ENGINE_IN_REPLICA=1`, `serve --engine-in-replica`): the engine core too
      runs in this replica's process, in a thread (`serve/inproc_engine.py`): one process per
      variant;
    - GPU shared by several engines (`TABP_VLLM_SHARED_GPU=1`): the engine starts under the node's
      engine-start lock (`hardware.engine_start_lock`), so engines that Ray Serve starts together
      profile their memory one at a time and each gets the KV cache its fraction of the card
      allows."""

    async def __init__(self, llm_config, **kwargs):
        await super().__init__(llm_config, engine_cls=_tabp_engine_cls(), **kwargs)

    def _batch_output_stream(self, generator):
        # Private: LLMServer's one hook between the engine's stream and the replica's chunks.
        interval_ms = self._get_batch_interval_ms()
        if os.environ.get(STREAM_BATCHING_ENV) == "ray" or not interval_ms:
            return super()._batch_output_stream(generator)
        return leading_edge_batches(generator, interval_ms / 1000)


def _tabp_engine_cls():
    # Private: VLLMEngine and its `_start_async_llm_engine`, the one place that turns the vLLM
    # config into an engine in this replica's process (Ray Serve LLM's config step may run in
    # another process, so the backend is set here, on the finished config). It returns once the
    # engine core is up: weights loaded, memory profiled, KV cache allocated, graphs captured.
    import logging

    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    from tabp_vllm.hardware import engine_start_lock

    logger = logging.getLogger("ray.serve")

    class TabpVLLMEngine(VLLMEngine):
        def _start_async_llm_engine(self, engine_args, vllm_config, placement_group):
            start = super()._start_async_llm_engine
            one_worker = vllm_config.parallel_config.world_size == 1
            in_replica = os.environ.get(ENGINE_IN_REPLICA_ENV) == "1" and one_worker
            if (os.environ.get(UNIPROC_ENV) == "1" or in_replica) and one_worker:
                vllm_config.parallel_config.distributed_executor_backend = "uni"
                engine_args.distributed_executor_backend = "uni"
            if in_replica:
                from tabp_vllm.serve.inproc_engine import engine_core_in_this_process

                logger.info("engine core in this replica's process (engine.cpu_engine_in_replica)")
                with engine_core_in_this_process():
                    return start(engine_args, vllm_config, placement_group)
            if os.environ.get(SHARED_GPU_ENV) != "1":
                return start(engine_args, vllm_config, placement_group)
            with engine_start_lock(log=logger.info):
                return start(engine_args, vllm_config, placement_group)

    return TabpVLLMEngine


class LocalCheckpointCallback(CallbackBase):
    """Ray Serve LLM's node initialisation, skipped for a checkpoint in a local folder.

    Before each engine starts, Ray Serve LLM runs a task per node of the variant's placement
    group that would download the model; for a local path it downloads nothing and returns the
    path. The task still costs a fresh Ray worker process that imports torch, transformers and
    Ray Serve LLM: ~15 s of CPU per variant on a 2-core box, while the variants' own processes
    start beside it. The folder is what every engine reads either way (on a multi-node cluster
    it must be at the same path on each node, with or without the task)."""

    async def on_before_node_init(self) -> None:
        source = self.llm_config.get_engine_config().actual_hf_model_id
        if source and os.path.isdir(source):
            self.ctx.run_init_node = False
            # the one other thing the task does, a Ray workaround: torch cannot create its
            # kernels folder under a missing $TORCH_HOME (the default's path, as torch.hub's)
            cache = os.getenv("XDG_CACHE_HOME", "~/.cache")
            home = os.getenv("TORCH_HOME", os.path.join(cache, "torch"))
            os.makedirs(os.path.join(os.path.expanduser(home), "kernels"), exist_ok=True)


class TabpIngress(OpenAiIngress):
    _routed = None  # the routed name's RoutedModel, when serving a router

    def __init__(self, llm_deployments, model_cards, *, variant_metadata: Dict[str, dict],
                 routed: Optional[dict] = None, **kwargs):
        cards = {}
        for model_id, card in model_cards.items():
            meta = {**card.metadata, **variant_metadata.get(model_id, {})}
            cards[model_id] = card.model_copy(update={"metadata": meta, "owned_by": "tabp-vllm"})
        super().__init__(llm_deployments, cards, **kwargs)
        from tabp_vllm.serve.metrics import RoutingMetrics, publish_variant_gauges

        self._gauges = publish_variant_gauges(variant_metadata)
        from tabp_vllm.serve.readiness import Readiness

        self._readiness = Readiness({name: int(meta.get("replicas", 1))
                                     for name, meta in variant_metadata.items()})
        # The routed name (`serve --router`): listed like a model, answered by the variant of each
        # request's cluster (serve/routed.py); it has no deployment of its own.
        if routed:
            from tabp_vllm.serve.routed import RoutedModel

            self._routed = RoutedModel(routed["name"], routed["router"], routed["cluster_variants"],
                                       fallback_variant=routed.get("fallback_variant"))
            first = cards[routed["cluster_variants"][0]]
            self._model_cards[self._routed.name] = first.model_copy(
                update={"id": self._routed.name, "metadata": self._routed.card_metadata()})
            self._routing_metrics = RoutingMetrics()

    def _model_error(self, status: int, message: str) -> OpenAIHTTPException:
        exc = OpenAIHTTPException(status_code=status, type="invalid_request_error",
                                  message=f"{message} Valid models: {', '.join(sorted(self._model_cards))}")
        exc.param = "model"  # read by serve/errors.py
        return exc

    def _not_found(self, model: str) -> OpenAIHTTPException:
        return self._model_error(404, f"The model '{model}' does not exist.")

    async def _process_llm_request(self, body, call_method: str, raw_request=None):
        route = None
        if self._routed is not None and body.model == self._routed.name:
            route = await self._routed.route(body)  # 400 / 503 through serve/errors.py
            self._routing_metrics.record(self._routed.name, route)
            body.model = route.variant
        if body.model is not None:  # a variant still starting: 503 now, not a silent wait
            await self._readiness.check(get_base_model_id(body.model))
        response = await super()._process_llm_request(body, call_method, raw_request)
        if isinstance(response, StreamingResponse):
            rid = getattr(getattr(raw_request, "state", None), "request_id", None) or "-"
            response.body_iterator = guard_stream(response.body_iterator, rid)
        if route is not None:  # the body's `model` already names the variant (vLLM's own)
            response.headers[VARIANT_HEADER] = route.variant
            response.headers[CLUSTER_HEADER] = str(route.cluster)
            response.headers[FALLBACK_HEADER] = "1" if route.fallback else "0"
        return response

    async def _get_model_id(self, model: Optional[str]) -> str:
        if self._routed is not None and model == self._routed.name:
            # only reached by routes that do not route (embeddings, tokenize, ...)
            raise self._model_error(400, f"'{model}' is a routed model: it serves completions and "
                                         f"chat completions only.")
        if model is None and len(self._model_cards) > 1:
            raise self._model_error(400, "The 'model' field is required.")
        if model is not None and get_base_model_id(model) not in self._model_cards:
            raise self._not_found(model)
        return await super()._get_model_id(model)

    async def health(self):
        """`GET /health`: 200 once every variant has a running replica, else 503; the body
        names each variant's state."""
        from tabp_vllm.serve.readiness import health

        code, body = health(await self._readiness.states())
        return JSONResponse(status_code=code, content=body)

    async def variant_health(self, model: str):
        """`GET /health/<model>`: the same for one variant (a routed name: all its variants)."""
        from tabp_vllm.serve.readiness import health

        states = await self._readiness.states()
        if self._routed is not None and model == self._routed.name:
            names = set(self._routed.cluster_variants)
        elif model in states:
            names = {model}
        else:
            raise self._not_found(model)
        code, body = health({n: states[n] for n in sorted(names)})
        return JSONResponse(status_code=code, content=body)

    async def model_data(self, model: str):
        card = await self.model(model)
        if card is None:
            raise self._not_found(model)
        return card


def ingress_app(api_key: Optional[str]):
    """Ray Serve LLM's ingress FastAPI app, behind the API key when one is set."""
    # Private: the factory of the stock ingress app (error handling, CORS, metrics, request ids);
    # `make_fastapi_ingress` is public and takes an app, but nothing public builds this one.
    from ray.llm._internal.serve.core.ingress.ingress import init

    app = init()
    install_openai_errors(app)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    return app


def build_app(spec) -> Any:
    """The Ray Serve application for a `ServeSpec`."""
    from ray import serve
    from ray.serve.llm import build_llm_deployment
    from ray.serve.llm.ingress import make_fastapi_ingress

    # Private: the `/v1/models` card of an LLMConfig, exactly as build_openai_app makes it.
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

    from tabp_vllm.serve.deploy import ingress_options, llm_configs

    configs = llm_configs(spec)
    ingress = make_fastapi_ingress(TabpIngress, app=ingress_app(spec.api_key),
                                   endpoint_map=ENDPOINTS)
    options = ingress_options(spec, TabpIngress.get_deployment_options(configs))
    return serve.deployment(ingress, **options).bind(
        # one name whatever the server class: "LLMServer:<variant>"
        llm_deployments={c.model_id: build_llm_deployment(c, name_prefix="LLMServer:")
                         for c in configs},
        model_cards={c.model_id: to_model_metadata(c.model_id, c) for c in configs},
        variant_metadata=spec.variant_metadata(),
        routed=spec.routed_app_config(),
    )
