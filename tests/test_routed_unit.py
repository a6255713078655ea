"""The routed name's request routing (serve/routed.py) without a server: what a request is routed
by, batching under concurrency, and every way the encoder can fail (503, never a hang)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from tabp_vllm.serve.routed import NotRoutable, RoutedModel, RoutingUnavailable, text_to_route


def _router_doc(demo_model) -> dict:
    from tabp_vllm.mask import make_mask
    from tabp_vllm.models import load_model_config, model_fingerprint
    from tabp_vllm.routing.router import Router

    masks = [make_mask(demo_model, r, task=t, model_id="llama")
             for r, t in (([20, 21], "math"), ([10, 11], "words"))]
    return Router(model_id="llama", fingerprint=model_fingerprint(load_model_config(demo_model)), k=2,
                  encoder={"name": "fake", "id": "fake", "dimension": 2, "pooling": "-",
                           "normalize": "l2"},
                  centroids=[[1.0, 0.0], [0.0, 1.0]], masks=masks,
                  sizes=[{"math": 1}, {"words": 1}]).to_json()


class DigitEncoder:
    """Texts with a digit go to [1, 0], others to [0, 1]; counts its calls and batch sizes."""

    dimension = 2

    def __init__(self, delay_s=0.0):
        self.batches: list[int] = []
        self.delay_s = delay_s

    def encode(self, texts):
        self.batches.append(len(texts))
        time.sleep(self.delay_s)
        return np.array([[1.0, 0.0] if any(c.isdigit() for c in t) else [0.0, 1.0] for t in texts])


def _routed(demo_model, factory, **kw) -> RoutedModel:
    return RoutedModel("llama-auto", _router_doc(demo_model), ["llama-math", "llama-words"],
                       encoder_factory=factory, **kw)


def test_text_to_route():
    assert text_to_route(SimpleNamespace(prompt="2 + 2 =")) == "2 + 2 ="
    assert text_to_route(SimpleNamespace(prompt=["a", "b"])) == "a\nb"
    chat = SimpleNamespace(messages=[{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": "first"},
                                     {"role": "assistant", "content": "ok"},
                                     {"role": "user", "content": [{"type": "text", "text": "last"},
                                                                  {"type": "image_url"}]}])
    assert text_to_route(chat) == "last"
    for bad in (SimpleNamespace(prompt=[1, 2, 3]), SimpleNamespace(prompt=[[1, 2]]),
                SimpleNamespace(messages=[{"role": "system", "content": "x"}])):
        with pytest.raises(NotRoutable):
            text_to_route(bad)


def test_routes_to_the_nearest_cluster_and_batches_under_load(demo_model):
    enc = DigitEncoder(delay_s=0.05)
    routed = _routed(demo_model, lambda router: enc)

    async def many():
        bodies = [SimpleNamespace(prompt=f"what is {i} + 1?" if i % 2 else "why is grass green?")
                  for i in range(24)]
        return await asyncio.gather(*(routed.route(b) for b in bodies))

    routes = asyncio.run(many())
    assert [r.variant for r in routes] == ["llama-words", "llama-math"] * 12
    assert [r.cluster for r in routes] == [1, 0] * 12
    assert all(r.seconds > 0 for r in routes)
    assert sum(enc.batches) == 24 and len(enc.batches) < 24 and max(enc.batches) > 1  # batched
    assert routed.card_metadata()["cluster_variants"] == ["llama-math", "llama-words"]


def test_encoder_that_fails_to_load_is_503_with_the_cause(demo_model):
    def broken(router):
        raise OSError("no such directory: /gone/minilm\nsecond line")

    routed = _routed(demo_model, broken)
    with pytest.raises(RoutingUnavailable, match=r"failed to load \(no such directory: /gone/minilm\)$"):
        asyncio.run(routed.route(SimpleNamespace(prompt="hi")))


def test_encoder_that_raises_or_hangs_is_503_never_a_hang(demo_model):
    class Raising(DigitEncoder):
        def encode(self, texts):
            raise RuntimeError("tokenizer exploded")

    routed = _routed(demo_model, lambda router: Raising())
    with pytest.raises(RoutingUnavailable, match="encoder failed .*tokenizer exploded"):
        asyncio.run(routed.route(SimpleNamespace(prompt="hi")))

    routed = _routed(demo_model, lambda router: DigitEncoder(delay_s=4), encode_timeout_s=0.3)

    async def timed():
        t0 = time.monotonic()
        with pytest.raises(RoutingUnavailable, match="did not answer within"):
            await routed.route(SimpleNamespace(prompt="hi"))
        return time.monotonic() - t0

    assert asyncio.run(timed()) < 2  # (asyncio.run then waits for the stuck thread)


def test_still_loading_encoder_times_out_as_503(demo_model):
    release = threading.Event()

    def slow(router):
        release.wait(10)
        return DigitEncoder()

    routed = _routed(demo_model, slow, load_timeout_s=0.3)
    with pytest.raises(RoutingUnavailable, match="still loading"):
        asyncio.run(routed.route(SimpleNamespace(prompt="hi")))
    release.set()
    assert asyncio.run(routed.route(SimpleNamespace(prompt="1 + 1"))).variant == "llama-math"


def test_far_inputs_take_the_fallback_variant(demo_model):
    """A router with a fallback: a text past its radius from both centroids goes to the fallback
    (static) mask's variant; the route still names the nearest cluster and says it fell back."""
    from tabp_vllm.mask import make_mask
    from tabp_vllm.routing.router import Fallback, parse_router

    class ThreeWay(DigitEncoder):  # digits: [1, 0]; "?": [0, 1]; anything else: far from both
        def encode(self, texts):
            return np.array([[1.0, 0.0] if any(c.isdigit() for c in t) else
                             [0.0, 1.0] if "?" in t else [-1.0, -0.2] for t in texts])

    doc = _router_doc(demo_model)
    router = parse_router(doc)
    router.fallback = Fallback(radius=0.5, quantile=0.95, source="test",
                               mask=make_mask(demo_model, [5, 6], task="static", model_id="llama"))
    with pytest.raises(ValueError, match="fallback variant"):
        RoutedModel("llama-auto", router.to_json(), ["llama-math", "llama-words"])
    routed = RoutedModel("llama-auto", router.to_json(), ["llama-math", "llama-words"],
                         encoder_factory=lambda r: ThreeWay(), fallback_variant="llama-static")

    async def three():
        return await asyncio.gather(*(routed.route(SimpleNamespace(prompt=p))
                                      for p in ("what is 2 + 2", "why is grass green?", "lorem ipsum")))

    math, words, far = asyncio.run(three())
    assert (math.variant, math.fallback, words.variant, words.fallback) == \
        ("llama-math", False, "llama-words", False)
    assert far.variant == "llama-static" and far.fallback and far.cluster == 1
    meta = routed.card_metadata()
    assert meta["fallback_variant"] == "llama-static" and meta["fallback_radius"] == 0.5
