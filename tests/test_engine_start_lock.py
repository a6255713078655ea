"""The engine-start lock that engines sharing one GPU start under (`hardware.engine_start_lock`),
and the served engine class that takes it (`serve.app.TabpLLMServer`), without a GPU: the lock is
a file lock between processes, and the engine start it wraps is replaced by a probe."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time

import pytest

from tabp_vllm.hardware import ENGINE_START_LOCK_ENV, engine_start_lock
from tabp_vllm.serve.deploy import ENGINE_IN_REPLICA_ENV, SHARED_GPU_ENV, UNIPROC_ENV

# A second process that starts "an engine" under the lock: prints when it has the lock.
CHILD = """
import sys, time
from tabp_vllm.hardware import engine_start_lock
with engine_start_lock(sys.argv[1], log=lambda m: print(m, flush=True)) as waited:
    print(f"started after {waited:.2f}", flush=True)
"""


def held_elsewhere(path) -> bool:
    """Whether another open file description holds the lock (a fresh fd cannot take it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_second_engine_waits_for_the_first(tmp_path):
    lock = tmp_path / "start.lock"
    with engine_start_lock(lock, log=lambda m: None) as waited:
        assert waited < 1 and held_elsewhere(lock)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(lock)], stdout=subprocess.PIPE,
                                 text=True)
        first = child.stdout.readline()
        assert first.startswith("waiting for another engine on this GPU")
        time.sleep(1.0)
        assert child.poll() is None  # still waiting while we hold it
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    assert "engine start lock taken after" in out
    assert float(out.strip().splitlines()[-1].split()[-1]) >= 1.0
    assert not held_elsewhere(lock)


def test_a_holder_that_dies_releases_it(tmp_path):
    lock = tmp_path / "start.lock"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time\nfrom tabp_vllm.hardware import engine_start_lock\n"
                               "with engine_start_lock(sys.argv[1]):\n"
                               "    print('held', flush=True); time.sleep(600)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert held_elsewhere(lock)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with engine_start_lock(lock, log=lambda m: None) as waited:  # no wait on a dead holder
        assert waited < 1


@pytest.fixture()
def engine_cls(monkeypatch, tmp_path):
    """The served engine class with Ray Serve LLM's engine start replaced by a probe that records
    whether the lock was held (by this process) and which executor the config asked for."""
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
    from vllm.v1.engine.core_client import EngineCoreClient

    from tabp_vllm.serve.app import _tabp_engine_cls

    lock = tmp_path / "start.lock"
    monkeypatch.setenv(ENGINE_START_LOCK_ENV, str(lock))
    monkeypatch.delenv(ENGINE_IN_REPLICA_ENV, raising=False)
    seen = []
    vllms_client = EngineCoreClient.__dict__["make_async_mp_client"]

    def probe(self, engine_args, vllm_config, placement_group):
        seen.append({"locked": held_elsewhere(lock),
                     "backend": vllm_config.parallel_config.distributed_executor_backend})
        if EngineCoreClient.__dict__["make_async_mp_client"] is not vllms_client:
            seen[-1]["client"] = EngineCoreClient.make_async_mp_client.__qualname__
        return "engine"

    monkeypatch.setattr(VLLMEngine, "_start_async_llm_engine", probe)
    cls = _tabp_engine_cls()
    return cls, seen, lock


class _Config:
    def __init__(self, world_size=1):
        self.parallel_config = type("P", (), {"world_size": world_size,
                                              "distributed_executor_backend": "mp"})()


def _start(cls):
    engine = object.__new__(cls)  # no Ray Serve LLM config needed for the start hook
    args = type("A", (), {"distributed_executor_backend": "mp"})()
    return engine._start_async_llm_engine(args, _Config(), None), args


def test_shared_gpu_engine_starts_under_the_lock(engine_cls, monkeypatch):
    cls, seen, lock = engine_cls
    monkeypatch.setenv(SHARED_GPU_ENV, "1")
    monkeypatch.delenv(UNIPROC_ENV, raising=False)
    assert _start(cls)[0] == "engine"
    assert seen == [{"locked": True, "backend": "mp"}]
    assert not held_elsewhere(lock)  # released once the engine is up


def test_cpu_engine_runs_uniproc_without_the_lock(engine_cls, monkeypatch):
    cls, seen, lock = engine_cls
    monkeypatch.delenv(SHARED_GPU_ENV, raising=False)
    monkeypatch.setenv(UNIPROC_ENV, "1")
    _, args = _start(cls)
    assert seen == [{"locked": False, "backend": "uni"}] and args.distributed_executor_backend == "uni"
    monkeypatch.delenv(UNIPROC_ENV)
    _start(cls)
    assert seen[-1] == {"locked": False, "backend": "mp"}  # Ray Serve LLM's own choice stands


def test_cpu_engine_in_replica_gets_the_in_process_client_while_it_starts(engine_cls, monkeypatch):
    from vllm.v1.engine.core_client import EngineCoreClient

    cls, seen, _ = engine_cls
    before = EngineCoreClient.__dict__["make_async_mp_client"]
    monkeypatch.delenv(SHARED_GPU_ENV, raising=False)
    monkeypatch.delenv(UNIPROC_ENV, raising=False)
    monkeypatch.setenv(ENGINE_IN_REPLICA_ENV, "1")
    _, args = _start(cls)
    # the worker in the engine core too (uni), and AsyncLLM's client factory swapped meanwhile
    assert seen == [{"locked": False, "backend": "uni",
                     "client": "engine_core_in_this_process.<locals>.make_client"}]
    assert args.distributed_executor_backend == "uni"
    assert EngineCoreClient.__dict__["make_async_mp_client"] is before  # restored after
    monkeypatch.delenv(ENGINE_IN_REPLICA_ENV)
    _start(cls)
    assert "client" not in seen[-1]
