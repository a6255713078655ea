"""tabp-vllm: task-aware block pruning for vLLM serving."""

__version__ = "0.1.0"
