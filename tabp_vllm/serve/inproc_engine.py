"""vLLM's engine core in the replica's own process: one process per served variant on a CPU.

vLLM's `AsyncLLM` (what Ray Serve LLM's replicas run) always starts its `EngineCore` in a process
of its own and talks to it over ZMQ (`AsyncMPClient`); `VLLM_ENABLE_V1_MULTIPROCESSING=0` applies
only to the offline `LLM` (`InprocClient`). On a CPU replica that second process costs every
variant another Python + torch + vLLM import, ~0.75 GiB (bench/memory.py serve).
`AsyncInprocClient` is the asynchronous counterpart of vLLM's `InprocClient`: the same
`EngineCore` built in this process, stepped by one thread, with requests and outputs passed
through queues instead of sockets. `AsyncLLM` gets it through `engine_core_in_this_process()`.

The thread runs the loop of vLLM's `EngineCoreProc.run_busy_loop`: wait while idle, take in new
requests, aborts and utility calls between steps, step, hand the outputs to the event loop.
The model's forward pass releases the GIL (torch ops); the scheduler's Python code and the
replica's share it, where two processes would run them side by side (bench/memory.py serve
measures throughput as well as memory for that reason).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from types import SimpleNamespace
from typing import Any

from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.engine.core import EngineCore
from vllm.v1.engine.core_client import AsyncMPClient, EngineCoreClient
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.request import RequestStatus

logger = logging.getLogger(__name__)

_ADD, _ABORT, _UTILITY, _STOP = range(4)


class AsyncInprocClient(AsyncMPClient):
    """`AsyncLLM`'s engine-core client with the `EngineCore` in this process, in one thread.

    Subclasses `AsyncMPClient` only for its public `*_async` wrappers, which all reduce to
    `call_utility_async` / `call_utility_all_async`; none of its processes or sockets exist
    (`MPClient.__init__` is deliberately not called)."""

    def __init__(self, vllm_config, executor_class, log_stats: bool, **_unused: Any):
        self.vllm_config = vllm_config
        self.client_index = 0
        self.core_engine = b"\x00\x00"  # engine 0's identity, as MPClient names it
        self.core_engines = [self.core_engine]  # call_utility_all_async iterates these
        self.engine_ranks_managed = [0]
        self._engine_status: dict = {}
        self.engines_running = False
        # AsyncLLM reads `resources.engine_dead` (its `errored` and `dead_error`)
        self.resources = SimpleNamespace(engine_dead=False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outputs: asyncio.Queue | None = None
        self._inputs: queue.SimpleQueue = queue.SimpleQueue()
        # Built here, in the caller's thread, as InprocClient does: load, profile and KV cache
        # happen before AsyncLLM returns, and a failure raises to the caller.
        self.engine_core = EngineCore(vllm_config, executor_class, log_stats,
                                      executor_fail_callback=self._executor_failed)
        self._thread = threading.Thread(target=self._run, name="EngineCore", daemon=True)
        self._thread.start()

    # --- the event-loop side -------------------------------------------------------------

    def _bind_loop(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._outputs = asyncio.Queue()

    def ensure_alive(self) -> None:
        if self.resources.engine_dead:
            raise EngineDeadError()

    async def get_output_async(self) -> EngineCoreOutputs:
        self._bind_loop()
        outputs = await self._outputs.get()
        if isinstance(outputs, BaseException):
            raise EngineDeadError() from outputs
        return outputs

    async def add_request_async(self, request) -> None:
        self._bind_loop()  # AsyncLLM's loop: its output handler awaits get_output_async there
        self.ensure_alive()
        request.client_index = self.client_index
        try:
            # vLLM runs this outside the engine loop too (EngineCoreProc's input thread)
            prepared = self.engine_core.preprocess_add_request(request)
        except Exception:
            logger.exception("Unexpected error pre-processing request %s", request.request_id)
            self._deliver(_finished([request.request_id], FinishReason.ERROR))
            return
        self._inputs.put((_ADD, prepared))

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        if request_ids and not self.resources.engine_dead:
            self._inputs.put((_ABORT, request_ids))

    async def _call_utility_async(self, method: str, *args, engine=None) -> Any:
        # Any loop may call (Ray Serve LLM asks for the supported tasks at start, from another
        # loop than its requests'): each result goes back to its caller's loop.
        self.ensure_alive()
        future = asyncio.get_running_loop().create_future()
        self._inputs.put((_UTILITY, (future, method, args)))
        return await future

    def dp_engines_running(self) -> bool:
        return False

    def get_kv_event_sources(self) -> dict:
        return {}

    def shutdown(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._inputs.put((_STOP, None))
            self._thread.join(timeout if timeout is not None else 30)
        if not self._thread.is_alive():
            self.engine_core.shutdown()

    # --- the engine thread -----------------------------------------------------------------

    def _deliver(self, item) -> None:
        """Hand an EngineCoreOutputs (or the engine's fatal error) to the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._outputs.put_nowait, item)

    def _executor_failed(self) -> None:
        self._inputs.put((_STOP, RuntimeError("Executor failed.")))

    def _has_work(self) -> bool:
        core = self.engine_core
        return core.scheduler.has_requests() or bool(core.batch_queue)

    def _run(self) -> None:
        try:
            while True:
                # Idle: block until something arrives. Busy: take what is there, then step.
                item = self._inputs.get() if not self._has_work() else _get_nowait(self._inputs)
                while item is not None:
                    kind, payload = item
                    if kind == _STOP:
                        if isinstance(payload, BaseException):
                            raise payload
                        return
                    self._handle(kind, payload)
                    item = _get_nowait(self._inputs)
                if self._has_work():
                    outputs, executed = self.engine_core.step_fn()
                    if outputs and 0 in outputs:
                        self._deliver(outputs[0])
                    self.engine_core.post_step(model_executed=executed)
        except BaseException as e:  # the engine is dead: fail every request and future
            logger.exception("EngineCore encountered a fatal error.")
            self.resources.engine_dead = True
            self._deliver(e)
            self._fail_pending_utilities()

    def _handle(self, kind: int, payload) -> None:
        if kind == _ADD:
            request, wave = payload
            self.engine_core.add_request(request, wave)
        elif kind == _ABORT:
            self.engine_core.abort_requests(payload)
        elif kind == _UTILITY:
            future, method, args = payload
            try:
                if _pause_mode(method, args) == "abort":
                    self._abort_all()
                result = getattr(self.engine_core, method)(*args)
            except Exception as e:
                logger.exception("Invocation of %s method failed", method)
                self._settle(future, error=RuntimeError(f"Call to {method} method failed: {e}"))
                return
            if isinstance(result, concurrent.futures.Future):  # e.g. pause once idle
                result.add_done_callback(lambda f: self._settle(future, result=f.result()))
            else:
                self._settle(future, result=result)

    def _abort_all(self) -> None:
        """End every request as aborted and tell the client, as `EngineCoreProc.pause_scheduler`
        does (the plain `EngineCore`'s pause drops them without a word: their streams would wait
        forever)."""
        aborted = self.engine_core.scheduler.finish_requests(None, RequestStatus.FINISHED_ABORTED)
        if aborted:
            self._deliver(_finished([r.request_id for r in aborted], FinishReason.ABORT))

    def _settle(self, future: asyncio.Future, result=None, error: BaseException | None = None):
        def settle():
            if not future.done():
                future.set_exception(error) if error else future.set_result(result)
        future.get_loop().call_soon_threadsafe(settle)

    def _fail_pending_utilities(self) -> None:
        while (item := _get_nowait(self._inputs)) is not None:
            if item[0] == _UTILITY:
                self._settle(item[1][0], error=EngineDeadError())


def _get_nowait(q: queue.SimpleQueue):
    try:
        return q.get_nowait()
    except queue.Empty:
        return None


def _pause_mode(method: str, args: tuple) -> str | None:
    """The pause mode of a `pause_scheduler(mode, ...)` or `sleep(level, mode)` utility call
    (AsyncMPClient passes them positionally; vLLM's default mode is "abort")."""
    if method == "pause_scheduler":
        return args[0] if args else "abort"
    if method == "sleep":
        return args[1] if len(args) > 1 else "abort"
    return None


def _finished(request_ids: list[str], reason: FinishReason) -> EngineCoreOutputs:
    return EngineCoreOutputs(
        finished_requests=set(request_ids),
        outputs=[EngineCoreOutput(rid, [], finish_reason=reason) for rid in request_ids])


@contextlib.contextmanager
def engine_core_in_this_process():
    """While active, `AsyncLLM` built in this thread gets an `AsyncInprocClient`.

    AsyncLLM has no parameter for its engine-core client: it calls
    `EngineCoreClient.make_async_mp_client`, which this swaps for the duration of one
    construction (Ray Serve LLM builds one engine per replica)."""
    original = EngineCoreClient.__dict__["make_async_mp_client"]

    def make_client(vllm_config, executor_class, log_stats, **kwargs):
        return AsyncInprocClient(vllm_config, executor_class, log_stats, **kwargs)

    EngineCoreClient.make_async_mp_client = staticmethod(make_client)
    try:
        yield
    finally:
        EngineCoreClient.make_async_mp_client = original
