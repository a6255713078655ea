"""Load generator, reports and the bench command against a small fake OpenAI server (fast).

The fake server streams one token every `delay` seconds per request, so expected throughput and
latencies are known; the real vLLM server is exercised in test_bench_vllm.py.
"""

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import typer
from typer.testing import CliRunner

from tabp_vllm.loadtest import loadgen, report
from tabp_vllm.errors import TabpError

DELAYS = {"llama": 0.010, "llama-k4": 0.004, "broken": None}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):  # keep pytest output clean
        pass

    def do_GET(self):
        if self.path != "/v1/models":
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps({"object": "list", "data": [{"id": k} for k in DELAYS]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        delay = DELAYS.get(req["model"], "unknown")
        if delay is None or delay == "unknown":
            self.send_response(500 if delay is None else 404)
            self.end_headers()
            self.wfile.write(b'{"error": "nope"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        n_prompt = len(req["prompt"]) if isinstance(req["prompt"], list) else 1
        try:
            for _ in range(req["max_tokens"]):
                time.sleep(delay)
                self.wfile.write(b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n')
                self.wfile.flush()
            usage = {"prompt_tokens": n_prompt, "completion_tokens": req["max_tokens"]}
            self.wfile.write(f'data: {{"choices": [], "usage": {json.dumps(usage)}}}\n\n'.encode())
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def fake_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slice(url, name, mode, level, duration, max_tokens, seed=0):
    specs = loadgen.synthetic_requests(8, seed, 16, max_tokens, 0.0, 1000)

    async def go():
        async with httpx.AsyncClient() as client:
            return await loadgen.run_slice(client, loadgen.Target(name, url), loadgen._cycle(specs),
                                           mode, level, duration, seed, 0)
    return asyncio.run(go())


def test_closed_loop_keeps_concurrency_and_measures_latency(fake_url):
    s = _slice(fake_url, "llama", "closed", 2, 1.0, 5)
    # 2 workers, ~50 ms per request: ~40 requests in 1 s (thread and loop overhead allowed)
    assert 5 <= len(s.completed) <= 42  # lower bound loose: CI machines may be busy
    assert not s.errors
    for r in s.completed:
        assert r.output_tokens == 5 and r.prompt_tokens == 16 and len(r.itls) == 4
        assert 0.008 <= r.ttft < r.e2e
        assert r.tpot == pytest.approx((r.e2e - r.ttft) / 4, abs=0.01)
    assert s.output_throughput == pytest.approx(s.tokens_in_window / 1.0)
    assert s.tokens_in_window >= 5 * len(s.completed)


def test_window_is_bounded_and_partial_tokens_count(fake_url):
    t0 = time.perf_counter()
    s = _slice(fake_url, "llama", "closed", 3, 0.5, 1000)  # a request would take 10 s
    assert time.perf_counter() - t0 < 2.5
    assert not s.completed and s.cancelled == 3
    assert 3 * 15 <= s.tokens_in_window <= 3 * 51  # ~50 tokens per request streamed in 0.5 s


def test_open_loop_poisson_is_seeded(fake_url):
    a = _slice(fake_url, "llama", "open", 20, 1.0, 2, seed=7)
    b = _slice(fake_url, "llama", "open", 20, 1.0, 2, seed=7)
    assert 8 <= a.sent <= 35  # Poisson(20) arrivals in 1 s
    assert b.sent == a.sent   # same seed, same arrival times
    assert len(a.completed) + a.cancelled <= a.sent


def test_server_errors_are_counted_not_raised(fake_url):
    s = _slice(fake_url, "broken", "closed", 1, 2.0, 2)
    assert not s.completed and len(s.errors) >= 1
    assert s.errors[0].error.startswith("HTTP 500")


def test_fail_fast_unreachable_and_unknown_variant(fake_url):
    with pytest.raises(TabpError, match=r"cannot reach the server at http://127.0.0.1:\d+"):
        loadgen.check_variants([loadgen.Target("llama", f"http://127.0.0.1:{_free_port()}")])
    with pytest.raises(TabpError, match=r"variant 'llama-k9' is not served .*llama-k4"):
        loadgen.check_variants([loadgen.Target("llama-k9", fake_url)])
    with pytest.raises(TabpError, match="listed twice"):
        loadgen.check_variants([loadgen.Target("llama", fake_url)] * 2)


def test_parse_variant_and_round_robin():
    v = loadgen.parse_variant("base=llama@localhost:8001/v1", "http://h:1")
    assert (v.key, v.name, v.url) == ("base", "llama", "http://localhost:8001")
    assert loadgen.parse_variant("llama-k4", "http://h:1/").url == "http://h:1"
    vs = [loadgen.Target(n, "u") for n in "abc"]
    orders = ["".join(v.name for v in loadgen.slice_order(vs, r)) for r in range(4)]
    assert orders == ["abc", "cba", "bca", "acb"]
    # every mirrored pair of rounds gives each variant the same mean position
    for pair in (orders[:2], orders[2:]):
        assert len({sum(o.index(x) for o in pair) for x in "abc"}) == 1


def test_synthetic_requests_are_seeded_with_bounded_lengths():
    a = loadgen.synthetic_requests(20, 3, 100, 50, 0.5, 49152)
    assert a == loadgen.synthetic_requests(20, 3, 100, 50, 0.5, 49152)
    assert a != loadgen.synthetic_requests(20, 4, 100, 50, 0.5, 49152)
    assert all(50 <= len(r.prompt) <= 150 and 25 <= r.max_tokens <= 75 for r in a)
    assert all(256 <= t < 49152 - 256 for r in a for t in r.prompt)
    assert len({len(r.prompt) for r in a}) > 1


def test_percentiles_match_numpy():
    import numpy as np

    xs = [0.3, 0.1, 0.7, 0.2, 0.9, 0.5, 0.4]
    for q in (50, 90, 99):
        assert report._pct(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def _app():
    from tabp_vllm.loadtest.commands import bench

    app = typer.Typer()
    app.command()(bench)
    return app


def test_cli_unreachable_server_is_one_line_exit_2(tmp_path):
    res = CliRunner().invoke(_app(), ["--url", f"http://127.0.0.1:{_free_port()}",
                                      "--out", str(tmp_path)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the server at")
    assert not list(tmp_path.iterdir())


def test_cli_unknown_variant_is_one_line_exit_2(fake_url, tmp_path):
    res = CliRunner().invoke(_app(), ["--url", fake_url, "--variant", "llama",
                                      "--variant", "llama-gsm8k", "--out", str(tmp_path)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert lines == [f"error: variant 'llama-gsm8k' is not served at {fake_url} "
                     "(served: llama, llama-k4, broken)"]


def test_run_bench_end_to_end_report(fake_url, tmp_path, write_mask):
    from tabp_vllm.loadtest.commands import run_bench

    mask = write_mask([26, 27, 28, 29], task="k4")
    res = run_bench(url=fake_url, variants=["llama", "llama-k4"], masks=[str(mask)],
                    bare_vllm=f"llama@{fake_url}", levels="1,2", duration=1.6, rounds=2, ramp=0.2,
                    warmup=1, input_len=8, output_len=4, out=tmp_path, progress=False)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"serving.json", "serving.md", "serving_throughput.png",
            "serving_latency.png"} <= names
    doc = json.loads((tmp_path / "serving.json").read_text())
    assert len(doc["metrics"]) == 3 * 2  # llama, llama-k4, bare-vllm x 2 levels
    sp = {r["level"]: r for r in doc["comparison"]["speedups"]}
    # llama-k4 streams 2.5x as fast as llama on the fake server (less when the CPU is busy)
    assert 1.2 < sp[2]["achieved_speedup"] < 5
    k4 = next(v for v in doc["variants"] if v["key"] == "llama-k4")
    assert k4["kept_blocks"] == 26 and 1.0 < k4["ideal"]["ideal_speedup"] < 30 / 26
    assert sp[2]["achieved_over_ideal"] == pytest.approx(
        sp[2]["achieved_speedup"] / k4["ideal"]["ideal_speedup"])
    assert "target_met" in sp[2] and "target_met" not in sp[1]
    ov = doc["comparison"]["server_overhead"]
    assert [o["level"] for o in ov] == [1, 2] and ov[-1]["throughput_ratio"] > 0
    md = (tmp_path / "serving.md").read_text()
    assert "| llama-k4 | 2 |" in md and "Server overhead" in md
    assert res["plan"]["levels"] == [1.0, 2.0]


def test_ramp_is_load_but_not_measurement(fake_url):
    specs = loadgen.synthetic_requests(8, 0, 16, 5, 0.0, 1000)

    async def go():
        async with httpx.AsyncClient() as client:
            return await loadgen.run_slice(client, loadgen.Target("llama", fake_url),
                                           loadgen._cycle(specs), "closed", 2, 0.6, 0, 0,
                                           ramp=0.4)
    t0 = time.perf_counter()
    s = asyncio.run(go())
    assert 0.95 < time.perf_counter() - t0 < 2.5  # ramp + window
    assert s.duration == 0.6 and 0.4 <= s.start - t0 < 0.9
    assert all(r.end >= s.start for r in s.completed)
    # ~50 ms per request, 2 workers: ~24 requests end in the 0.6 s window, not the ~40 of 1 s
    assert 3 <= len(s.completed) <= 27
    assert s.tokens_in_window <= 2 * 0.6 / 0.010 + 2


def test_open_loop_speedup_is_time_per_token(fake_url, tmp_path, write_mask):
    """Below saturation both variants deliver the offered load: the speedup comes from latency."""
    from tabp_vllm.loadtest.commands import run_bench

    mask = write_mask([26, 27, 28, 29], task="k4")
    run_bench(url=fake_url, variants=["llama", "llama-k4"], masks=[str(mask)], mode="open",
              levels="8", duration=2.0, rounds=2, ramp=0.2, warmup=1, input_len=8, output_len=8,
              range_ratio=0.0, out=tmp_path, stem="open", progress=False)
    doc = json.loads((tmp_path / "open.json").read_text())
    (row,) = doc["comparison"]["speedups"]
    assert row["speedup_basis"] == "tpot_p50" and "target_met" not in row
    # 10 ms vs 4 ms per token on the fake server: ~2.5x, whatever the throughput ratio
    assert 1.5 < row["achieved_speedup"] < 4
    m = {x["variant"]: x for x in doc["metrics"]}
    assert row["achieved_speedup"] == pytest.approx(
        m["llama"]["tpot_s"]["p50"] / m["llama-k4"]["tpot_s"]["p50"])
    assert len(row["achieved_speedup_rounds"]["per_round"]) == 2
    assert "median time per output token" in (tmp_path / "open.md").read_text()


def test_capacity_masks_and_report(tmp_path, demo_model):
    """bench/serve_vs_bare.py --capacity: the whole-block variant of the nearest ideal speedup, the
    engines' logged KV sizes per variant, and the report's ratios to dense."""
    import importlib.util
    import json
    from pathlib import Path

    from tabp_vllm.mask import load_mask

    path = Path(__file__).resolve().parents[1] / "bench" / "serve_vs_bare.py"
    spec = importlib.util.spec_from_file_location("serve_vs_bare", path)
    svb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(svb)
    a = svb.parse_args(["--capacity", "--out", str(tmp_path)])
    assert (a.input_len, a.kv_cache_gib, a.levels, a.attention_blocks) == (1024, 0.25, "64",
                                                                           list(range(15, 23)))
    masks = svb.capacity_masks(a, tmp_path)
    # 8 attention sublayers at 1,024 + 64 tokens: ideal 1.106, nearest whole-block k = 3 (1.109)
    assert list(masks) == ["attn8", "k3"]
    assert load_mask(masks["attn8"]).num_attention_kept == 22
    assert load_mask(masks["k3"]).removed_layers == [27, 28, 29]
    log = ("(ServeReplica:tabp:LLMServer:llama-attn8 pid=7) (EngineCore pid=9) INFO 12-06 "
           "[kv_cache_utils.py:2327] CPU KV cache size: 15,872 tokens, Maximum concurrency ...\n"
           "(ServeReplica:tabp:LLMServer:llama pid=8) (MainProcess pid=8) INFO CPU KV cache size: "
           "11,648 tokens, Maximum ...")
    assert svb.engine_kv_tokens(log) == {"llama-attn8": 15_872, "llama": 11_648}
    v = {"attention_kept": 30, "mlp_kept": 30, "theoretical_speedup": 1.0, "kv_cache_tokens": 11_648}
    doc = {"host": {"model": "cpu"}, "concurrency": 64, "input_len": 1024, "output_len": 64,
           "kv_cache_gib": 0.25, "attention_blocks_removed": list(range(15, 23)),
           "variants": {"llama": v, "llama-attn8": {**v, "attention_kept": 22,
                                                    "engine_kv_cache_tokens": 15_872}},
           "bursts": [{"round": r, "variant": n, "max_running": m, "output_tokens_per_s": t,
                       "ttft_s": [1.0, 2.0]}
                      for r in (0, 1) for n, m, t in (("llama", 11, 100.0), ("llama-attn8", 14 + r, 120.0))]}
    svb.write_capacity_report(doc, tmp_path, "cap")
    s = json.loads((tmp_path / "cap.json").read_text())["summary"]
    assert s["llama-attn8"]["max_running"] == 15 and s["llama-attn8"]["max_running_vs_dense"] == 1.364
    assert s["llama-attn8"]["kv_cache_tokens"] == 15_872  # the engine's own, where it logged one
    assert s["llama-attn8"]["output_tokens_per_s_vs_dense"] == 1.2
    assert (tmp_path / "cap.png").stat().st_size > 0 and "| llama-attn8 | 22/30 |" in (tmp_path / "cap.md").read_text()
