"""One managed child process: start it, wait until it is ready, stop it without orphans.

Every server we start (`tabp-vllm serve`, a vLLM api_server, Prometheus, the eval child) goes
through `ManagedProcess`, so readiness, logs and shutdown behave the same everywhere:

    with ManagedProcess(cmd, "serve.log", name="tabp-vllm serve") as proc:
        proc.wait_ready("http://127.0.0.1:8000/v1/models", deadline_s=600)
        ...                                    # leaving the block stops it (SIGINT, then SIGKILL)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import httpx
import psutil

from tabp_vllm.errors import TabpError


class ManagedProcess:
    """A child in its own session (so one signal reaches all of it), stdout+stderr to a log file."""

    def __init__(self, cmd: list[str], log_path: str | Path, *, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, name: str | None = None):
        self.cmd, self.log_path, self.cwd = list(cmd), Path(log_path), cwd
        self.env = {**os.environ, **(env or {})}
        self.name = name or Path(cmd[0]).name
        self.popen: subprocess.Popen | None = None

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> "ManagedProcess":
        _unwind_on_sigterm()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:  # the child keeps its own copy of the descriptor
            # A new session makes the child a process-group leader: SIGINT to the group is what
            # Ctrl-C in a terminal does, and a terminal's Ctrl-C at *our* prompt does not reach it.
            with _sigint_not_inherited_as_ignored():
                self.popen = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                              env=self.env, cwd=self.cwd, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid  # also its process group and session id

    def poll(self) -> int | None:
        return self.popen.poll() if self.popen else None

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def wait(self, timeout: float | None = None) -> int:
        assert self.popen is not None, "not started"
        return self.popen.wait(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().rstrip().splitlines()[-lines:])

    # ---- readiness --------------------------------------------------------------------------
    def wait_ready(self, url: str | None = None, *, deadline_s: float = 300.0,
                   ready: Callable[[httpx.Response], bool] | None = None,
                   headers: dict[str, str] | None = None, log_line: str | None = None,
                   interval_s: float = 0.5) -> "ManagedProcess":
        """Return once GET `url` answers 200 (and `ready(response)` agrees) and, when given,
        `log_line` is in the log. A process that exits first, or a passed deadline, is one
        TabpError line naming the log."""
        assert url or log_line, "wait for an URL, a log line or both"
        t_end = time.monotonic() + deadline_s
        while True:
            if self.poll() is not None:
                last = self.log_tail(1)[:300]
                raise TabpError(f"{self.name} exited with code {self.returncode} before it was "
                                f"ready{': ' + last if last else ''} (log: {self.log_path})")
            if self._answers(url, ready, headers) and (
                    log_line is None or log_line in self.log_text()):
                return self
            if time.monotonic() > t_end:
                raise TabpError(f"{self.name} was not ready within {deadline_s:.0f} s "
                                f"(log: {self.log_path})")
            time.sleep(interval_s)

    @staticmethod
    def _answers(url, ready, headers) -> bool:
        if url is None:
            return True
        try:
            r = httpx.get(url, headers=headers, timeout=5)
            return r.status_code == 200 and (ready is None or bool(ready(r)))
        except (httpx.HTTPError, ValueError):  # not listening yet; half-written JSON
            return False

    # ---- shutdown ---------------------------------------------------------------------------
    def stop(self, grace_s: float = 30.0) -> list[tuple[int, str]]:
        """SIGINT to the group, wait up to `grace_s` for the whole family to exit, SIGKILL the rest.

        Returns the (pid, name) of the processes that outlived the grace period and were killed:
        empty means the process shut down cleanly on its own.
        """
        if self.popen is None:
            return []
        # Look before signalling: once the leader exits its children are re-parented to init and
        # no longer findable as descendants (Ray's GCS and raylet even start their own sessions).
        family = self._family(set())
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGINT)
        t_end = time.monotonic() + grace_s
        while True:
            self.popen.poll()
            family = self._family(family)  # children born during shutdown count too
            alive = [p for p in family if _alive(p)]
            if (self.popen.returncode is not None and not alive) or time.monotonic() > t_end:
                break
            time.sleep(0.5)
        if alive or self.popen.returncode is None:
            _signal_group(self.pid, signal.SIGKILL)
        left = []
        for p in alive:
            try:
                name = p.name()
                p.kill()  # psutil checks the pid was not reused by an unrelated process
                left.append((p.pid, name))
            except psutil.Error:
                pass
        self.popen.wait(timeout=10)  # reap the leader here: psutil's wait would hide its code
        psutil.wait_procs([p for p in alive if p.pid != self.pid], timeout=10)
        return left

    def _family(self, known: set[psutil.Process]) -> set[psutil.Process]:
        """The leader, everything in its session, everything already known, and their descendants."""
        procs, children = {}, {}
        for p in psutil.process_iter(["ppid"]):  # one pass over /proc: the parent links
            procs[p.pid] = p
            children.setdefault(p.info["ppid"], []).append(p.pid)
        roots = [p.pid for p in known if procs.get(p.pid) == p]  # (== also compares start time)
        if self.popen.returncode is None:  # once reaped, its pid may belong to someone else
            roots.append(self.pid)
        roots += [pid for pid in procs if _session(pid) == self.pid]  # re-parented, same session
        found, seen = set(known), set()
        while roots:
            pid = roots.pop()
            if pid in procs and pid not in seen:
                seen.add(pid)
                found.add(procs[pid])
                roots += children.get(pid, [])
        return found

    def __enter__(self) -> "ManagedProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def lists_models(names) -> Callable[[httpx.Response], bool]:
    """A `ready` check: an OpenAI `/v1/models` answer that lists every one of `names`."""
    want = set(names)

    def check(r: httpx.Response) -> bool:
        doc = r.json()
        return isinstance(doc, dict) and want <= {m.get("id") for m in doc.get("data") or []}

    return check


def _unwind_on_sigterm() -> None:
    """Make SIGTERM (`kill`, a job runner's stop) unwind the stack as Ctrl-C does, so every
    `with ManagedProcess` on the way stops its child: by default SIGTERM ends Python at once and
    the children, in their own sessions, live on as orphans. Only from the main thread, and
    never over a handler someone else installed."""
    import threading

    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        signal.signal(signal.SIGTERM, _raise_exit)


@contextmanager
def _sigint_not_inherited_as_ignored():
    """A command started in the background by a shell (`tabp-vllm serve ... &` in a script, nohup,
    a CI job) ignores SIGINT, and an ignored signal stays ignored across exec: the child would
    not see the SIGINT `stop` sends and would sit out the grace period until SIGKILL. While the
    child is spawned, SIGINT gets a no-op handler here instead (a caught signal is reset to its
    default in the child at exec; this process still ignores it). Only from the main thread."""
    import threading

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN):
        yield
        return
    signal.signal(signal.SIGINT, _ignore)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _ignore(signum, _frame) -> None:
    pass


def _raise_exit(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # the group is already gone
        pass


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def free_port(lo: int, hi: int) -> int:
    """The first port in [lo, hi) that nothing on 127.0.0.1 holds (for a server about to start)."""
    for port in range(lo, hi):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{hi}")
