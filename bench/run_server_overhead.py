"""The multi-variant server against bare vLLM (bench/results/server_overhead.*).

Starts `tabp-vllm serve` (Ray Serve: dense `llama` + `llama-k4` + `llama-k8` from the masks in
bench/results/masks) and a plain vLLM OpenAI server of the same dense model (default loader, no
plugin), then runs `tabp-vllm bench` against both, interleaved: every variant of the server and
the bare server get the same load in mirrored rounds, so the ratios are measured under one noise.

    python bench/run_server_overhead.py [--levels 1,4,16] [--duration 32] [--rounds 4]

The same server alone (no bare vLLM) at other loads, e.g. the open-loop and concurrency-64 runs
in bench/results/serve_open.* and serve_c64.*:

    python bench/run_server_overhead.py --no-bare --mode open --levels 1,2,4 --name serve_open
    python bench/run_server_overhead.py --no-bare --levels 64 --kv-cache-gib 0.5 --name serve_c64
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def main() -> None:
    from tabp_vllm.errors import TabpError
    from tabp_vllm.loadtest.commands import run_bench
    from tabp_vllm.loadtest.servers import api_server_command
    from tabp_vllm.models import resolve_model
    from tabp_vllm.process import ManagedProcess, lists_models

    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--duration", type=float, default=32.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--bare-port", type=int, default=8101)
    ap.add_argument("--no-bare", action="store_true", help="only the server's variants")
    ap.add_argument("--mode", default="closed", choices=["closed", "open"])
    ap.add_argument("--kv-cache-gib", type=float, default=0.25, help="per engine")
    ap.add_argument("--name", default="server_overhead", help="output file stem")
    args = ap.parse_args()

    model = resolve_model("llama")
    masks = [str(RESULTS / "masks" / "k4.json"), str(RESULTS / "masks" / "k8.json")]
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Leaving the stack stops both servers: SIGINT (Ctrl-C), then SIGKILL whatever is left.
    with ExitStack() as stack:
        serve = ManagedProcess(
            [sys.executable, "-m", "tabp_vllm", "serve", "--model", "llama", "--port",
             str(args.port), "--kv-cache-gib", str(args.kv_cache_gib), "--max-model-len", "1024",
             *[a for m in masks for a in ("--task-mask", m)]],
            logs / "serve.log", name="tabp-vllm serve")
        stack.callback(serve.stop, grace_s=120)
        serve.start()
        try:
            if not args.no_bare:
                bare = ManagedProcess(
                    api_server_command(model, args.bare_port, "llama", bare=True,
                                       kv_cache_gib=args.kv_cache_gib, max_model_len=1024),
                    logs / "bare-vllm.log", name="bare vLLM api_server")
                stack.callback(bare.stop, grace_s=120)
                bare.start().wait_ready(f"http://127.0.0.1:{args.bare_port}/v1/models",
                                        deadline_s=600, interval_s=2)
            # /v1/models answers from the ingress early; READY follows once every engine is up.
            serve.wait_ready(f"http://127.0.0.1:{args.port}/v1/models",
                             ready=lists_models(["llama", "llama-k4", "llama-k8"]),
                             log_line="\nREADY", deadline_s=600, interval_s=2)
        except TabpError as exc:
            sys.exit(f"error: {exc}")
        run_bench(url=f"http://127.0.0.1:{args.port}",
                  variants=["llama", "llama-k4", "llama-k8"], model="llama", masks=masks,
                  bare_vllm=None if args.no_bare else f"llama@http://127.0.0.1:{args.bare_port}",
                  mode=args.mode, levels=args.levels, duration=args.duration,
                  rounds=args.rounds, out=str(RESULTS), stem=args.name,
                  notes="llama, llama-k4, llama-k8 served by one `tabp-vllm serve` (Ray Serve, "
                        f"KV cache {args.kv_cache_gib} GiB per engine)"
                        + ("" if args.no_bare else
                           "; bare-vllm is a plain vLLM api_server of the dense model"))


if __name__ == "__main__":
    main()
