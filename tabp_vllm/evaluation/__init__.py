"""Accuracy through lm-evaluation-harness: `evaluate` runs one variant per child process,
`commands` is `tabp-vllm eval`, `options` its options."""
