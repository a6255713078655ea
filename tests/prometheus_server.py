"""A real Prometheus for the tests: scrapes the given targets every `scrape_interval_s`, answers
PromQL through its HTTP API (the `prometheus` binary: scripts/system-deps.sh installs it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tabp_vllm.process import ManagedProcess, free_port


def require_prometheus() -> None:
    """Fail the test (a CI machine must have it) when the binary is missing."""
    if not shutil.which("prometheus"):
        pytest.fail("the 'prometheus' binary is missing: run scripts/system-deps.sh")


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str], scrape_interval_s: float = 2):
        self.port = free_port(9090, 9100)
        self.base = f"http://127.0.0.1:{self.port}"
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        every = f"{scrape_interval_s:g}s"
        (self.dir / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: {every}\n  evaluation_interval: {every}\n"
            "scrape_configs:\n  - job_name: tabp\n    static_configs:\n"
            f"      - targets: {list(targets)!r}\n")
        self.proc = ManagedProcess(
            ["prometheus", f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], self.dir / "log").start()
        self.proc.wait_ready(f"{self.base}/-/ready", deadline_s=60)

    def query(self, expr: str, by: str = "model_name") -> dict[str, float]:
        """An instant query's vector: {value of label `by` ("" if absent): value}."""
        r = httpx.get(f"{self.base}/api/v1/query", params={"query": expr}, timeout=10)
        r.raise_for_status()
        return {item["metric"].get(by, ""): float(item["value"][1])
                for item in r.json()["data"]["result"]}

    def stop(self) -> None:
        self.proc.stop(grace_s=30)
