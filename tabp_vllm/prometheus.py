"""Reading a Prometheus text endpoint: scrape it, add a metric up by label, a histogram's quantile.

`tabp-vllm serve` exports everything (vLLM's `ray_vllm_*`, Ray Serve's, our `ray_tabp_*`) on Ray's
metrics port, each series split by labels Ray adds (worker, replica, finished reason...). The demo,
the tests and the benchmarks all want the same few views of it, per variant:

    families = scrape("http://127.0.0.1:8090/metrics")
    sum_by(families, "ray_vllm_generation_tokens_total")          # {"llama": 512.0, ...}
    buckets = histogram(families, "ray_tabp_routing_latency_seconds")["llama-gsm8k"]
    histogram_quantile(0.5, buckets)                               # seconds, as PromQL says

`histogram_quantile` follows Prometheus' own (promql/quantile.go: `bucketQuantile`), so a number
computed here from one scrape is the number a dashboard shows; tests/test_prometheus.py checks it
against a real Prometheus.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import httpx
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

Families = Iterable[Metric]


def parse(text: str) -> list[Metric]:
    """The metric families of a Prometheus text exposition (prometheus-client's parser)."""
    return list(text_string_to_metric_families(text))


def scrape(url: str, timeout: float = 30.0) -> list[Metric]:
    """GET a /metrics endpoint and parse it; an HTTP error status raises `httpx.HTTPStatusError`."""
    r = httpx.get(url, timeout=timeout)
    r.raise_for_status()
    return parse(r.text)


def _by(families: Families, sample: str, label: str, where: Mapping[str, str] | None,
        merge: Callable[[float, float], float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in families:
        for s in family.samples:
            if s.name != sample or any(s.labels.get(k) != v for k, v in (where or {}).items()):
                continue
            key = s.labels.get(label, "")  # a series without the label: under ""
            out[key] = merge(out[key], s.value) if key in out else s.value
    return out


def sum_by(families: Families, sample: str, label: str = "model_name",
           where: Mapping[str, str] | None = None) -> dict[str, float]:
    """PromQL's `sum by (label) (sample{where})`: the samples named `sample` (a counter's is
    `<name>_total`), added up over every other label, per value of `label`."""
    return _by(families, sample, label, where, lambda a, b: a + b)


def max_by(families: Families, sample: str, label: str = "model_name",
           where: Mapping[str, str] | None = None) -> dict[str, float]:
    """PromQL's `max by (label) (sample{where})`: for a gauge that several processes report
    (each replica its own copy of the same value)."""
    return _by(families, sample, label, where, max)


def histogram(families: Families, name: str, label: str = "model_name",
              where: Mapping[str, str] | None = None) -> dict[str, dict[float, float]]:
    """`sum by (le, label) (name_bucket{where})`: per value of `label`, the cumulative count of
    each bucket {upper bound: count}, the +Inf bucket included."""
    out: dict[str, dict[float, float]] = {}
    for family in families:
        for s in family.samples:
            if s.name != f"{name}_bucket" or any(s.labels.get(k) != v
                                                  for k, v in (where or {}).items()):
                continue
            buckets = out.setdefault(s.labels.get(label, ""), {})
            le = float(s.labels["le"])
            buckets[le] = buckets.get(le, 0.0) + s.value
    return out


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float:
    """The q-quantile of cumulative bucket counts {upper bound: count}, as PromQL's
    `histogram_quantile` computes it: linear interpolation inside the bucket the rank falls in
    (the first bucket starts at 0, unless its upper bound is <= 0: then that bound); a rank in
    the +Inf bucket gives the largest finite upper bound. NaN where Prometheus says NaN: no +Inf
    bucket, fewer than two buckets, no observations. q < 0 is -Inf, q > 1 is +Inf."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]) or len(bounds) < 2:
        return math.nan
    counts, highest = [], -math.inf
    for le in bounds:  # counts that go down (a scrape mid-update) are taken as flat, as Prometheus does
        highest = max(highest, buckets[le])
        counts.append(highest)
    observations = counts[-1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = next((i for i, c in enumerate(counts[:-1]) if c >= rank), len(counts) - 1)
    if b == len(counts) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start, end, count = 0.0, bounds[b], counts[b]
    if b > 0:
        start = bounds[b - 1]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    if count == 0:  # only q = 0 over an empty first bucket: Go's 0/0
        return math.nan
    return start + (end - start) * (rank / count)
