"""`tabp-vllm serve`: dense + pruned variants of one checkpoint behind one Ray Serve LLM app."""
