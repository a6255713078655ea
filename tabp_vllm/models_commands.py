"""`tabp-vllm setup-model` and `tabp-vllm generate`: the model itself, fetched and run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from tabp_vllm.errors import user_errors

console = Console()


@user_errors
def setup_model(model: str = typer.Argument("llama", help="Alias, HF id or path.")) -> None:
    """Fetch and convert the demo model (idempotent); print the checkpoint path."""
    from tabp_vllm.models import resolve_model

    print(resolve_model(model))


@user_errors
def generate(
    prompt: str = typer.Argument("The three primary colors are"),
    model: str = typer.Option("llama", "--model", "-m"),
    task_mask: Optional[Path] = typer.Option(None, "--task-mask"),
    max_tokens: int = typer.Option(32, "--max-tokens"),
) -> None:
    """Greedy completion from the (pruned) model through the vLLM engine the server uses."""
    from tabp_vllm.engine import build_llm
    from tabp_vllm.mask import load_mask
    from tabp_vllm.models import resolve_model

    resolved = resolve_model(model)
    mask = load_mask(task_mask, resolved) if task_mask else None
    from vllm import SamplingParams

    llm = build_llm(resolved, mask)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens))[0]
    kept = f"{mask.num_kept}/{mask.num_hidden_layers}" if mask else "all"
    console.print(f"[bold]blocks kept {kept}[/] :: {prompt}[green]{out.outputs[0].text}[/]")
