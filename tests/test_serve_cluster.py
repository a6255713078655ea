"""End-to-end: `tabp-vllm serve --address` joins a running Ray cluster (`ray start --head`) and
deploys one pruned variant with two replicas; Ctrl-C removes our app and leaves the cluster up.

The variant runs with `--engine-in-replica` (vLLM's engine core in a thread of each Ray replica,
`serve/inproc_engine.py`), covered here to share this server start: each replica is one process,
answers as the offline engine does, streams, and stops generating for clients that hang up
(vLLM's token counter on the cluster's metrics export port). Every other serve test runs the
default (an engine-core process per replica)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tabp_vllm import prometheus as prom
from tabp_vllm.process import free_port
from tabp_vllm.serve.launcher import ServeProcess
from tabp_vllm.serve.options import ServeOptions, VariantOptions

pytestmark = [pytest.mark.serve, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
VARIANT = "llama-gsm8k"
# The cluster's metrics report interval (Ray's default is 10 s, which made each settled_tokens
# wait 24-36 s), and the quiet time that counts as settled: over two intervals
METRICS_REPORT_MS = 2000
SETTLE_S = 5

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


def stop_cluster(temp_dir: str, grace_s: float = 5.0) -> None:
    """Stop the Ray cluster whose processes name `temp_dir`, and everything below them (agents,
    workers). Only that cluster: `ray stop` would take down every Ray on the machine, the local
    instance of any other test or user included. A throwaway cluster: what ignores SIGTERM for
    `grace_s` is killed (with 15 s the teardown waited out the full grace)."""
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
    metrics_port = free_port(6420, 6450)
    address = f"127.0.0.1:{gcs}"
    temp_dir = f"/tmp/tabp-ray-{gcs}-{os.getpid()}"  # short: Ray's socket paths must fit 107 bytes
    # Ray 2.60 clusters use token auth (~/.ray/auth_token); a joining driver must be told so.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_metrics_report_interval_ms": str(METRICS_REPORT_MS)}
    try:
        subprocess.run([RAY, "start", "--head", f"--port={gcs}", "--num-cpus=8",
                        "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                        f"--metrics-export-port={metrics_port}",
                        "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                       check=True, env=env, capture_output=True, timeout=180)
        yield address, env, metrics_port
    finally:
        stop_cluster(temp_dir)


def replica_processes() -> list:
    """The variant's Ray replica actors: on a joined cluster they are the cluster's processes."""
    import psutil

    want = f"ray::ServeReplica:tabp:LLMServer:{VARIANT}"
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if " ".join(p.info["cmdline"] or []).startswith(want):
                out.append(p)
        except psutil.Error:
            pass
    return out


def generated_tokens(metrics_port: int) -> float:
    families = prom.scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    return prom.sum_by(families, "ray_vllm_generation_tokens_total").get(VARIANT, 0.0)


def settled_tokens(metrics_port: int, timeout_s: float = 180) -> float:
    """The generated-token counter once it stays the same over SETTLE_S: longer than two metrics
    report intervals of the cluster (METRICS_REPORT_MS), so a counter that still moves cannot
    look settled."""
    deadline = time.time() + timeout_s
    prev = generated_tokens(metrics_port)
    while time.time() < deadline:
        time.sleep(SETTLE_S)
        cur = generated_tokens(metrics_port)
        if cur == prev and cur > 0:
            return cur
        prev = cur
    raise AssertionError(f"vLLM's generated-token counter never settled (last {prev})")


def hang_up_streams(base: str, n: int) -> None:
    """n streaming clients that hang up after the first event."""
    import asyncio

    async def one(c, i):
        req = {"model": VARIANT, "prompt": f"Tell me a long story, number {i}:",
               "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with c.stream("POST", f"{base}/v1/completions", json=req) as r:
            assert r.status_code == 200
            async for _ in r.aiter_lines():
                return

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            await asyncio.gather(*[one(c, i) for i in range(n)])

    asyncio.run(run())


def test_join_cluster_with_two_replicas(tmp_path, demo_model, ray_cluster):
    from vllm import SamplingParams

    from tabp_vllm.engine import build_llm
    from tabp_vllm.mask import load_mask, make_mask

    address, env, metrics_port = ray_cluster
    mask = make_mask(demo_model, [20, 21, 22, 23], task="gsm8k", model_id="llama").save(tmp_path / "m.json")
    options = ServeOptions(
        model="llama", address=address, dense=False, variants=[VariantOptions(mask=str(mask))],
        replicas=2, port=free_port(8100, 8140),
        engine={"max_model_len": 512, "kv_cache_gib": 0.25, "dtype": "float32",
                "cpu_engine_in_replica": True})
    server = ServeProcess(options, tmp_path / "serve.log", env=env, cwd=REPO,
                          ready_timeout_s=1200, stop_grace_s=180)
    assert server.model_names == [VARIANT] and server.metrics_url is None  # the cluster's port
    with server:  # returns once READY: both replicas are up
        text = server.log_text()
        assert "the Ray cluster's metrics export port(s)" in text  # no private metrics port
        # each replica is one process: by default vLLM's engine core (VLLM::EngineCore) is a
        # process below it
        replicas = replica_processes()
        assert len(replicas) == 2, replicas
        for r in replicas:
            below = [" ".join(c.cmdline()) for c in r.children(recursive=True)]
            assert below == [], below

        client = server.openai_client(timeout=300, max_retries=0)
        assert [m.id for m in client.models.list().data] == [VARIANT]  # --no-dense
        outs = {client.completions.create(model=VARIANT, prompt="The capital of France is",
                                          max_tokens=8, temperature=0).choices[0].text for _ in range(6)}
        assert len(outs) == 1  # both replicas answer, greedily the same ...
        offline = build_llm(demo_model, load_mask(mask), kv_cache_gib=0.25, max_model_len=512,
                            dtype="float32")
        try:  # ... and as the offline engine of the variant does
            want = offline.generate(["The capital of France is"],
                                    SamplingParams(max_tokens=8, temperature=0),
                                    use_tqdm=False)[0].outputs[0].text
        finally:
            offline.llm_engine.engine_core.shutdown()
        assert outs.pop() == want and want.strip()
        chunks = client.chat.completions.create(
            model=VARIANT, messages=[{"role": "user", "content": "Name a color."}],
            max_tokens=10, temperature=0, stream=True)
        assert "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)

        # vLLM's metrics reach the cluster's export port from the in-replica engines, and
        # clients that hang up stop the generation for them
        before = settled_tokens(metrics_port)
        assert before >= 6 * 8, before  # the completions above
        hang_up_streams(server.base_url, 6)
        # generating on would add up to 6 x 400 tokens (and keep the counter moving for longer
        # than settled_tokens waits)
        assert settled_tokens(metrics_port) - before < 6 * 400 / 4, "generation went on"

        apps = app_replicas(address, env)
        llm = {d: n for d, n in apps["tabp"].items() if "Ingress" not in d}
        assert list(llm.values()) == [2], apps
    # Leaving the block stopped only what our process started: the cluster's processes are not ours.
    assert server.returncode == 0, server.log_tail(40)
    assert not server.left, server.left
    # Our app is gone; the cluster we joined still runs and answers.
    assert "tabp" not in app_replicas(address, env)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{server.base_url}/v1/models", timeout=5).raise_for_status()
