"""The tabp gauges, exported on the same scrape target as vLLM's and Ray Serve's metrics.

Engine metrics come from vLLM (Ray Serve LLM installs vLLM's `RayPrometheusStatLogger`, so they
appear as `ray_vllm_*{model_name=<variant>}` on Ray's metrics export port); request counts per
deployment come from Ray Serve (`ray_serve_*`). What neither knows is the pruning itself: these
gauges, created with `ray.util.metrics` (exported by Ray's Prometheus exporter as `ray_tabp_*`).
"""

from __future__ import annotations

from typing import Any

# gauge name -> (the variant metadata key it shows, its description)
GAUGES = {
    "tabp_variant_blocks_kept": ("blocks_kept", "Decoder blocks the variant keeps"),
    "tabp_variant_blocks_total": ("blocks_total", "Decoder blocks of the dense checkpoint"),
    "tabp_variant_theoretical_speedup": ("theoretical_speedup",
                                         "Dense / variant FLOPs per decode step (ideal speedup)"),
    "tabp_variant_attention_kept": ("attention_kept", "Attention sublayers the variant serves"),
    "tabp_variant_mlp_kept": ("mlp_kept", "MLP sublayers the variant serves"),
    "tabp_variant_kv_bytes_per_token": ("kv_bytes_per_token",
                                        "KV cache bytes a token takes (K and V of the attention kept)"),
    "tabp_variant_kv_cache_tokens": ("kv_cache_tokens",
                                     "Tokens the variant's KV cache holds (estimate: cache bytes / "
                                     "KV bytes per token, whole blocks)"),
}
INFO = "tabp_variant_info"
TAGS = ("model_name",)


REFRESH_S = 5.0


def publish_variant_gauges(variant_metadata: dict[str, dict[str, Any]],
                           refresh_s: float | None = REFRESH_S) -> dict[str, Any]:
    """Create and set the gauges (call in a long-lived Ray actor: the ingress replica).

    Ray's exporter drops a gauge series that has not been set for two report intervals, so a
    daemon thread sets them again every `refresh_s` seconds for the life of the process.
    """
    import threading
    import time

    from ray.util.metrics import Gauge

    gauges = {name: Gauge(name, description=desc, tag_keys=TAGS)
              for name, (_, desc) in GAUGES.items()}
    info = Gauge(INFO, description="1 per variant; labels carry task and mask hash",
                 tag_keys=("model_name", "task", "mask_hash"))

    def set_all() -> None:
        for name, meta in variant_metadata.items():
            for gauge, (key, _) in GAUGES.items():
                if meta.get(key) is not None:  # no KV cache size: a GPU engine sizes its own
                    gauges[gauge].set(meta[key], tags={"model_name": name})
            info.set(1, tags={"model_name": name, "task": meta.get("task") or "dense",
                              "mask_hash": meta.get("mask_hash") or "dense"})

    set_all()
    if refresh_s:
        def loop() -> None:
            while True:
                time.sleep(refresh_s)
                set_all()

        threading.Thread(target=loop, name="tabp-gauges", daemon=True).start()
    gauges[INFO] = info
    return gauges


# Seconds from a routed request's arrival to its variant being chosen (queueing for the encoder,
# embedding, nearest centroid).
ROUTING_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]


class RoutingMetrics:
    """`tabp_routed_requests` (counter per routed name, nearest cluster, serving variant and
    `fallback`: "1" when the input was past the router's fallback radius and the fallback mask's
    variant served it, else "0") and `tabp_routing_latency_seconds` (histogram per routed name),
    exported as `ray_tabp_*`."""

    def __init__(self):
        from ray.util.metrics import Counter, Histogram

        self.requests = Counter("tabp_routed_requests",
                                description="Requests to a routed model, by cluster and the variant that served them",
                                tag_keys=("routed_name", "cluster", "model_name", "fallback"))
        self.latency = Histogram("tabp_routing_latency_seconds",
                                 description="Time to choose a routed request's variant",
                                 boundaries=ROUTING_BUCKETS, tag_keys=("routed_name",))

    def record(self, routed_name: str, route) -> None:
        self.requests.inc(1, tags={"routed_name": routed_name, "cluster": str(route.cluster),
                                   "model_name": route.variant, "fallback": "1" if route.fallback else "0"})
        self.latency.observe(route.seconds, tags={"routed_name": routed_name})
