"""Leading-edge stream batching (`serve/streaming.py`) against Ray Serve LLM's fixed windows,
on timed fake streams (no engine): when each output leaves, in which chunk, and what closing or
an error does to the stream underneath."""

from __future__ import annotations

import asyncio
import time

import pytest

from tabp_vllm.serve.streaming import leading_edge_batches


async def timed_stream(times_s, log=None, fail_at=None):
    """Outputs 0, 1, ... produced at the given offsets (seconds after the first __anext__)."""
    t0 = time.monotonic()
    try:
        for i, t in enumerate(times_s):
            await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))
            if fail_at == i:
                raise RuntimeError("engine died")
            yield i
    finally:
        if log is not None:
            log.append("closed")  # what vLLM's generate does on close: abort the request


async def collect(batches):
    """[(seconds since start, batch)] for every chunk a batcher sends."""
    t0 = time.monotonic()
    return [(time.monotonic() - t0, b) async for b in batches]


def run(coro):
    return asyncio.run(coro)


def test_first_output_leaves_at_once_ray_waits_a_window():
    from ray.llm._internal.serve.utils.batcher import Batcher

    ours = run(collect(leading_edge_batches(timed_stream([0.0, 0.5]), interval_s=0.2)))
    async def ray_batches():  # Ray's Batcher starts its reader task when it is made
        return await collect(Batcher(timed_stream([0.0, 0.5]), interval_ms=200).stream())

    ray = run(ray_batches())
    assert [b for _, b in ours] == [[0], [1]] and [b for _, b in ray] == [[0], [1]]
    assert ours[0][0] < 0.05          # within the 2 ms gather (plus scheduling)
    assert ray[0][0] >= 0.19          # Ray holds the first token for its whole window
    assert ours[1][0] < 0.55          # after a quiet interval, again at once


def test_back_to_back_outputs_share_the_first_chunk():
    # vLLM's chat stream: the role chunk and the first token's chunk, then tokens every 10 ms
    chunks = run(collect(leading_edge_batches(timed_stream([0.0, 0.0] + [0.01 * i for i in range(1, 30)]),
                                              interval_s=0.05)))
    assert chunks[0][1][:2] == [0, 1] and chunks[0][0] < 0.05
    assert [x for _, b in chunks for x in b] == list(range(31))  # all, in order
    # a fast stream keeps the rate of Ray's windows: at most one chunk per interval (+ the last)
    gaps = [b[0] - a[0] for a, b in zip(chunks, chunks[1:])]
    assert len(chunks) <= 0.29 / 0.05 + 2 and min(gaps[:-1]) >= 0.045


def test_slow_stream_sends_each_output_as_it_comes():
    times = [0.0, 0.08, 0.16, 0.24]
    chunks = run(collect(leading_edge_batches(timed_stream(times), interval_s=0.05)))
    assert [b for _, b in chunks] == [[0], [1], [2], [3]]
    assert all(t - times[i] < 0.04 for i, (t, _) in enumerate(chunks))


def test_error_after_what_came_before_it():
    async def main():
        got = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for b in leading_edge_batches(timed_stream([0, 0.01, 0.02], fail_at=2), 0.05):
                got.extend(b)
        return got

    assert run(main()) == [0, 1]


def test_closing_the_stream_closes_the_engine_stream():
    async def main():
        log = []
        batches = leading_edge_batches(timed_stream([0.0, 5.0], log=log), interval_s=0.05)
        first = await batches.__anext__()
        await batches.aclose()        # the client hung up
        await asyncio.sleep(0.05)     # the reader task's cancellation runs
        return first, log

    first, log = run(main())
    assert first == [0] and log == ["closed"]


def test_empty_stream_ends():
    assert run(collect(leading_edge_batches(timed_stream([]), interval_s=0.05))) == []
