"""Start and stop bare vLLM OpenAI servers (`python -m vllm.entrypoints.openai.api_server`).

Used by the bench script and tests to stand up one variant per process, with the same engine
arguments `tabp_vllm.engine.engine_args_for` gives every other part of the project, and by the
overhead comparison to stand up a plain vLLM server (default loader, no plugin) of the dense model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tabp_vllm.errors import TabpError
from tabp_vllm.process import ManagedProcess


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
                       kv_cache_gib: float | None = None, max_model_len: int | None = None,
                       host: str = "127.0.0.1", extra: dict[str, Any] | None = None) -> list[str]:
    """The command line of one api_server for (model, mask); `bare` = plain vLLM (its own loader
    and executor), dense only. Ours run vLLM's uni-process executor on a CPU, as `serve` does."""
    from tabp_vllm.engine import DEFAULT_MAX_MODEL_LEN, engine_args_for
    from tabp_vllm.hardware import on_gpu

    args = engine_args_for(model, mask, kv_cache_gib=kv_cache_gib,
                           max_model_len=max_model_len or DEFAULT_MAX_MODEL_LEN,
                           served_model_name=served_name, extra=extra)
    if callable(args.get("hf_overrides")):  # a sublayer mask's (tabp_vllm.engine)
        raise TabpError("a sublayer mask cannot go on an api_server command line (its hf_overrides "
                        "is a Python callable); serve it with `tabp-vllm serve` or an offline engine")
    if not bare and not on_gpu() and args.get("tensor_parallel_size", 1) == 1:
        # One worker on a CPU runs inside the engine core process, as in our offline engines and
        # serve's replicas: vLLM's CPU default spawns a third process that re-imports torch and
        # vLLM (~14 s of a 2-core box's start) and competes with the engine for the cores. The
        # bare server keeps vLLM's defaults: it is the baseline a user of plain vLLM gets.
        args.setdefault("distributed_executor_backend", "uni")
    if bare:
        if mask is not None:
            raise TabpError("a bare vLLM server serves the dense model only")
        for key in ("load_format", "model_loader_extra_config", "hf_overrides"):
            args.pop(key, None)
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", host,
            "--port", str(port), *engine_args_to_cli(args), "--no-enable-log-requests",
            "--disable-uvicorn-access-log"]


class ApiServer:
    """One api_server process (a `ManagedProcess`): ready once `/v1/models` answers."""

    def __init__(self, cmd: list[str], port: int, log_path: str | Path,
                 env: dict[str, str] | None = None):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.process = ManagedProcess(cmd, log_path, env=env, name=f"api_server on port {port}")

    def start(self) -> "ApiServer":
        self.process.start()
        return self

    def wait_ready(self, timeout: float = 300.0) -> "ApiServer":
        # vLLM's api_server binds its port only after the engine is up: HTTP 200 means ready.
        self.process.wait_ready(f"{self.url}/v1/models", deadline_s=timeout, interval_s=1.0)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.process.stop(grace_s=timeout)

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
