"""How a variant's streamed outputs are gathered into the chunks its replica sends on.

Ray Serve LLM batches a stream in fixed windows (`stream_batching_interval_ms`, 50 ms by default):
every output, the first one included, waits for the end of its window. That holds each streamed
request's first token back by up to a window (on a GPU, where a first token takes tens of ms, it
can double the TTFT). `leading_edge_batches` keeps the rate of chunks (at most one per interval)
but sends an output that arrives after a quiet interval at once: the first output, and every
output of a stream slower than one per interval, leave within `gather_s`.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, List, TypeVar

T = TypeVar("T")

# After the first output of a burst, how long to wait for the outputs that follow it at once
# (vLLM's chat stream yields the role chunk and the first token's chunk back to back).
GATHER_S = 0.002


async def leading_edge_batches(outputs: AsyncIterator[T], interval_s: float,
                               gather_s: float = GATHER_S) -> AsyncIterator[List[T]]:
    """Lists of `outputs`: at most one list per `interval_s`, the first of a burst after `gather_s`.

    `outputs` is read by a task of its own (as Ray Serve LLM's Batcher does), so the engine never
    waits for the consumer; closing this generator cancels that task, which ends `outputs` (vLLM
    then aborts the request). An error of `outputs` is raised after what came before it.
    """
    queue: List[T] = []
    arrived, finished = asyncio.Event(), asyncio.Event()

    async def read() -> None:
        try:
            async for item in outputs:
                queue.append(item)
                arrived.set()
        finally:
            finished.set()
            arrived.set()

    reader = asyncio.create_task(read())
    last_sent = float("-inf")
    try:
        while True:
            await arrived.wait()
            # the first output of a burst: wait until a chunk may leave again, at least gather_s
            wait_s = max(gather_s, last_sent + interval_s - time.monotonic())
            try:
                await asyncio.wait_for(finished.wait(), timeout=wait_s)
            except asyncio.TimeoutError:
                pass
            batch, queue[:] = queue[:], []
            arrived.clear()
            if finished.is_set() and not batch:
                break
            if batch:
                last_sent = time.monotonic()
                yield batch
            if finished.is_set() and not queue:
                break
        reader.result()  # the error `outputs` ended with, if any
    finally:
        if not reader.done():
            reader.cancel()
