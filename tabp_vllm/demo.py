"""`make demo`: the main job end to end on the embedded defaults.

1. score the demo model's blocks with TaBP on the bundled (generated) calibration set -> a mask;
2. `tabp-vllm serve` the dense model and the pruned variant behind one OpenAI endpoint;
3. ask both the same question through the official `openai` client;
4. read the per-variant counters from the server's Prometheus endpoint; stop the server cleanly.

Each step runs the real `tabp-vllm` command, so the demo shows what a user would type.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console

console = Console()
OUT = Path(os.environ.get("TABP_VLLM_DEMO_OUT", "out/demo"))
PORT, METRICS_PORT = 8000, 8090
CLI = [sys.executable, "-m", "tabp_vllm"]


def step(title: str) -> None:
    console.rule(f"[bold cyan]{title}")


def wait_ready(server: subprocess.Popen, log_path: Path, timeout_s: float = 600) -> str:
    """Wait for the server's READY line (printed once every variant's engine is up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if "\nREADY" in text:
            return text
        if server.poll() is not None:
            raise SystemExit(f"error: the server exited with code {server.returncode}; "
                             f"see {log_path}")
        time.sleep(2)
    raise SystemExit(f"error: the server was not ready within {timeout_s:.0f} s; see {log_path}")


def main() -> int:
    from openai import OpenAI

    OUT.mkdir(parents=True, exist_ok=True)
    mask = OUT / "demo.json"

    step("1. score: TaBP (SSN over entropy) on the bundled calibration set, remove k=4 blocks")
    subprocess.run(CLI + ["score", "--model", "llama", "--task", "demo", "--method", "tabp",
                          "--k", "4", "--samples", "64", "-o", str(mask)], check=True)
    subprocess.run(CLI + ["masks", "show", str(mask)], check=True)

    step("2. serve: dense + pruned, one OpenAI endpoint (Ray Serve + vLLM)")
    log = open(OUT / "serve.log", "w")
    server = subprocess.Popen(
        CLI + ["serve", "--model", "llama", "--task-mask", str(mask), "--port", str(PORT),
               "--metrics-port", str(METRICS_PORT), "--kv-cache-gib", "0.25",
               "--max-model-len", "1024"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        text = wait_ready(server, OUT / "serve.log")
        lines = text.splitlines()
        first = next(i for i, ln in enumerate(lines) if "tabp-vllm serve:" in ln)
        last = next(i for i, ln in enumerate(lines) if ln.startswith("metrics:"))
        print("\n".join(lines[first:last + 1]))

        step("3. the same question to both variants (openai client, greedy)")
        client = OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="unused")
        question = [{"role": "user", "content": "What is the capital of France?"}]
        for m in client.models.list().data:
            reply = client.chat.completions.create(model=m.id, messages=question, max_tokens=32,
                                                   temperature=0)
            meta = (m.model_extra or {}).get("metadata", {})
            console.print(f"[bold]{m.id}[/] (blocks kept {meta.get('blocks_kept')}/"
                          f"{meta.get('blocks_total')}): [green]{reply.choices[0].message.content}")

        step("4. Prometheus metrics, per variant")
        wanted = ("ray_vllm_request_success_total", "ray_vllm_generation_tokens_total",
                  "ray_tabp_variant_blocks_kept", "ray_tabp_variant_theoretical_speedup")
        deadline = time.monotonic() + 60
        lines: list[str] = []
        while time.monotonic() < deadline:  # Ray exports metrics every few seconds
            text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
            lines = [ln for ln in text.splitlines() if ln.startswith(wanted)]
            if any(ln.startswith(wanted[0]) for ln in lines) and any(
                    ln.startswith(wanted[2]) for ln in lines):
                break
            time.sleep(3)
        for ln in lines:
            console.print("  " + ln.split("{")[0] + " {model_name=" +
                          ln.split('model_name="')[1].split('"')[0] + "} " + ln.rsplit(" ", 1)[1]
                          if 'model_name="' in ln else "  " + ln)
        console.print(f"\nmask: {mask}   server log: {OUT / 'serve.log'}")
    finally:
        step("5. stop (Ctrl-C)")
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()
        console.print(f"server exited with code {server.returncode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
