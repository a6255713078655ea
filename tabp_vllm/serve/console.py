"""What `serve` shows a person: its own lines on the terminal, everything Ray and vLLM log in a file.

Once Ray starts, the driver's output fills with other processes' records: every replica's vLLM
start-up lines, "Triton is installed ..." JSON records, Ray Serve's controller and proxy lines,
access logs, warnings. They reach the terminal by three roads: Ray's log streaming
(`log_to_driver`, printed by a thread of the driver), Python loggers' handlers made before we
could touch them, and C code writing to file descriptors 1 and 2. One place catches all three:
the descriptors. While Ray runs, `ServeConsole` points fds 1 and 2 at the log file and keeps
duplicates of the terminal's for `serve`'s own lines (the request path, one line per variant
ready, the variants table, READY, shutdown). With `verbose` it changes nothing (Ray's and vLLM's
records on the terminal, as before). An error that ends `serve` leaves after the descriptors are
restored, so its one line reaches the terminal.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Optional


def default_log_file(port: int) -> Path:
    """Where a server on `port` writes Ray's and vLLM's records (one file per port, rewritten at
    each start)."""
    return Path(tempfile.gettempdir()) / "tabp-vllm" / f"serve-{port}.log"


class ServeConsole:
    """`with ServeConsole(path) as console:` Ray's and vLLM's output goes to `path` inside the
    block; `console.say(...)` / `console.out` reach the terminal (`console.warn` its stderr)."""

    def __init__(self, log_file: Optional[Path], verbose: bool = False):
        self.log_file = None if verbose else Path(log_file) if log_file else None
        self.out: IO[str] = sys.stdout
        self.err: IO[str] = sys.stderr
        self._saved: list[int] = []

    def __enter__(self) -> "ServeConsole":
        if self.log_file is None:
            return self
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = [os.dup(1), os.dup(2)]
        # line-buffered: every `say` reaches the terminal (or the launcher's pipe) at once
        self.out = os.fdopen(os.dup(self._saved[0]), "w", buffering=1, encoding="utf-8")
        self.err = os.fdopen(os.dup(self._saved[1]), "w", buffering=1, encoding="utf-8")
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        return self

    def __exit__(self, *exc) -> None:
        if not self._saved:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved = []
        self.out.close()
        self.err.close()
        self.out, self.err = sys.stdout, sys.stderr

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def warn(self, line: str) -> None:
        print(line, file=self.err, flush=True)


def print_table(spec, out: IO[str] | None = None) -> None:
    """The variants table, the routes, the endpoints and the metrics URL, on `out` (stdout)."""
    from rich.console import Console
    from rich.table import Table

    from tabp_vllm.hardware import on_gpu
    from tabp_vllm.memory import GiB

    out = out or sys.stdout
    base = f"http://{spec.host}:{spec.port}"
    gpu = on_gpu()
    memory = {} if gpu else spec.cpu_memory_estimate()[1]
    weights = {n.name: n.weight_bytes * n.replicas for n in spec.engine_needs(gpu=gpu)}
    kv = spec.kv_cache(gpu)
    table = Table("variant", "task", "blocks kept", "attn/mlp", "speedup*", "mask hash",
                  "replicas", "weights", "KV B/token", "KV tokens***",
                  *(["memory**"] if memory else []),
                  title=f"tabp-vllm serve: {spec.model_alias} ({spec.model})")
    for v in spec.variants:
        tokens = kv[v.name]["kv_cache_tokens"]
        table.add_row(v.name, v.task or "(dense)", f"{v.blocks_kept}/{v.blocks_total}",
                      f"{v.attention_kept}/{v.mlp_kept}",
                      f"{v.theoretical_speedup:.3f}", v.mask_hash or "-", str(v.replicas),
                      f"{weights[v.name] / GiB:.2f} GiB", f"{kv[v.name]['kv_bytes_per_token']:,}",
                      f"{tokens:,}" if tokens is not None else "(engine's)",
                      *([f"{memory[v.name] / GiB:.2f} GiB"] if memory else []))
    total = spec.cpu_memory_estimate()[0] if memory else None
    table.add_section()
    table.add_row("total", "", "", "", "", "", str(sum(v.replicas for v in spec.variants)),
                  f"{sum(weights.values()) / GiB:.2f} GiB", "", "",
                  *([f"{total / GiB:.2f} GiB"] if memory else []))
    console = Console(file=out, width=None if out.isatty() else 150)  # a file: no wrapped cells
    console.print(table)
    if spec.routed:
        r = spec.routed
        routes = ", ".join(f"cluster {c} -> {name}" for c, name in enumerate(r.cluster_variants))
        if r.fallback_variant:
            routes += f", far from every centroid (fallback) -> {r.fallback_variant}"
        print(f"routed:    {r.name} ({len(r.cluster_variants)} clusters, encoder {r.encoder}): "
              f"{routes}", file=out)
    print(f"endpoints: {base}/v1/models  {base}/v1/completions  {base}/v1/chat/completions  "
          f"{base}/health" + ("  (Bearer API key required)" if spec.api_key else ""), file=out)
    metrics = (f"http://127.0.0.1:{spec.metrics_port}/metrics" if not spec.address
               else "the Ray cluster's metrics export port(s)")
    print(f"metrics:   {metrics}", file=out)
    console.print("* ideal speedup: dense / variant FLOPs per decode step. Ctrl-C to stop.")
    if memory:
        console.print("** host memory per variant: weights + KV cache + the measured engine and "
                      "Ray overhead (bench/memory.py serve); the total adds Ray's own processes")
    console.print("*** tokens one engine's KV cache holds: its size / KV bytes per token (attention "
                  "sublayers kept), in whole vLLM blocks; the engine's own count is in its log "
                  "(\"KV cache size\")")
    out.flush()
