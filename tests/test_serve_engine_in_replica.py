"""End-to-end: `tabp-vllm serve --engine-in-replica` (one pruned variant): the variant is one
process (its vLLM engine core runs in the Ray replica, `serve/inproc_engine.py`), answers as the
offline engine does, streams, stops generating for clients that hang up, and stops cleanly."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tabp_vllm.process import ManagedProcess, free_port, lists_models

pytestmark = [pytest.mark.serve, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
VARIANT = "llama-gsm8k"
PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Water boils at"]


def replica_processes(serve_pid: int) -> list[psutil.Process]:
    """The variant's Ray replica actor(s) in the session `serve` leads."""
    import os

    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            title = " ".join(p.info["cmdline"] or [])
            if os.getsid(p.pid) == serve_pid and title.startswith(
                    f"ray::ServeReplica:tabp:LLMServer:{VARIANT}"):
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return out


def generated_tokens(metrics_port: int) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "ray_vllm_generation_tokens_total"
               and s.labels.get("model_name") == VARIANT)


def test_one_process_per_variant_same_answers_aborts_and_clean_stop(tmp_path, demo_model):
    from openai import OpenAI
    from vllm import SamplingParams

    from tabp_vllm.engine import build_llm
    from tabp_vllm.mask import load_mask, make_mask

    mask_path = make_mask(demo_model, [20, 21, 22, 23], task="gsm8k",
                          model_id="llama").save(tmp_path / "m.json")
    port, mport = free_port(8140, 8180), free_port(8180, 8200)
    cmd = [sys.executable, "-m", "tabp_vllm", "serve", "--model", "llama", "--no-dense",
           "--task-mask", str(mask_path), "--engine-in-replica", "--port", str(port),
           "--metrics-port", str(mport), "--max-model-len", "512", "--kv-cache-gib", "0.25",
           "--dtype", "float32"]
    proc = ManagedProcess(cmd, tmp_path / "serve.log", cwd=REPO, name="tabp-vllm serve")
    proc.start()
    try:
        proc.wait_ready(f"http://127.0.0.1:{port}/v1/models", ready=lists_models([VARIANT]),
                        log_line="READY", deadline_s=1200, interval_s=2)
        replicas = replica_processes(proc.pid)
        assert len(replicas) == 1, replicas
        # no process below it: by default vLLM's engine core (VLLM::EngineCore) would be one
        below = [" ".join(c.cmdline()) for c in replicas[0].children(recursive=True)]
        assert below == [], below

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=300,
                        max_retries=0)
        served = [client.completions.create(model=VARIANT, prompt=p, max_tokens=12,
                                            temperature=0).choices[0].text for p in PROMPTS]
        offline = build_llm(demo_model, load_mask(mask_path), kv_cache_gib=0.25,
                            max_model_len=512, dtype="float32")
        try:
            want = [o.outputs[0].text for o in offline.generate(
                PROMPTS, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)]
        finally:
            offline.llm_engine.engine_core.shutdown()
        assert served == want

        chunks = client.chat.completions.create(
            model=VARIANT, messages=[{"role": "user", "content": "Name a color."}],
            max_tokens=10, temperature=0, stream=True)
        assert "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)

        # vLLM's metrics reach Ray's export port from the in-replica engine too
        deadline = time.time() + 60
        while (before := generated_tokens(mport)) == 0 and time.time() < deadline:
            time.sleep(2)
        assert before >= 3 * 12, before

        # clients that hang up after the first event: the engine stops generating for them

        async def hang_up(c, i):
            req = {"model": VARIANT, "prompt": f"Tell me a long story, number {i}:",
                   "max_tokens": 400, "ignore_eos": True, "stream": True}
            async with c.stream("POST", f"http://127.0.0.1:{port}/v1/completions",
                                json=req) as r:
                assert r.status_code == 200
                async for _ in r.aiter_lines():
                    return

        async def run():
            async with httpx.AsyncClient(timeout=120) as c:
                await asyncio.gather(*[hang_up(c, i) for i in range(6)])

        asyncio.run(run())
        time.sleep(4)  # > the abort + one 2 s metrics report interval
        settled = generated_tokens(mport)
        time.sleep(8)
        assert generated_tokens(mport) == settled, "the engine kept generating after clients left"
        assert settled - before < 6 * 400 / 4
        assert client.completions.create(model=VARIANT, prompt="Hi", max_tokens=2,
                                         temperature=0).usage.completion_tokens == 2
    finally:
        left = proc.stop(grace_s=180)
    assert proc.returncode == 0, proc.log_tail(40)
    assert not left, left
