"""tabp_vllm/prometheus.py: sums by label on a real exposition text, and `histogram_quantile`
against a real Prometheus' answer for the same histograms (the edge cases included)."""

from __future__ import annotations

import math
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tabp_vllm import prometheus as prom
from tabp_vllm.process import free_port

# Six histograms, one per model_name, each a case of Prometheus' bucketQuantile: "a" split over
# two replicas (summed by le), "b" with observations beyond the last finite bound (+Inf rule),
# "c" with bounds <= 0, "d" empty, "e" with a count that goes down (taken as flat), "f" whose
# first bucket is empty (q = 0 is 0/0 there).
HISTOGRAMS = {
    ("a", "1"): {0.005: 1, 0.01: 3, 0.05: 10, 0.1: 14, 0.5: 20, 1.0: 21, math.inf: 21},
    ("a", "2"): {0.005: 0, 0.01: 2, 0.05: 2, 0.1: 9, 0.5: 12, 1.0: 15, math.inf: 16},
    ("b", "1"): {1.0: 2, 2.0: 4, 4.0: 5, math.inf: 12},
    ("c", "1"): {-1.0: 2, 0.0: 5, 1.0: 9, math.inf: 10},
    ("d", "1"): {0.1: 0, 1.0: 0, math.inf: 0},
    ("e", "1"): {0.1: 4, 0.2: 3, 0.4: 7, 0.8: 6, math.inf: 10},
    ("f", "1"): {0.25: 0, 0.5: 3, 1.0: 4, math.inf: 4},
}
QS = [-0.5, 0, 0.01, 0.1, 0.25, 0.3, 0.5, 0.75, 0.9, 0.95, 0.99, 1, 1.5]
NAME = "tq_latency_seconds"


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


def exposition() -> str:
    lines = [f"# HELP {NAME} test histograms", f"# TYPE {NAME} histogram"]
    for (model, replica), buckets in HISTOGRAMS.items():
        labels = f'model_name="{model}",replica="{replica}"'
        for bound, count in buckets.items():
            lines.append(f'{NAME}_bucket{{{labels},le="{_le(bound)}"}} {count}')
        lines.append(f"{NAME}_sum{{{labels}}} 1.5")
        lines.append(f"{NAME}_count{{{labels}}} {buckets[math.inf]}")
    lines += ["# HELP tq_tokens_total tokens", "# TYPE tq_tokens_total counter",
              'tq_tokens_total{model_name="a",reason="stop"} 7',
              'tq_tokens_total{model_name="a",reason="length"} 5',
              'tq_tokens_total{model_name="b",reason="stop"} 2',
              'tq_tokens_total{reason="stop"} 1',
              "# HELP tq_kept kept", "# TYPE tq_kept gauge",
              'tq_kept{model_name="a",worker="x"} 26', 'tq_kept{model_name="a",worker="y"} 25']
    return "\n".join(lines) + "\n"


def same(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == y or math.isclose(x, y, rel_tol=1e-12)


def test_sum_max_and_histogram_by_model():
    families = prom.parse(exposition())
    assert prom.sum_by(families, "tq_tokens_total") == {"a": 12, "b": 2, "": 1}
    assert prom.sum_by(families, "tq_tokens_total", where={"reason": "stop"}) == {"a": 7, "b": 2, "": 1}
    assert prom.sum_by(families, "tq_tokens_total", label="reason") == {"stop": 10, "length": 5}
    assert prom.max_by(families, "tq_kept") == {"a": 26}
    h = prom.histogram(families, NAME)
    assert h["a"] == {0.005: 1, 0.01: 5, 0.05: 12, 0.1: 23, 0.5: 32, 1.0: 36, math.inf: 37}
    assert set(h) == {"a", "b", "c", "d", "e", "f"}
    assert prom.histogram(families, NAME, where={"model_name": "b"}) == {"b": HISTOGRAMS["b", "1"]}


def test_histogram_quantile_by_hand():
    b = {1.0: 2, 2.0: 4, 4.0: 5, math.inf: 12}
    assert prom.histogram_quantile(0.25, b) == 1.5     # rank 3: halfway through (1, 2]
    assert prom.histogram_quantile(0.1, b) == pytest.approx(0.6)  # rank 1.2 of 2 in the first bucket (0, 1]
    assert prom.histogram_quantile(0.5, b) == 4.0      # rank 6 is past 4: the largest finite bound
    assert math.isnan(prom.histogram_quantile(0.5, {1.0: 3, 2.0: 4}))  # no +Inf bucket
    assert math.isnan(prom.histogram_quantile(0.5, {}))


def test_histogram_quantile_equals_a_real_prometheus(tmp_path):
    """A real Prometheus scrapes the exposition above; its `histogram_quantile(q, sum by (le,
    model_name) (...))` for every q and model is what ours computes from the same text."""
    if not shutil.which("prometheus"):
        pytest.skip("the 'prometheus' binary is missing (scripts/system-deps.sh installs it)")
    from prometheus_server import Prometheus

    body = exposition().encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    port = free_port(8200, 8300)
    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    server = Prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"], scrape_interval_s=1)
    try:
        deadline = time.monotonic() + 60
        while len(server.query(f"count by (model_name) ({NAME}_bucket)")) < 6:
            assert time.monotonic() < deadline, "Prometheus never scraped the test target"
            time.sleep(0.5)
        ours = prom.histogram(prom.parse(exposition()), NAME)
        wrong = []
        for q in QS:
            theirs = server.query(f"histogram_quantile({q}, sum by (le, model_name) ({NAME}_bucket))")
            assert set(theirs) == set(ours), (q, theirs)
            for model, buckets in ours.items():
                mine = prom.histogram_quantile(q, buckets)
                if not same(mine, theirs[model]):
                    wrong.append((q, model, mine, theirs[model]))
        assert not wrong, wrong
    finally:
        server.stop()
        httpd.shutdown()
