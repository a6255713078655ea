"""Serving benchmarks: FLOPs ideal, load generator, reports (`tabp-vllm bench`)."""
