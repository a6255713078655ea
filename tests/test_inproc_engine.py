"""vLLM's AsyncLLM with its engine core in this process (`serve/inproc_engine.py`), on the demo
model: what it generates, that no engine process exists, aborts, utility calls from any event
loop, and an engine failure that reaches every request."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import psutil
import pytest

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, a small"]


def build_async_llm(model: str, mask=None):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.executor.abstract import Executor

    from tabp_vllm.engine import engine_args_for
    from tabp_vllm.serve.inproc_engine import engine_core_in_this_process

    config = AsyncEngineArgs(**engine_args_for(model, mask, kv_cache_gib=0.25, max_model_len=512,
                                               dtype="float32")).create_engine_config()
    config.parallel_config.distributed_executor_backend = "uni"  # as TabpLLMServer sets it
    with engine_core_in_this_process():
        return AsyncLLM(vllm_config=config, executor_class=Executor.get_class(config),
                        log_requests=False, log_stats=True)


async def generate(llm, prompt: str, max_tokens: int, request_id: str) -> list[int]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    tokens: list[int] = []
    async for out in llm.generate(prompt, params, request_id=request_id):
        tokens = list(out.outputs[0].token_ids)
    return tokens


@pytest.fixture(scope="module")
def engine(demo_model, write_mask_module):
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    loop = asyncio.new_event_loop()
    llm = build_async_llm(demo_model, write_mask_module)
    yield llm, loop, children_before
    llm.shutdown()
    loop.run_until_complete(asyncio.sleep(0.1))  # the output handler's cancellation runs
    loop.close()
    del llm  # collected now, not by AsyncLLM.__del__ at interpreter exit
    gc.collect()


@pytest.fixture(scope="module")
def write_mask_module(demo_model, tmp_path_factory):
    from tabp_vllm.mask import load_mask, make_mask

    path = tmp_path_factory.mktemp("mask") / "m.json"
    make_mask(demo_model, [20, 24], task="t", model_id="llama").save(path)
    return load_mask(path)


def test_the_client_is_in_process_and_no_engine_process_starts(engine):
    from tabp_vllm.serve.inproc_engine import AsyncInprocClient

    llm, _, children_before = engine
    assert isinstance(llm.engine_core, AsyncInprocClient)
    new = {p.pid: p.name() for p in psutil.Process().children(recursive=True)
           if p.pid not in children_before}
    assert new == {}, f"processes started by the engine: {new}"
    assert any(t.name == "EngineCore" and t.is_alive() for t in threading.enumerate())


def test_concurrent_requests_get_the_offline_engines_greedy_tokens(engine, demo_model,
                                                                   write_mask_module):
    from vllm import SamplingParams

    from tabp_vllm.engine import build_llm

    llm, loop, _ = engine
    lengths = [24, 7, 16]  # different lengths: each request must get its own outputs

    async def all_at_once():
        return await asyncio.gather(*[generate(llm, p, n, f"c{i}")
                                      for i, (p, n) in enumerate(zip(PROMPTS, lengths))])

    got = loop.run_until_complete(all_at_once())
    offline = build_llm(demo_model, write_mask_module, kv_cache_gib=0.25, max_model_len=512,
                        dtype="float32")
    try:
        want = [list(o.outputs[0].token_ids) for o in offline.generate(
            PROMPTS, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
                      for n in lengths], use_tqdm=False)]
    finally:
        offline.llm_engine.engine_core.shutdown()
    assert [len(t) for t in got] == lengths
    assert got == want


def test_a_cancelled_request_is_aborted_in_the_engine(engine):
    llm, loop, _ = engine
    scheduler = llm.engine_core.engine_core.scheduler

    async def cancel_after_first_output():
        from vllm import SamplingParams

        stream = llm.generate(PROMPTS[0], SamplingParams(max_tokens=400, ignore_eos=True),
                              request_id="long")
        await stream.__anext__()
        assert scheduler.has_requests()
        await stream.aclose()  # what a client hanging up does to the replica's stream
        for _ in range(100):
            if not scheduler.has_requests():
                return True
            await asyncio.sleep(0.05)
        return False

    assert loop.run_until_complete(cancel_after_first_output())
    # and the engine still serves
    assert len(loop.run_until_complete(generate(llm, PROMPTS[1], 5, "after-abort"))) == 5


def test_pausing_aborts_running_requests_and_ends_their_streams(engine):
    """`pause_generation()` (mode abort) ends in-flight requests with finish reason abort, as
    vLLM's engine-core process does; a plain in-process EngineCore would leave them waiting."""
    llm, loop, _ = engine

    async def pause_while_one_runs():
        from vllm import SamplingParams

        outs = []

        async def long_request():
            async for out in llm.generate(PROMPTS[2], SamplingParams(max_tokens=400,
                                                                     ignore_eos=True),
                                          request_id="paused"):
                outs.append(out)

        task = asyncio.create_task(long_request())
        while not outs:
            await asyncio.sleep(0.01)
        await llm.pause_generation(mode="abort")
        await asyncio.wait_for(task, timeout=30)  # the stream ends, it does not hang
        assert await llm.is_paused()
        await llm.resume_generation()
        return outs[-1]

    last = loop.run_until_complete(pause_while_one_runs())
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert len(last.outputs[0].token_ids) < 400
    assert len(loop.run_until_complete(generate(llm, PROMPTS[0], 4, "resumed"))) == 4


def test_utility_calls_answer_on_the_callers_loop(engine):
    llm, loop, _ = engine
    assert "generate" in loop.run_until_complete(llm.get_supported_tasks())
    assert loop.run_until_complete(llm.reset_prefix_cache()) is True
    # from another thread's event loop (Ray Serve LLM asks at start, off its request loop)
    answers = []
    other = threading.Thread(target=lambda: answers.append(
        asyncio.run(llm.engine_core.call_utility_async("get_supported_tasks"))))
    other.start()
    other.join(60)
    assert answers and "generate" in answers[0]
    assert loop.run_until_complete(llm.is_sleeping()) is False


def test_an_engine_failure_ends_every_request_and_marks_the_engine_dead(demo_model):
    from vllm.v1.engine.exceptions import EngineDeadError

    llm = build_async_llm(demo_model)
    loop = asyncio.new_event_loop()
    try:
        assert len(loop.run_until_complete(generate(llm, PROMPTS[0], 3, "ok"))) == 3
        core = llm.engine_core.engine_core

        def broken_step():
            raise RuntimeError("simulated fault in the forward pass")

        core.step_fn = broken_step
        assert not llm.errored

        async def two_requests(engine):
            return await asyncio.gather(generate(engine, PROMPTS[1], 8, "a"),
                                        generate(engine, PROMPTS[2], 8, "b"),
                                        return_exceptions=True)

        results = loop.run_until_complete(two_requests(llm))
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert llm.errored
        with pytest.raises(EngineDeadError):
            loop.run_until_complete(llm.check_health())
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError):  # a new request fails at once, does not hang
            loop.run_until_complete(generate(llm, PROMPTS[0], 3, "late"))
        assert time.monotonic() - t0 < 10
    finally:
        llm.shutdown()
        loop.run_until_complete(asyncio.sleep(0.1))
        loop.close()
        del llm
        gc.collect()
