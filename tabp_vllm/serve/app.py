"""The Ray Serve application: `ray.serve.llm.build_openai_app` with a thin ingress subclass.

`TabpIngress` (an `OpenAiIngress`) adds only what the stock ingress lacks:
- Bearer API key on every route (401 otherwise),
- an OpenAI-style 404 for an unknown `model` that names the valid ones,
- per-variant metadata (task, blocks kept/total, mask hash, speedup) in `/v1/models`,
- the tabp gauges (blocks kept/total, theoretical speedup) through Ray's metrics export.
Routing, streaming, logprobs and the engines are Ray Serve LLM + vLLM, unchanged.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from fastapi import Depends, Request
from starlette.responses import Response

from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    OpenAIHTTPException,
    ScoreRequest,
    TokenizeCompletionRequest,
)
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
from ray.llm._internal.serve.utils.lora_serve_utils import get_base_model_id

# The ingress replica is its own process: the key it checks lives here, set by __init__.
_STATE: dict[str, Any] = {"api_key": None}


async def require_api_key(request: Request) -> None:
    key = _STATE["api_key"]
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or token.strip() != key:
        raise OpenAIHTTPException(
            status_code=401,
            message="Incorrect or missing API key: send 'Authorization: Bearer <key>'",
            type="invalid_api_key",
        )


class TabpIngress(OpenAiIngress):
    def __init__(self, llm_deployments, model_cards, *, variant_metadata: Dict[str, dict],
                 api_key: Optional[str] = None, **kwargs):
        cards = {}
        for model_id, card in model_cards.items():
            meta = {**card.metadata, **variant_metadata.get(model_id, {})}
            cards[model_id] = card.model_copy(update={"metadata": meta, "owned_by": "tabp-vllm"})
        super().__init__(llm_deployments, cards, **kwargs)
        _STATE["api_key"] = api_key
        from tabp_vllm.serve.metrics import publish_variant_gauges

        self._gauges = publish_variant_gauges(variant_metadata)

    def _not_found(self, model: str) -> OpenAIHTTPException:
        return OpenAIHTTPException(
            status_code=404,
            message=(f"The model '{model}' does not exist. Valid models: "
                     f"{', '.join(sorted(self._model_cards))}"),
            type="NotFoundError",
        )

    async def _get_model_id(self, model: Optional[str]) -> str:
        if model is not None and get_base_model_id(model) not in self._model_cards:
            raise self._not_found(model)
        return await super()._get_model_id(model)

    async def model_data(self, model: str, _auth: None = Depends(require_api_key)) -> ModelCard:
        card = await self.model(model)
        if card is None:
            raise self._not_found(model)
        return card

    # ---- the stock routes, behind the API key ------------------------------------------------
    async def models(self, _auth: None = Depends(require_api_key)) -> ModelList:
        return await super().models()

    async def completions(self, body: CompletionRequest, request: Request,
                          _auth: None = Depends(require_api_key)) -> Response:
        return await super().completions(body, request)

    async def chat(self, body: ChatCompletionRequest, request: Request,
                   _auth: None = Depends(require_api_key)) -> Response:
        return await super().chat(body, request)

    async def embeddings(self, body: EmbeddingRequest, request: Request,
                         _auth: None = Depends(require_api_key)) -> Response:
        return await super().embeddings(body, request)

    async def score(self, body: ScoreRequest, request: Request,
                    _auth: None = Depends(require_api_key)) -> Response:
        return await super().score(body, request)

    async def tokenize(self, body: TokenizeCompletionRequest, request: Request,
                       _auth: None = Depends(require_api_key)) -> Response:
        return await super().tokenize(body, request)

    async def detokenize(self, body: DetokenizeRequest, request: Request,
                         _auth: None = Depends(require_api_key)) -> Response:
        return await super().detokenize(body, request)


def build_app(spec) -> Any:
    """The Ray Serve application for a `ServeSpec`: `build_openai_app` with `TabpIngress`."""
    from ray.serve.llm import build_openai_app

    from tabp_vllm.serve.config import llm_configs

    return build_openai_app({
        "llm_configs": llm_configs(spec),
        "ingress_cls_config": {
            "ingress_cls": TabpIngress,
            "ingress_extra_kwargs": {
                "variant_metadata": {v.name: v.metadata() for v in spec.variants},
                "api_key": spec.api_key,
            },
        },
    })
