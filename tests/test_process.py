"""ManagedProcess against tiny real servers: ready over HTTP, one-line errors, no orphans."""

from __future__ import annotations

import json
import signal
import socket
import sys
import time

import psutil
import pytest

from tabp_vllm.errors import TabpError
from tabp_vllm.process import ManagedProcess, lists_models

# A static HTTP server (cwd = tmp_path). Modes: "grandchild" spawns a sleeper in its own session
# (as Ray's GCS/raylet do) before listening; "orphan" spawns a sleeper in *our* session and exits
# (as a killed eval child leaves its engine core); "stubborn" ignores SIGINT.
CHILD = r"""
import http.server, os, signal, subprocess, sys
port, mode = int(sys.argv[1]), sys.argv[2]
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
if mode in ("grandchild", "orphan"):
    g = subprocess.Popen(sleeper, start_new_session=(mode == "grandchild"))
    open("grandchild.pid", "w").write(str(g.pid))
if mode == "orphan":
    os._exit(0)
def on_sigint(*_):
    open("sigint", "w").close()  # proof that Ctrl-C came first
    if mode != "stubborn":
        os._exit(0)
signal.signal(signal.SIGINT, on_sigint)
print("listening", flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(tmp_path, mode="plain", cmd=None) -> tuple[ManagedProcess, str]:
    port = free_port()
    cmd = cmd or [sys.executable, "-c", CHILD, str(port), mode]
    return (ManagedProcess(cmd, tmp_path / "logs" / "child.log", cwd=tmp_path, name="child"),
            f"http://127.0.0.1:{port}")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_ready_over_http_then_sigint_stops_it(tmp_path):
    (tmp_path / "models.json").write_text(json.dumps({"data": [{"id": "a"}, {"id": "b"}]}))
    proc, url = child(tmp_path)
    with proc:
        proc.wait_ready(url + "/models.json", deadline_s=30, ready=lists_models(["a", "b"]),
                        log_line="listening")
        pid = proc.pid
        assert proc.poll() is None and proc.returncode is None
    assert (tmp_path / "sigint").exists()
    assert proc.returncode == 0 and gone(pid)
    assert "listening" in proc.log_tail()


def test_stop_kills_a_grandchild_in_its_own_session(tmp_path):
    proc, url = child(tmp_path, "grandchild")
    proc.start()
    try:
        proc.wait_ready(url, deadline_s=30)
        grandchild = int((tmp_path / "grandchild.pid").read_text())
        assert psutil.Process(grandchild).is_running()
    finally:
        left = proc.stop(grace_s=1)
    assert (tmp_path / "sigint").exists()  # SIGINT first: the child itself exited on it
    assert proc.returncode == 0
    assert [pid for pid, _ in left] == [grandchild]  # the session-less sleeper had to be killed
    assert gone(proc.pid) and gone(grandchild)


def test_sigkill_after_the_grace_period(tmp_path):
    proc, url = child(tmp_path, "stubborn")
    with proc:
        proc.wait_ready(url, deadline_s=30)
        left = proc.stop(grace_s=0.5)
    assert (tmp_path / "sigint").exists()
    assert [pid for pid, _ in left] == [proc.pid] and proc.returncode == -9
    assert proc.stop() == []  # a second stop is a no-op


def test_stop_after_exit_finds_the_orphan_in_its_session(tmp_path):
    proc, _ = child(tmp_path, "orphan")
    proc.start()
    assert proc.wait(timeout=30) == 0
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    assert not gone(grandchild)
    assert [pid for pid, _ in proc.stop(grace_s=0.5)] == [grandchild]
    assert gone(grandchild)


def test_passed_deadline_is_one_line(tmp_path):
    proc, url = child(tmp_path, cmd=[sys.executable, "-c", "import time; time.sleep(60)"])
    with proc, pytest.raises(TabpError) as exc:
        proc.wait_ready(url, deadline_s=1)
    msg = str(exc.value)
    assert "\n" not in msg and "child was not ready within 1 s" in msg
    assert str(proc.log_path) in msg


def test_unmet_ready_check_is_a_passed_deadline(tmp_path):
    (tmp_path / "models.json").write_text(json.dumps({"data": [{"id": "a"}]}))
    proc, url = child(tmp_path)
    with proc, pytest.raises(TabpError, match="not ready within"):
        proc.wait_ready(url + "/models.json", deadline_s=2, ready=lists_models(["a", "b"]))


def test_early_exit_is_one_line_naming_the_log(tmp_path):
    code = "import sys; print('loading'); sys.exit('error: no such model')"
    proc, url = child(tmp_path, cmd=[sys.executable, "-c", code])
    with proc, pytest.raises(TabpError) as exc:
        proc.wait_ready(url, deadline_s=30)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("child exited with code 1 before it was ready")
    assert "error: no such model" in msg and f"(log: {proc.log_path})" in msg


# A parent that runs a sleeper through ManagedProcess and is then stopped with SIGTERM (`kill`,
# a job runner's stop), not Ctrl-C.
PARENT = r"""
import sys, time
from tabp_vllm.process import ManagedProcess
with ManagedProcess([sys.executable, "-c", "import time; time.sleep(600)"], "child.log") as p:
    open("child.pid", "w").write(str(p.pid))
    time.sleep(600)
"""


def test_sigterm_to_the_parent_stops_the_child_too(tmp_path):
    import subprocess

    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=tmp_path)
    pid_file = tmp_path / "child.pid"
    t_end = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < t_end:
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    assert not gone(pid)
    parent.terminate()
    assert parent.wait(timeout=60) == 128 + 15  # SIGTERM unwound the stack: exit code 143
    assert gone(pid)  # the `with` block stopped the child on the way out


def sigint_ignored(pid: int) -> bool:
    mask = next(ln for ln in open(f"/proc/{pid}/status") if ln.startswith("SigIgn:"))
    return bool(int(mask.split()[1], 16) & (1 << (signal.SIGINT - 1)))


def test_child_of_a_background_command_still_stops_on_sigint(tmp_path):
    """Started from a shell in the background, this process ignores SIGINT; its child must not
    inherit that, or `stop` would wait out the grace period and SIGKILL it."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = ManagedProcess(sleeper, tmp_path / "child.log").start()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # ours is as it was
    finally:
        signal.signal(signal.SIGINT, old)
    time.sleep(0.5)
    assert not sigint_ignored(proc.pid)
    t0 = time.monotonic()
    assert proc.stop(grace_s=30) == []  # exited on SIGINT: nothing left to kill
    assert time.monotonic() - t0 < 10 and proc.returncode == -signal.SIGINT
