"""`python -m tabp_vllm.serve ...` == `tabp-vllm serve ...` (until it is wired into the CLI)."""

import typer

from tabp_vllm.serve.commands import serve

if __name__ == "__main__":
    typer.run(serve)
