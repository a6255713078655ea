"""`tabp-vllm serve` as a child process, built from `ServeOptions`: the one way the demo, the tests
and the benchmarks start a server.

    options = ServeOptions(variants=[VariantOptions(mask="gsm8k.json")], port=8000)
    with ServeProcess(options, "out/serve.log") as server:    # returns once the server is READY
        OpenAI(base_url=server.base_url + "/v1", api_key="x").models.list()
        sum_by(scrape(server.metrics_url), "ray_vllm_request_success_total")
    # leaving the block stops it: SIGINT to its process group, as Ctrl-C does (ManagedProcess)

The options are validated and resolved (model, masks, router, variant names) here, in the parent,
so a wrong option fails at construction with the command's own error line. The child reads them
from a config file written next to its log (`serve --config`, the same keys as
examples/serve.yaml): no flag name is spelled out here, so a renamed flag cannot break a caller.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from tabp_vllm.errors import TabpError
from tabp_vllm.process import ManagedProcess
from tabp_vllm.serve.options import ServeOptions

READY = "READY"  # `serve` prints a line starting with it once every variant can answer
LOG_TAIL_LINES = 30


class ServeProcess:
    """One `tabp-vllm serve` child: `start`, `wait_ready`, `stop` (or a `with` block for all three).

    `env` adds to this process' environment; `cwd` is the child's working directory (relative mask,
    router and log paths in `options` are taken from this process' working directory, as the CLI
    would take them from the shell's). The child's console goes to `log_path`; Ray's and vLLM's
    records, unless `options` says otherwise, beside it (`records_path`: serve.log -> serve.ray.log)
    rather than in a file shared by every server on that port."""

    def __init__(self, options: ServeOptions, log_path: str | Path, *,
                 env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 ready_timeout_s: float = 900.0, stop_grace_s: float = 120.0):
        from tabp_vllm.serve.spec import ServeSpec

        if not isinstance(options, ServeOptions):
            raise TypeError(f"ServeProcess needs ServeOptions, got {type(options).__name__}")
        self.spec = ServeSpec.from_options(options)  # every mask and the router checked here
        self.log_path = Path(log_path)
        if options.log_file is None and not options.verbose:
            options = options.model_copy(update={"log_file": str(self.log_path.with_suffix(".ray.log"))})
        self.options = options
        self.config_path = self.log_path.with_suffix(".config.yaml")
        self.ready_timeout_s, self.stop_grace_s = ready_timeout_s, stop_grace_s
        cmd = [sys.executable, "-m", "tabp_vllm", "serve", "--config", str(self.config_path)]
        self.proc = ManagedProcess(cmd, self.log_path, env=env, cwd=cwd, name="tabp-vllm serve")
        self.left: list[tuple[int, str]] | None = None  # what `stop` had to kill

    # ---- where it answers -------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """http://HOST:PORT (a wildcard host is reached on 127.0.0.1); the OpenAI API is under /v1."""
        host = self.options.host
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{self.options.port}"

    @property
    def metrics_url(self) -> str | None:
        """Ray's Prometheus export of a local Ray; None on a joined cluster (`address`), whose
        export port(s) `serve` does not choose."""
        return None if self.options.address else f"http://127.0.0.1:{self.options.metrics_port}/metrics"

    @property
    def variant_names(self) -> list[str]:
        """The served variants (dense first, as the server lists them), without the routed name."""
        return [v.name for v in self.spec.variants]

    @property
    def routed_name(self) -> str | None:
        return self.spec.routed.name if self.spec.routed else None

    @property
    def model_names(self) -> list[str]:
        """Every name /v1/models lists: the variants and the routed name."""
        return self.variant_names + ([self.routed_name] if self.routed_name else [])

    @property
    def headers(self) -> dict[str, str]:
        """What a plain HTTP client sends: the API key, when the server requires one."""
        return {"Authorization": f"Bearer {self.options.api_key}"} if self.options.api_key else {}

    def openai_client(self, **kw: Any):
        """The official `openai` client for this server (its keyword arguments pass through)."""
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key=self.options.api_key or "unused", **kw)

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> "ServeProcess":
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        # 0600 from the start (a new file: an old one keeps its mode): it may hold the API key
        self.config_path.unlink(missing_ok=True)
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(config_yaml(self.options))
        self.proc.start()
        return self

    def wait_ready(self) -> "ServeProcess":
        """Return once the child printed its READY line; if it exits first or `ready_timeout_s`
        passes, one TabpError with the end of its log."""
        try:
            # "\n": READY at the start of a line (never the first: the dtype line comes before)
            self.proc.wait_ready(log_line="\n" + READY, deadline_s=self.ready_timeout_s, interval_s=1)
        except TabpError as exc:
            records = self.records_path
            where = f"; Ray's and vLLM's records: {records}" if records and records.exists() else ""
            tail = textwrap.indent(self.proc.log_tail(LOG_TAIL_LINES), "  | ")
            raise TabpError(f"{exc}{where}; its log ends:\n{tail}") from None
        return self

    def ready_line(self) -> str | None:
        """The READY line as printed (it may carry the URL), None before it."""
        return next((ln for ln in self.log_text().splitlines() if ln.startswith(READY)), None)

    def stop(self) -> list[tuple[int, str]]:
        """SIGINT to the whole process group (what Ctrl-C does), SIGKILL for what outlives
        `stop_grace_s`; returns the (pid, name) of the processes that had to be killed. Only the
        first call stops; later ones return the same list."""
        if self.left is None:
            self.left = self.proc.stop(grace_s=self.stop_grace_s)
        return self.left

    @property
    def records_path(self) -> Path | None:
        """Where the child writes Ray's and vLLM's log records (None: `verbose`, in its log)."""
        return None if self.options.verbose else Path(self.options.log_file)

    @property
    def pid(self) -> int:
        """The child's pid: also its process group and session id."""
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def log_text(self) -> str:
        return self.proc.log_text()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return self.proc.log_tail(lines)

    def __enter__(self) -> "ServeProcess":
        self.start()
        try:
            return self.wait_ready()
        except BaseException:  # a child that is not ready (or Ctrl-C while waiting) is stopped too
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def config_yaml(options: ServeOptions) -> str:
    """`options` as a `serve --config` file: every key; mask, router and log file paths made
    absolute (`serve` would take the first two relative to the file, the last to its cwd)."""
    import yaml

    doc = options.model_dump(mode="json")
    for v in doc["variants"]:
        v["mask"] = str(Path(v["mask"]).expanduser().resolve())
    for key in ("router", "log_file"):
        if doc.get(key):
            doc[key] = str(Path(doc[key]).expanduser().resolve())
    return "# written by tabp_vllm.serve.launcher; the keys of examples/serve.yaml\n" + yaml.safe_dump(
        doc, sort_keys=False)
