"""The `tabp-vllm` command line: it only registers the commands, which live in their feature
packages (each turns a `TabpError`, bad input, into one line on stderr and exit code 2).

    setup-model, generate   models_commands.py       masks ...   masks_commands.py
    score                   scoring/commands.py      eval        evaluation/commands.py
    serve                   serve/commands.py        route ...   routing/commands.py
    bench                   loadtest/commands.py     vllm-bench  loadtest/vllm_bench.py
    synth-model             synth.py
"""

from __future__ import annotations

import typer

from tabp_vllm.evaluation.commands import eval as eval_command
from tabp_vllm.loadtest.commands import bench
from tabp_vllm.loadtest.vllm_bench import vllm_bench_command
from tabp_vllm.masks_commands import masks_app
from tabp_vllm.models_commands import generate, setup_model
from tabp_vllm.routing.commands import route_app
from tabp_vllm.scoring.commands import score
from tabp_vllm.serve.commands import serve
from tabp_vllm.synth import synth_model_command

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Task-aware block pruning for vLLM: score, serve, bench, eval.")
app.command("setup-model")(setup_model)
app.command("generate")(generate)
app.add_typer(masks_app, name="masks")
app.command("score")(score)
app.command("eval")(eval_command)
app.command("serve")(serve)
app.command("bench")(bench)
app.command("synth-model")(synth_model_command)
# Every argument, --help included, goes to vLLM's own parser.
app.command("vllm-bench", add_help_option=False, context_settings={
    "allow_extra_args": True, "ignore_unknown_options": True})(vllm_bench_command)
app.add_typer(route_app, name="route")

if __name__ == "__main__":
    app()
