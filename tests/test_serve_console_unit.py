"""serve/console.py without Ray: inside `ServeConsole`, whatever other code prints (Python's print,
a logging handler made before, C-level writes to fds 1 and 2, a child process) goes to the log
file, and only `serve`'s own lines reach the terminal; `--verbose` changes nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import logging, os, subprocess, sys
    from tabp_vllm.serve.console import ServeConsole

    handler = logging.StreamHandler()          # holds sys.stderr, as Ray's and vLLM's do
    logging.getLogger("noisy").addHandler(handler)
    print("dtype: before", flush=True)
    with ServeConsole(sys.argv[1], verbose=sys.argv[2] == "1") as console:
        print('{"asctime": "x", "message": "Triton is installed"}', flush=True)
        logging.getLogger("noisy").warning("INFO 11-27 vllm engine line")
        os.write(1, b"(ServeReplica pid=1) fd one\\n")
        os.write(2, b"fd two\\n")
        subprocess.run([sys.executable, "-c", "print('from a child process')"])
        console.say("ready: llama (1/1 variants, 3 s)")
        console.say("READY http://127.0.0.1:8000")
        console.warn("stopped")
    print("after", flush=True)
""")
NOISE = ["Triton is installed", "vllm engine line", "fd one", "fd two", "from a child process"]
OURS = ["ready: llama (1/1 variants, 3 s)", "READY http://127.0.0.1:8000"]


def run(tmp_path, verbose: bool):
    log = tmp_path / "logs" / "serve.log"
    p = subprocess.run([sys.executable, "-c", CHILD, str(log), "1" if verbose else "0"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    return p, log


def test_only_our_lines_reach_the_terminal(tmp_path):
    p, log = run(tmp_path, verbose=False)
    assert p.stdout.splitlines() == ["dtype: before", *OURS, "after"]
    assert p.stderr.splitlines() == ["stopped"]
    text = log.read_text()
    assert all(n in text for n in NOISE) and not any(o in text for o in OURS)


def test_verbose_shows_everything_and_writes_no_file(tmp_path):
    p, log = run(tmp_path, verbose=True)
    both = p.stdout + p.stderr
    assert all(line in both for line in NOISE + OURS + ["stopped", "after"])
    assert not log.exists()
