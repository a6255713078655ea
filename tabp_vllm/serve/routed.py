"""The routed model name (`<alias>-auto`): each request goes to the variant of its input's cluster.

Lives in the ingress replica. A request to the routed name is reduced to the text it is routed by
(completions: the prompt; chat: the last user message), embedded with the router's encoder, and
sent to the variant serving its nearest centroid's mask, or, when the router has a fallback and
the text is farther than its radius from every centroid, to the fallback (static) mask's variant. Embedding runs in a worker thread, so the
ingress event loop keeps serving; under load the texts that queued while the encoder was busy are
embedded together in one batch (`MicroBatcher`; an idle encoder takes a lone text at once, no
batching delay). Ray Serve's `serve.batch` does the same but only inside a replica.

The encoder is loaded in a background thread when the ingress starts: a routed request waits for
it (up to `load_timeout_s`), other models never do. An encoder that fails to load or to encode
makes routed requests answer 503 with the cause; nothing else is affected.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from tabp_vllm.errors import first_line
from tabp_vllm.routing.router import FALLBACK, Router, parse_router

# At most this many queued texts are embedded in one encoder call.
MAX_BATCH = 32


class RoutingUnavailable(Exception):
    """The encoder cannot route now (503); the message says why."""


class NotRoutable(Exception):
    """The request carries nothing to route by (400)."""


@dataclass(frozen=True)
class Route:
    variant: str
    cluster: int  # the nearest centroid's
    seconds: float  # embedding + nearest centroid, queueing included
    fallback: bool = False  # farther than the fallback radius from every centroid


def text_to_route(body: Any) -> str:
    """What a request is routed by: a completion's prompt (several prompts: all of them, one per
    line), a chat's last user message (its text parts). Token-id prompts cannot be embedded."""
    messages = getattr(body, "messages", None)
    if messages is not None:
        for message in reversed(list(messages)):
            role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
            if role != "user":
                continue
            content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
            if isinstance(content, str):
                return content
            parts = [p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text"]
            if any(parts):
                return "\n".join(parts)
        raise NotRoutable("a chat request to a routed model needs a user message with text")
    prompt = getattr(body, "prompt", None)
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    raise NotRoutable("a routed model routes by text: send the prompt as a string, not token ids")


class RoutedModel:
    """One routed name: the router, which variant serves each cluster, and the encoder.

    `encoder_factory` builds the encoder (called once, in a background thread); tests pass one.
    """

    def __init__(self, name: str, router_doc: dict, cluster_variants: list[str],
                 encoder_factory: Callable[[Router], Any] | None = None,
                 load_timeout_s: float = 300.0, encode_timeout_s: float = 60.0,
                 fallback_variant: str | None = None):
        self.name = name
        self.router = parse_router(router_doc, f"router of {name}")
        if len(cluster_variants) != self.router.num_clusters:
            raise ValueError(f"{len(cluster_variants)} variants for {self.router.num_clusters} clusters")
        if (self.router.fallback is None) != (fallback_variant is None):
            raise ValueError("a fallback variant is needed exactly when the router has a fallback")
        self.cluster_variants = list(cluster_variants)
        self.fallback_variant = fallback_variant
        self.load_timeout_s, self.encode_timeout_s = load_timeout_s, encode_timeout_s
        self._factory = encoder_factory or _open_router_encoder
        self._encoder = None
        self._batcher: MicroBatcher | None = None
        self._load_error: str | None = None
        self._loaded = threading.Event()
        threading.Thread(target=self._load, name=f"encoder-{name}", daemon=True).start()

    def _load(self) -> None:
        try:
            self._encoder = self._factory(self.router)
        except BaseException as exc:  # noqa: BLE001 - reported on every routed request
            self._load_error = first_line(exc)
        finally:
            self._loaded.set()

    def card_metadata(self) -> dict[str, Any]:
        """What `/v1/models` shows for the routed name."""
        return {"variant": self.name, "routed": True, "clusters": self.router.num_clusters,
                "cluster_variants": self.cluster_variants, "variants": sorted(set(self.cluster_variants)),
                "encoder": self.router.encoder.get("id"), "router_hash": self.router.content_hash(),
                "k": self.router.k, "method": self.router.method,
                **({"flops_ratio": self.router.flops_ratio} if self.router.flops_ratio is not None else {}),
                **({"fallback_variant": self.fallback_variant,
                    "fallback_radius": self.router.fallback.radius} if self.fallback_variant else {})}

    async def _encoder_ready(self):
        if not self._loaded.is_set():
            ok = await asyncio.to_thread(self._loaded.wait, self.load_timeout_s)
            if not ok:
                raise RoutingUnavailable(f"routing for '{self.name}' is unavailable: its encoder "
                                         f"is still loading after {self.load_timeout_s:.0f} s")
        if self._encoder is None:
            raise RoutingUnavailable(f"routing for '{self.name}' is unavailable: its encoder "
                                     f"failed to load ({self._load_error})")
        return self._encoder

    async def route(self, body: Any) -> Route:
        """The variant for one request (raises NotRoutable / RoutingUnavailable)."""
        text = text_to_route(body)
        t0 = time.perf_counter()
        await self._encoder_ready()
        try:
            vector = await asyncio.wait_for(self._embed(text), self.encode_timeout_s)
        except asyncio.TimeoutError:
            raise RoutingUnavailable(f"routing for '{self.name}' is unavailable: the encoder did "
                                     f"not answer within {self.encode_timeout_s:.0f} s") from None
        except Exception as exc:  # noqa: BLE001 - any encoder fault is the routed name's 503
            raise RoutingUnavailable(f"routing for '{self.name}' is unavailable: the encoder "
                                     f"failed ({type(exc).__name__}: {exc})") from None
        cluster = int(self.router.nearest(vector[None, :])[0])
        if int(self.router.assign(vector[None, :])[0]) == FALLBACK:
            return Route(self.fallback_variant, cluster, time.perf_counter() - t0, fallback=True)
        return Route(self.cluster_variants[cluster], cluster, time.perf_counter() - t0)

    async def _embed(self, text: str) -> np.ndarray:
        if self._batcher is None:
            self._batcher = MicroBatcher(self._encoder.encode, MAX_BATCH)
        return await self._batcher(text)


class MicroBatcher:
    """Texts in, vectors out, through `encode(list[str])` run in a worker thread: one call at a
    time, each taking every text queued meanwhile (up to `max_batch`)."""

    def __init__(self, encode: Callable[[list[str]], Any], max_batch: int):
        self.encode, self.max_batch = encode, max_batch
        self._queue: list[tuple[str, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    async def __call__(self, text: str) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((text, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            batch = [(t, f) for t, f in batch if not f.done()]  # a caller gone (timeout, disconnect)
            if not batch:
                continue
            try:
                vectors = np.asarray(await asyncio.to_thread(self.encode, [t for t, _ in batch]),
                                     dtype=np.float32)
                if vectors.shape[0] != len(batch):
                    raise RuntimeError(f"{vectors.shape[0]} vectors for {len(batch)} texts")
            except Exception as exc:  # noqa: BLE001 - every caller of this batch gets it
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for (_, f), v in zip(batch, vectors):
                if not f.done():
                    f.set_result(v)


def _open_router_encoder(router: Router):
    from tabp_vllm.routing.router import open_encoder

    return open_encoder(router, f"router of {router.model_id}")
