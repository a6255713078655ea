from tabp_vllm.cli import app

app()
