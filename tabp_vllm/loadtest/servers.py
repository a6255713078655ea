"""Start and stop bare vLLM OpenAI servers (`python -m vllm.entrypoints.openai.api_server`).

Used by the bench script and tests to stand up one variant per process, with the same engine
arguments `tabp_vllm.engine.engine_args_for` gives every other part of the project, and by the
overhead comparison to stand up a plain vLLM server (default loader, no plugin) of the dense model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tabp_vllm.errors import TabpError


def engine_args_to_cli(args: dict[str, Any]) -> list[str]:
    """vLLM engine kwargs -> api_server flags (`model` positional-free, dicts as JSON)."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, (dict, list)):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out


def api_server_command(model: str, port: int, served_name: str, mask=None, bare: bool = False,
                       kv_cache_gib: float = 0.25, max_model_len: int = 1024,
                       host: str = "127.0.0.1", extra: dict[str, Any] | None = None) -> list[str]:
    """The command line of one api_server for (model, mask); `bare` = plain vLLM, dense only."""
    from tabp_vllm.engine import engine_args_for

    args = engine_args_for(model, mask, kv_cache_gib=kv_cache_gib, max_model_len=max_model_len,
                           served_model_name=served_name, extra=extra)
    if bare:
        if mask is not None:
            raise TabpError("a bare vLLM server serves the dense model only")
        for key in ("load_format", "model_loader_extra_config", "hf_overrides"):
            args.pop(key, None)
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", host,
            "--port", str(port), *engine_args_to_cli(args), "--no-enable-log-requests",
            "--disable-uvicorn-access-log"]


class ApiServer:
    """One api_server process in its own process group; a context manager that always stops it."""

    def __init__(self, cmd: list[str], port: int, log_path: str | Path,
                 env: dict[str, str] | None = None):
        self.cmd, self.port, self.log_path = cmd, port, Path(log_path)
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ApiServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        log.close()
        return self

    def wait_ready(self, timeout: float = 300.0) -> "ApiServer":
        t_end = time.time() + timeout
        while time.time() < t_end:
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise TabpError(f"api_server on port {self.port} exited with "
                                f"{self.proc.returncode}: {' | '.join(tail)}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TabpError(f"api_server on port {self.port} not ready after {timeout:.0f} s "
                        f"(log: {self.log_path})")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is our child's pid
        try:
            os.killpg(pgid, signal.SIGINT)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
