"""End-to-end: `tabp-vllm serve --address` joins a running Ray cluster (`ray start --head`) and
deploys one pruned variant with two replicas; Ctrl-C removes our app and leaves the cluster up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tabp_vllm.process import ManagedProcess, lists_models
from tabp_vllm.process import free_port

pytestmark = [pytest.mark.serve, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
VARIANT = "llama-gsm8k"

STATUS = r"""
import json, sys, ray
from ray import serve
ray.init(address=sys.argv[1], log_to_driver=False)
apps = serve.status().applications
out = {name: {d: sum(n for s, n in ds.replica_states.items() if s == "RUNNING")
              for d, ds in app.deployments.items()} for name, app in apps.items()}
print("STATUS " + json.dumps(out))
"""


def app_replicas(address: str, env: dict) -> dict:
    """{application: {deployment: running replicas}} as the cluster's Serve controller sees it."""
    proc = subprocess.run([sys.executable, "-c", STATUS, address], capture_output=True, text=True,
                          timeout=120, env=env)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("STATUS "))
    return json.loads(line[len("STATUS "):])


def stop_cluster(temp_dir: str, grace_s: float = 15.0) -> None:
    """Stop the Ray cluster whose processes name `temp_dir`, and everything below them (agents,
    workers). Only that cluster: `ray stop` would take down every Ray on the machine, the local
    instance of any other test or user included."""
    import psutil

    me = psutil.Process()
    ours = {me.pid, *(p.pid for p in me.parents())}
    roots = [p for p in psutil.process_iter(["cmdline"])
             if p.pid not in ours and any(temp_dir in arg for arg in p.info["cmdline"] or [])]
    family = {p.pid: p for p in roots}
    for p in roots:
        try:
            family.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    for p in family.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(family.values()), timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


@pytest.fixture()
def ray_cluster(tmp_path_factory):
    gcs = free_port(6390, 6420)
    address = f"127.0.0.1:{gcs}"
    temp_dir = f"/tmp/tabp-ray-{gcs}-{os.getpid()}"  # short: Ray's socket paths must fit 107 bytes
    # Ray 2.60 clusters use token auth (~/.ray/auth_token); a joining driver must be told so.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    try:
        subprocess.run([RAY, "start", "--head", f"--port={gcs}", "--num-cpus=8",
                        "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                        "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                       check=True, env=env, capture_output=True, timeout=180)
        yield address, env
    finally:
        stop_cluster(temp_dir)


def test_join_cluster_with_two_replicas(tmp_path, demo_model, ray_cluster):
    from openai import OpenAI

    address, env = ray_cluster
    from tabp_vllm.mask import make_mask

    mask = make_mask(demo_model, [20, 21, 22, 23], task="gsm8k", model_id="llama").save(tmp_path / "m.json")
    port = free_port(8100, 8140)
    cmd = [sys.executable, "-m", "tabp_vllm", "serve", "--model", "llama", "--address", address,
           "--no-dense", "--task-mask", str(mask), "--replicas", "2", "--port", str(port),
           "--max-model-len", "512", "--kv-cache-gib", "0.25"]
    proc = ManagedProcess(cmd, tmp_path / "serve.log", env=env, cwd=REPO, name="tabp-vllm serve")
    proc.start()
    try:
        # /v1/models answers from the ingress early; READY follows once both replicas are up.
        proc.wait_ready(f"http://127.0.0.1:{port}/v1/models", ready=lists_models([VARIANT]),
                        log_line="READY", deadline_s=1200, interval_s=2)
        text = proc.log_text()
        assert "the Ray cluster's metrics export port(s)" in text  # no private metrics port

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=300, max_retries=0)
        assert [m.id for m in client.models.list().data] == [VARIANT]  # --no-dense
        outs = {client.completions.create(model=VARIANT, prompt="The capital of France is",
                                          max_tokens=8, temperature=0).choices[0].text for _ in range(6)}
        assert len(outs) == 1 and outs.pop().strip()  # both replicas answer, greedily the same

        apps = app_replicas(address, env)
        llm = {d: n for d, n in apps["tabp"].items() if "Ingress" not in d}
        assert list(llm.values()) == [2], apps
    finally:
        # Only what our process started is stopped: the cluster's own processes are not ours.
        left = proc.stop(grace_s=180)
    assert proc.returncode == 0, proc.log_tail(40)
    assert not left, left
    # Our app is gone; the cluster we joined still runs and answers.
    assert "tabp" not in app_replicas(address, env)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).raise_for_status()
