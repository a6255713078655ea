"""End-to-end: one real `serve` process (Ray Serve LLM + 4 vLLM engines on the demo model: dense,
two task masks, and one variant of a two-cluster router whose other cluster shares the gsm8k
mask), a real Prometheus scraping it, the official `openai` client. One server for the whole module (CI has two
cores); the fault test runs last and the teardown checks that Ctrl-C leaves no process behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from prometheus_server import Prometheus, require_prometheus

from tabp_vllm import prometheus as prom
from tabp_vllm.process import free_port
from tabp_vllm.serve.launcher import ServeProcess
from tabp_vllm.serve.options import ServeOptions, VariantOptions

pytestmark = [pytest.mark.serve, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[1]
API_KEY = "tabp-test-key"
MAX_MODEL_LEN = 512
MASKS = {"gsm8k": [20, 21, 22, 23], "arc": [10, 11, 12, 13, 25]}
# the arc variant also drops attention sublayers (mask v2): it is served through the
# heterogeneous-layer model, whose hf_overrides callable must survive Ray's trip to the replica
SUBLAYERS = {"arc": {"removed_attention": [15, 16, 17, 18]}}
DENSE, GSM8K, ARC = "llama", "llama-gsm8k", "llama-arc"
# `--router`: arithmetic inputs share the gsm8k variant, commonsense ones get a variant of their own.
# A sublayer router (k = 8 units, as `route fit --units sublayers` writes one): the commonsense
# mask removes 3 blocks and 2 attention sublayers, so a routed request is answered by a sublayer
# variant (DeciLM block configs), the gsm8k one by a whole-block variant
ROUTER_MASKS = {"arithmetic": MASKS["gsm8k"], "commonsense": [10, 11, 12]}
ROUTER_SUBLAYERS = {"commonsense": {"removed_attention": [13, 14]}}
ROUTED, COMMONSENSE = "llama-auto", "llama-auto-0"
# Inputs farther than 1.0 from both centroids (all-MiniLM-L6-v2: the calibration prompts sit
# within 0.96, the asked ones within 0.98) take the gsm8k mask, an already served variant. A French
# sentence is 1.09-1.15 from both; without the fallback it would go to the commonsense cluster.
ROUTER_FALLBACK = (MASKS["gsm8k"], 1.0)
FAR_ASKED = "Bonjour, je m'appelle Marie."
VARIANTS = [DENSE, GSM8K, ARC, COMMONSENSE]
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
READY_TIMEOUT = float(os.environ.get("TABP_SERVE_READY_TIMEOUT", "1200"))
# Ray reports metrics every 2 s (default 10 s: the Prometheus checks would wait longer); a failed
# request is not retried by the proxy (the fault test counts failures)
SERVE_ENV = {"RAY_metrics_report_interval_ms": "2000", "RAY_SERVE_HTTP_REQUEST_MAX_RETRIES": "0"}


class StartupProbe(threading.Thread):
    """While the server starts: `GET /health` every second and, while it names a variant still
    starting, one completion to that variant (timed); what came back is kept for the tests."""

    def __init__(self, base: str):
        super().__init__(name="startup-probe", daemon=True)
        self.base, self.done = base, threading.Event()
        self.health: list[tuple[int, str]] = []      # (HTTP status, body's status)
        self.refused: list[tuple[str, int, float, dict]] = []  # (variant, status, seconds, body)

    def run(self) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
            while not self.done.is_set():
                try:
                    r = c.get(f"{self.base}/health")
                    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                    if "variants" in body:  # our ingress answered (not Ray's proxy before it)
                        self.health.append((r.status_code, body["status"]))
                        starting = [n for n, st in body["variants"].items() if st["state"] == "starting"]
                        if starting and len(self.refused) < 3:
                            t = time.monotonic()
                            resp = c.post(f"{self.base}/v1/completions", json={
                                "model": starting[0], "prompt": "Hi", "max_tokens": 1})
                            self.refused.append((starting[0], resp.status_code,
                                                 time.monotonic() - t, resp.json()))
                except (httpx.HTTPError, ValueError):
                    pass  # not listening yet
                self.done.wait(1)

    def stop(self) -> "StartupProbe":
        self.done.set()
        self.join(90)
        return self


@pytest.fixture(scope="module")
def mask_files(tmp_path_factory, demo_model):
    from tabp_vllm.mask import make_mask

    d = tmp_path_factory.mktemp("masks")
    paths = []
    for task, removed in MASKS.items():
        paths.append(make_mask(demo_model, removed, task=task, model_id="llama",
                               **SUBLAYERS.get(task, {})).save(d / f"{task}.json"))
    return paths


@pytest.fixture(scope="module")
def router_file(tmp_path_factory, demo_model):
    from routers import build_two_kind_router

    path = tmp_path_factory.mktemp("router") / "mix.json"
    build_two_kind_router(demo_model, ROUTER_MASKS, path, fallback=ROUTER_FALLBACK,
                          sublayers=ROUTER_SUBLAYERS)
    return path


def serve_options(mask_files, router_file) -> ServeOptions:
    """The module's one server: dense, the two masks, the router (its commonsense variant)."""
    return ServeOptions(
        model="llama", variants=[VariantOptions(mask=str(m)) for m in mask_files],
        router=str(router_file), port=free_port(8040, 8080), metrics_port=free_port(8080, 8100),
        api_key=API_KEY, engine={"max_model_len": MAX_MODEL_LEN, "kv_cache_gib": 0.25})


@pytest.fixture(scope="module")
def server(tmp_path_factory, mask_files, router_file):
    """`tabp-vllm serve` once for the module; leaving it sends Ctrl-C (SIGINT to the whole group)
    and checks that the server and everything it started exited."""
    srv = ServeProcess(serve_options(mask_files, router_file),
                       tmp_path_factory.mktemp("serve") / "serve.log", env=SERVE_ENV, cwd=REPO,
                       ready_timeout_s=READY_TIMEOUT, stop_grace_s=240)
    probe = StartupProbe(srv.base_url)  # test_health_answers_503_while_starting_then_200
    probe.start()
    try:
        with srv:  # returns once READY: every variant's engine is up, after the variant table
            srv.startup_probe = probe.stop()
            assert srv.model_names == VARIANTS + [ROUTED]
            yield srv
    finally:
        probe.stop()
    print(srv.log_text()[-3000:])
    assert not srv.left, f"orphan processes after Ctrl-C: {srv.left}"
    assert "stopped" in srv.log_text()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, server):
    require_prometheus()
    prom = Prometheus(tmp_path_factory.mktemp("prom"), [f"127.0.0.1:{server.options.metrics_port}"])
    yield prom
    prom.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client(timeout=300, max_retries=0)


def greedy(client, model, prompt, max_tokens=16, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0, **kw)


# ---- startup, listing, auth -------------------------------------------------------------------

def test_startup_table(server, prometheus):  # (Prometheus starts scraping from here on)
    text = server.log_text()
    for name in VARIANTS:
        assert name in text
    assert "26/30" in text and "25/30" in text and "27/30" in text and "30/30" in text
    assert f"routed:    {ROUTED} (2 clusters" in text and f"-> {COMMONSENSE}" in text
    assert server.metrics_url in text
    assert f"{server.base_url}/v1/completions" in text
    # the default request-path profile reached the local Ray (this whole module runs under it)
    assert "request path: ray_serve=throughput-optimized RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in text


def test_models_lists_variants_with_metadata(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == set(VARIANTS) | {ROUTED}
    meta = {k: models[k].model_extra["metadata"] for k in models}
    assert meta[DENSE]["blocks_kept"] == 30 and meta[DENSE]["blocks_total"] == 30
    assert meta[DENSE]["task"] is None and meta[DENSE]["mask_hash"] is None
    assert meta[GSM8K]["task"] == "gsm8k" and meta[GSM8K]["blocks_kept"] == 26
    assert meta[ARC]["task"] == "arc" and meta[ARC]["blocks_kept"] == 25
    assert len(meta[ARC]["mask_hash"]) == 12 and meta[ARC]["mask_hash"] != meta[GSM8K]["mask_hash"]
    assert meta[ARC]["theoretical_speedup"] > meta[GSM8K]["theoretical_speedup"] > 1.0
    assert meta[COMMONSENSE]["blocks_kept"] == 27 and len(meta[COMMONSENSE]["router_clusters"]) == 1
    # whole-block masks: one attention and one MLP per block kept; arc also drops 4 attention
    # sublayers. The KV cache per token scales with the attention kept, so the same 0.25 GiB holds
    # more tokens
    for name in (DENSE, GSM8K):
        assert meta[name]["attention_kept"] == meta[name]["mlp_kept"] == meta[name]["blocks_kept"]
    assert (meta[ARC]["attention_kept"], meta[ARC]["mlp_kept"]) == (21, 25)
    assert (meta[COMMONSENSE]["attention_kept"], meta[COMMONSENSE]["mlp_kept"]) == (25, 27)
    per_block = meta[DENSE]["kv_bytes_per_token"] / 30
    assert per_block in (2 * 3 * 64 * 2, 2 * 3 * 64 * 4)  # K and V, 3 KV heads x 64, bf16 / fp32
    assert meta[ARC]["kv_bytes_per_token"] == 21 * per_block
    assert meta[DENSE]["kv_cache_tokens"] < meta[GSM8K]["kv_cache_tokens"] < meta[ARC]["kv_cache_tokens"]
    assert meta[DENSE]["kv_cache_tokens"] == int(0.25 * 2**30 // (128 * 30 * per_block)) * 128
    routed = meta[ROUTED]
    assert routed["routed"] is True and routed["clusters"] == 2
    assert sorted(routed["cluster_variants"]) == sorted([GSM8K, COMMONSENSE])
    assert routed["encoder"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert routed["fallback_variant"] == GSM8K and routed["fallback_radius"] == ROUTER_FALLBACK[1]


def test_sublayer_and_kv_cache_gauges(server, client, prometheus):
    """The ray_tabp_variant_* gauges of attention / MLP kept, KV bytes per token and KV cache
    tokens show what /v1/models says, and the KV cache estimate is the engines' own count."""
    meta = {m.id: m.model_extra["metadata"] for m in client.models.list().data}
    want = {name: {v: meta[v][key] for v in VARIANTS} for name, key in (
        ("ray_tabp_variant_attention_kept", "attention_kept"), ("ray_tabp_variant_mlp_kept", "mlp_kept"),
        ("ray_tabp_variant_kv_bytes_per_token", "kv_bytes_per_token"),
        ("ray_tabp_variant_kv_cache_tokens", "kv_cache_tokens"))}
    deadline = time.time() + 90  # Prometheus scrapes from test_startup_table on
    while True:
        got = {name: prometheus.query(f"max by (model_name) (last_over_time({name}[10m]))")
               for name in want}
        if got == want or time.time() > deadline:
            break
        time.sleep(2)
    assert got == want
    # every "KV cache size" vLLM logged is one of the estimates (Ray folds repeated lines, so
    # not every engine's line need be there)
    logged = {int(n.replace(",", "")) for n in
              re.findall(r"KV cache size: ([\d,]+) tokens", server.records_path.read_text())}
    assert logged and logged <= set(want["ray_tabp_variant_kv_cache_tokens"].values()), logged


def test_api_key_required(server, client):
    from openai import AuthenticationError, OpenAI

    for key in ("wrong", ""):
        bad = OpenAI(base_url=f"{server.base_url}/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(AuthenticationError):
            bad.models.list()
        with pytest.raises(AuthenticationError):
            greedy(bad, DENSE, "Hi", max_tokens=2)
    r = httpx.post(f"{server.base_url}/v1/completions", json={"model": DENSE, "prompt": "x"})
    assert r.status_code == 401
    assert greedy(client, DENSE, "Hi", max_tokens=2).choices[0].text is not None


# ---- readiness and the console ------------------------------------------------------------------

def test_health_answers_503_while_starting_then_200(server):
    """While the engines start, `/health` answers 503 and a request to a variant still starting
    gets an OpenAI-shaped 503 at once (not minutes of silence); once READY, 200 for every variant."""
    probe = server.startup_probe
    codes = [code for code, _ in probe.health]
    assert 503 in codes, probe.health                     # the ingress was up before the engines
    ready_at = codes.index(200) if 200 in codes else len(codes)
    assert set(codes[:ready_at]) == {503} and set(codes[ready_at:]) <= {200}, probe.health
    refused = [(name, s, body) for name, code, s, body in probe.refused if code == 503]
    print("requests to a starting variant:", [(n, c, round(s, 2)) for n, c, s, _ in probe.refused])
    assert refused, probe.refused
    for name, seconds, body in refused:
        assert seconds < 2.0, probe.refused              # 2 cores busy starting engines
        err = body["error"]
        assert err["code"] == 503 and err["type"] == "server_error" and err["param"] == "model"
        assert err["message"].startswith(f"The model '{name}' is still starting (0/1 replicas")

    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.get(f"{server.base_url}/health", headers=auth, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert r.json()["variants"] == {n: {"state": "ready", "replicas_running": 1, "replicas": 1}
                                    for n in VARIANTS}
    for name in (GSM8K, ROUTED):
        one = httpx.get(f"{server.base_url}/health/{name}", headers=auth, timeout=30)
        assert one.status_code == 200 and one.json()["status"] == "ready"
    assert set(httpx.get(f"{server.base_url}/health/{ROUTED}", headers=auth, timeout=30)
               .json()["variants"]) == {GSM8K, COMMONSENSE}
    missing = httpx.get(f"{server.base_url}/health/nope", headers=auth, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
    assert httpx.get(f"{server.base_url}/health", timeout=30).status_code == 401  # the key, as everywhere


def test_console_shows_our_lines_and_logs_go_to_the_file(server):
    """Without --verbose the console has the dtype, the progress, the table and READY with the
    URL, and none of Ray's or vLLM's records: those are in the log file the console names."""
    text = server.log_text()
    lines = text.splitlines()
    assert sum(ln.startswith("dtype: ") for ln in lines) == 1
    assert f"READY {server.base_url}" in lines
    assert sum(ln.startswith("ready: ") for ln in lines) == len(VARIANTS)
    for noise in ('"asctime"', "(ServeReplica", "(ServeController", "(ProxyActor", "Triton",
                  "INFO 20", "WARNING"):
        assert noise not in text, (noise, [ln for ln in lines if noise in ln][:3])
    m = re.search(r"^logs: +Ray's and vLLM's records go to (\S+) \(--verbose: here\)$", text, re.M)
    assert m, lines[:5]
    records = Path(m.group(1)).read_text()
    assert "(ServeReplica:tabp:LLMServer" in records  # a replica's vLLM lines, streamed by Ray


# ---- generation: parity, streaming, logprobs ----------------------------------------------------

def test_greedy_equals_offline_engine(client, mask_files, demo_model):
    # Every served variant against an offline engine of it, built one after the other in this
    # process (on a CPU its engine runs in-process and starts in seconds; a child process to run
    # them imported torch and vLLM again)
    import gc

    from vllm import SamplingParams

    from tabp_vllm.engine import build_llm
    from tabp_vllm.mask import load_mask

    variants = {DENSE: None, GSM8K: mask_files[0], ARC: mask_files[1]}
    served = {name: [greedy(client, name, p).choices[0].text for p in PROMPTS] for name in variants}
    offline = {}
    for name, path in variants.items():
        llm = build_llm(demo_model, load_mask(path, demo_model) if path else None,
                        max_model_len=MAX_MODEL_LEN, kv_cache_gib=0.25)
        try:
            res = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
            offline[name] = [r.outputs[0].text for r in res]
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    assert served == offline
    # and the pruned variants really differ from the dense model
    assert served[GSM8K] != served[DENSE] and served[ARC] != served[DENSE]


def test_streaming_completion_and_chat(client):
    full = greedy(client, GSM8K, PROMPTS[0]).choices[0].text
    stream = client.completions.create(model=GSM8K, prompt=PROMPTS[0], max_tokens=16,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == full
    msgs = [{"role": "user", "content": "Name a color."}]
    chat = client.chat.completions.create(model=ARC, messages=msgs, max_tokens=12, temperature=0)
    chunks = client.chat.completions.create(model=ARC, messages=msgs, max_tokens=12,
                                            temperature=0, stream=True)
    streamed = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content and streamed


def test_logprobs(client):
    r = greedy(client, DENSE, PROMPTS[0], max_tokens=6, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 6
    assert all(len(t) >= 3 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    for tok, top in zip(lp.tokens, lp.top_logprobs):
        assert max(top.values()) == pytest.approx(top[tok], abs=1e-4)
    chat = client.chat.completions.create(model=GSM8K, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 2 for c in content)


# ---- lm-eval through the server ----------------------------------------------------------------

LMEVAL_LIMIT = 6


def test_lm_eval_local_completions_agrees_with_offline(server, mask_files, demo_model, tmp_path):
    """lm-eval's `local-completions` (echo + logprobs on /v1/completions) scores a pruned variant
    through the server; its log-likelihoods equal the offline lm-eval path's (`tabp-vllm eval`)."""
    from tabp_vllm.evaluation.evaluate import evaluate_variant

    arc_mask = next(m for m in mask_files if m.stem == "arc")
    out = tmp_path / "lmeval"
    args = (f"model={ARC},base_url={server.base_url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={demo_model},max_length={MAX_MODEL_LEN},num_concurrent=2,max_retries=1")
    cmd = [sys.executable, "-m", "tabp_vllm.lmeval", "--model", "local-completions",
           "--model_args", args, "--tasks", "tabp_demo", "--limit", str(LMEVAL_LIMIT),
           "--batch_size", "8", "--log_samples", "--output_path", str(out)]
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "PYTHONPATH": str(REPO)}
    # lm-eval's client runs while the offline reference below (an engine in a child process)
    # starts and scores: the two overlap instead of queueing (one after the other: 61 s)
    t0 = time.perf_counter()
    with open(tmp_path / "lmeval.log", "w+") as log:
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            offline = evaluate_variant(demo_model, ["tabp_demo"], str(arc_mask), limit=LMEVAL_LIMIT)
            p.wait(timeout=900)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        wall = time.perf_counter() - t0
        log.seek(0)
        assert p.returncode == 0, log.read()[-3000:]
    served = {}
    for line in sorted(out.rglob("samples_tabp_demo_*.jsonl"))[-1].read_text().splitlines():
        s = json.loads(line)
        served[s["doc_id"]] = [float(r[0]) for r in s["filtered_resps"]]
    assert len(served) == LMEVAL_LIMIT
    n = sum(len(v) for v in served.values())
    print(f"\nlm-eval local-completions: {n} requests in {wall:.1f} s wall (process start, task "
          f"load and tokenizer included; beside the offline reference's engine)")
    assert offline["removed_layers"] == MASKS["arc"]
    for row in offline["samples"]["tabp_demo"]:
        # the same engine arguments (dtype, loader) on both paths: bf16 noise at most
        assert served[row["doc_id"]] == pytest.approx(row["loglik"], rel=0.1, abs=0.15)


# ---- errors: every one in OpenAI shape, and the server keeps serving ----------------------------

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def _post(server, body, path="/v1/completions", headers=AUTH):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.base_url + path, content=content, headers=headers, timeout=120)


# (name, request, status, fragment of the message, param); the unit twin without Ray is
# tests/test_serve_errors_unit.py
ERROR_CASES = [
    ("unknown model", lambda s: _post(s, {"model": "llama-nope", "prompt": "x"}), 404,
     "'llama-nope' does not exist. Valid models: llama, llama-arc, llama-auto, llama-auto-0, "
     "llama-gsm8k", "model"),
    ("unknown model card", lambda s: httpx.get(s.base_url + "/v1/models/llama-nope", headers=AUTH), 404,
     "'llama-nope' does not exist", "model"),
    ("missing model", lambda s: _post(s, {"prompt": "x"}), 400, "'model' field is required", "model"),
    ("malformed json", lambda s: _post(s, b"{not json"), 400, "not valid JSON", None),
    ("wrong type", lambda s: _post(s, {"model": DENSE, "prompt": "x", "max_tokens": "many"}), 400,
     "'max_tokens'", "max_tokens"),
    ("chat messages not a list", lambda s: _post(s, {"model": DENSE, "messages": "nope"},
                                                 "/v1/chat/completions"), 400, "'messages'", "messages"),
    ("missing prompt", lambda s: _post(s, {"model": DENSE}), 400, "prompt", "prompt"),
    ("over-long prompt", lambda s: _post(s, {"model": GSM8K, "prompt": "hello " * (MAX_MODEL_LEN + 10),
                                             "max_tokens": 2}), 400, "maximum context length", None),
    ("max_tokens=-1", lambda s: _post(s, {"model": DENSE, "prompt": "x", "max_tokens": -1}), 400,
     "max_tokens", "max_tokens"),
    ("wrong api key", lambda s: _post(s, {"model": DENSE, "prompt": "x"},
                                      headers={"Authorization": "Bearer nope"}), 401, "API key", None),
    ("missing api key", lambda s: _post(s, {"model": DENSE, "prompt": "x"}, headers={}), 401,
     "API key", None),
    ("unknown route", lambda s: _post(s, {"model": DENSE}, "/v1/nothing"), 404, "Not Found", None),
    ("wrong method", lambda s: httpx.get(s.base_url + "/v1/completions", headers=AUTH), 405,
     "Method Not Allowed", None),
    # the routed name
    ("routed: token-id prompt", lambda s: _post(s, {"model": ROUTED, "prompt": [1, 2, 3], "max_tokens": 2}),
     400, "send the prompt as a string", None),
    ("routed: chat without a user message", lambda s: _post(
        s, {"model": ROUTED, "max_tokens": 2, "messages": [{"role": "system", "content": "hi"}]},
        "/v1/chat/completions"), 400, "needs a user message", None),
    ("routed: not a generation route", lambda s: _post(s, {"model": ROUTED, "input": "x"}, "/v1/embeddings"),
     400, "is a routed model", "model"),
]


def test_every_error_is_openai_shaped(server, client):
    bad = []
    for name, call, status, fragment, param in ERROR_CASES:
        r = call(server)
        try:
            err = r.json()["error"]
            ok = (r.status_code == status and set(r.json()) == {"error"}
                  and set(err) == {"message", "type", "param", "code"} and err["code"] == status
                  and fragment in err["message"] and (param is None or err["param"] == param)
                  and not any(leak in err["message"] for leak in (
                      "Internal exception", "original exception", "ray.", "vllm.", "Traceback")))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            bad.append((name, r.status_code, r.text[:300]))
    assert not bad, bad
    import openai

    with pytest.raises(openai.NotFoundError):
        greedy(client, "llama-nope", "Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        greedy(client, GSM8K, "hello " * (MAX_MODEL_LEN + 10), max_tokens=2)
    for name in VARIANTS:
        assert greedy(client, name, "Hi", max_tokens=2).usage.completion_tokens == 2


# ---- disconnects free the engine ------------------------------------------------------------------

def _engine_metrics(server) -> dict[str, dict[str, float]]:
    """vLLM's own series on Ray's metrics export port: {name: {variant: value}}."""
    families = prom.scrape(server.metrics_url)
    return {name: prom.sum_by(families, name) for name in (
        "ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting",
        "ray_vllm_generation_tokens_total")}


def _tokens(server) -> float:
    return _engine_metrics(server)["ray_vllm_generation_tokens_total"].get(GSM8K, 0.0)


def test_disconnects_abort_in_the_engine(server, client):
    """N streaming and M non-streaming clients hang up early: vLLM stops generating for them
    (its generated-token counter stops growing within a report interval) and, once the engine
    takes one more step, reports no request running (a gauge is only recorded on an engine
    step: an idle engine keeps its last value until Ray drops the series; docs/serving.md)."""
    import asyncio

    n_stream, n_plain, max_tokens = 12, 4, 400
    before = _tokens(server)
    body = {"model": GSM8K, "max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": True}

    async def hang_up(c, i, stream):
        req = dict(body, prompt=f"Tell me a long story, number {i}:", stream=stream)
        if stream:
            async with c.stream("POST", server.base_url + "/v1/completions", json=req,
                                headers=AUTH) as r:
                assert r.status_code == 200
                async for _ in r.aiter_lines():
                    return  # first event seen: hang up
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(c.post(server.base_url + "/v1/completions", json=req,
                                          headers=AUTH), timeout=1.5)

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            await asyncio.gather(*[hang_up(c, i, i < n_stream) for i in range(n_stream + n_plain)])

    asyncio.run(run())
    time.sleep(4)  # > 1 s abort + one 2 s metrics report interval
    settled = _tokens(server)
    time.sleep(8)
    later = _tokens(server)
    assert later == settled, f"the engine kept generating after every client left: {settled} -> {later}"
    generated = later - before
    assert generated < (n_stream + n_plain) * max_tokens / 4, generated
    # one more request makes the engine step and record its gauges: nothing else is running
    assert greedy(client, GSM8K, "Hi", max_tokens=2).usage.completion_tokens == 2
    deadline = time.time() + 30
    while True:
        m = _engine_metrics(server)
        running = m["ray_vllm_num_requests_running"].get(GSM8K)
        if running == 0.0 or time.time() > deadline:
            break
        time.sleep(1)
    assert running == 0.0, m
    assert m["ray_vllm_num_requests_waiting"].get(GSM8K) == 0.0


# ---- Prometheus -----------------------------------------------------------------------------------

COUNTERS = {
    "requests": "sum by (model_name) (ray_vllm_request_success_total)",
    "prompt_tokens": "sum by (model_name) (ray_vllm_prompt_tokens_total)",
    "generation_tokens": "sum by (model_name) (ray_vllm_generation_tokens_total)",
    "ttft_count": "sum by (model_name) (ray_vllm_time_to_first_token_seconds_count)",
    "e2e_count": "sum by (model_name) (ray_vllm_e2e_request_latency_seconds_count)",
}


def _snapshot(prom) -> dict[str, dict[str, float]]:
    return {k: prom.query(q) for k, q in COUNTERS.items()}


def _settled(prom, timeout=120) -> dict[str, dict[str, float]]:
    """A snapshot that stays the same over a few scrape + report intervals."""
    deadline = time.time() + timeout
    prev = _snapshot(prom)
    while time.time() < deadline:
        time.sleep(8)
        cur = _snapshot(prom)
        if cur == prev and all(VARIANTS[i] in cur["requests"] for i in (1, 2)):
            return cur
        prev = cur
    raise AssertionError(f"Prometheus values never settled: {prev}")


def test_prometheus_counts_requests_per_variant(server, client, prometheus):
    before = _settled(prometheus)
    sent = {GSM8K: 3, ARC: 5}
    expect = {k: {m: 0 for m in sent} for k in COUNTERS}
    for model, n in sent.items():
        for i in range(n):
            r = greedy(client, model, f"Count to {i}:", max_tokens=4 + i)
            expect["prompt_tokens"][model] += r.usage.prompt_tokens
            expect["generation_tokens"][model] += r.usage.completion_tokens
        for k in ("requests", "ttft_count", "e2e_count"):
            expect[k][model] = n
    deadline = time.time() + 120
    while True:
        after = _snapshot(prometheus)
        delta = {k: {m: after[k].get(m, 0) - before[k].get(m, 0) for m in sent} for k in COUNTERS}
        if delta == expect or time.time() > deadline:
            break
        time.sleep(3)
    assert delta == expect
    # the dense variant got nothing in the meantime
    assert after["requests"].get(DENSE, 0) == before["requests"].get(DENSE, 0)
    # the rest of the per-variant series are there too
    # Ray drops a gauge series that an idle engine stops reporting: wake the dense one up and
    # look back over the run.
    greedy(client, DENSE, "Hi", max_tokens=8)
    for expr in ("ray_vllm_inter_token_latency_seconds_count", "ray_vllm_num_requests_running",
                 "ray_vllm_num_requests_waiting"):
        deadline = time.time() + 60
        while True:
            got = prometheus.query(f"max by (model_name) (last_over_time({expr}[30m]))")
            if set(VARIANTS) <= set(got) or time.time() > deadline:
                break
            time.sleep(2)
        assert set(VARIANTS) <= set(got), (expr, got)
    # The tabp gauges are set every 5 s by the ingress, but Ray's agent evicts a gauge that has
    # not been exported for two report intervals, and a busy 2-core machine can delay an export
    # past that: a series may vanish from one scrape. Look back over the run, as a dashboard should.
    def gauge(name):
        return prometheus.query(f"max by (model_name) (last_over_time({name}[10m]))")

    deadline = time.time() + 60
    want_kept = {DENSE: 30, GSM8K: 26, ARC: 25, COMMONSENSE: 27}
    while (kept := gauge("ray_tabp_variant_blocks_kept")) != want_kept and time.time() < deadline:
        time.sleep(2)
    total = gauge("ray_tabp_variant_blocks_total")
    speed = gauge("ray_tabp_variant_theoretical_speedup")
    raw = [l for l in httpx.get(server.metrics_url, timeout=30).text
           .splitlines() if "tabp_" in l and not l.startswith("#")]
    assert kept == want_kept, raw
    assert total == {DENSE: 30, GSM8K: 30, ARC: 30, COMMONSENSE: 30}
    assert speed[DENSE] == 1.0 and speed[ARC] > speed[GSM8K] > 1.0


# ---- the routed name (serve --router) ----------------------------------------------------------

ARITHMETIC_ASKED = ["What is 48 + 17?", "Compute 6 * 13.", "What is 250 minus 75?"]
COMMONSENSE_ASKED = ["Why do people wear sunglasses?", "Where do penguins live?"]


def _routed_counts(prom, by: str = "model_name") -> dict[str, float]:
    return prom.query(f'sum by ({by}) (ray_tabp_routed_requests_total{{routed_name="{ROUTED}"}})',
                      by=by)


def test_routed_requests_land_on_their_variant(server, client, prometheus):
    """Each kind of question sent to llama-auto is answered by its cluster's variant: the
    response says so (header and `model`), and Prometheus counts it there and nowhere else."""
    before = _settled(prometheus)
    routed_before = _routed_counts(prometheus)
    fallback_before = _routed_counts(prometheus, "fallback")
    latency_before = prometheus.query("sum(ray_tabp_routing_latency_seconds_count)").get("", 0)
    # each prompt routed once and asked directly once; 2 more commonsense ones (chat, stream);
    # the far one falls back to the gsm8k variant
    want = {GSM8K: 2 * len(ARITHMETIC_ASKED) + 2, COMMONSENSE: 2 * len(COMMONSENSE_ASKED) + 2}
    for prompts, variant in ((ARITHMETIC_ASKED, GSM8K), (COMMONSENSE_ASKED, COMMONSENSE),
                             ([FAR_ASKED], GSM8K)):
        for prompt in prompts:
            raw = client.completions.with_raw_response.create(model=ROUTED, prompt=prompt,
                                                              max_tokens=4, temperature=0)
            assert raw.headers["x-tabp-variant"] == variant, prompt
            assert raw.headers["x-tabp-cluster"] in ("0", "1")
            assert raw.headers["x-tabp-fallback"] == ("1" if prompt == FAR_ASKED else "0"), prompt
            r = raw.parse()
            assert r.model == variant and r.usage.completion_tokens == 4
            # the same answer as asking that variant directly (greedy)
            assert r.choices[0].text == greedy(client, variant, prompt, max_tokens=4).choices[0].text
    # chat routes by the last user message; streaming chunks name the variant too
    chat = client.chat.completions.create(
        model=ROUTED, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": "What is 7 + 8?"}, {"role": "assistant", "content": "15"},
                  {"role": "user", "content": "Why do birds fly south in winter?"}])
    assert chat.model == COMMONSENSE
    chunks = list(client.completions.create(model=ROUTED, prompt="Why does bread go stale?",
                                            max_tokens=4, temperature=0, stream=True))
    assert {c.model for c in chunks} == {COMMONSENSE}
    n_routed = len(ARITHMETIC_ASKED) + len(COMMONSENSE_ASKED) + 3
    want_routed = {GSM8K: len(ARITHMETIC_ASKED) + 1, COMMONSENSE: len(COMMONSENSE_ASKED) + 2}
    want_fallback = {"0": n_routed - 1, "1": 1}
    deadline = time.time() + 120
    while True:
        after = _snapshot(prometheus)["requests"]
        delta = {m: after.get(m, 0) - before["requests"].get(m, 0) for m in VARIANTS}
        routed = {m: v - routed_before.get(m, 0) for m, v in _routed_counts(prometheus).items()}
        fell = {f: v - fallback_before.get(f, 0)
                for f, v in _routed_counts(prometheus, "fallback").items()}
        if (delta == {DENSE: 0, ARC: 0, **want} and routed == want_routed
                and fell == want_fallback) or time.time() > deadline:
            break
        time.sleep(3)
    assert delta == {DENSE: 0, ARC: 0, **want}
    assert routed == want_routed
    assert fell == want_fallback  # the counter's fallback label: one request fell back
    latency = prometheus.query("sum(ray_tabp_routing_latency_seconds_count)").get("", 0)
    assert latency - latency_before == n_routed


DASHBOARD = REPO / "examples" / "grafana" / "tabp-vllm-dashboard.json"


def _dashboard_exprs(doc: dict) -> list[str]:
    panels = [p for top in doc["panels"] for p in [top, *top.get("panels", [])]]  # rows nest
    exprs = [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]
    exprs += [v["query"]["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return exprs


def _grafana_to_promql(expr: str) -> str:
    """What Grafana sends for "All" variants over the last few minutes."""
    m = re.match(r"^label_values\((.+), *\w+\)$", expr)  # a variable's query: its metric
    expr = m.group(1) if m else expr
    return expr.replace("$model_name", ".*").replace("$__rate_interval", "5m")


def test_grafana_dashboard_queries_return_series(server, client, prometheus):
    exprs = _dashboard_exprs(json.loads(DASHBOARD.read_text()))
    assert len(exprs) >= 10
    empty = exprs
    deadline = time.time() + 120
    while empty and time.time() < deadline:
        # traffic on every variant: gauges of an idle engine drop out of Ray's export
        for model in VARIANTS + [ROUTED]:
            greedy(client, model, "Once upon a time", max_tokens=6)
        time.sleep(5)
        empty = [e for e in exprs if not prometheus.query(_grafana_to_promql(e))]
    assert not empty, f"dashboard queries with no series: {empty}"


# ---- fault: kill one variant's replica (last: it leaves that variant restarting) ---------------

def _replica_pids(sid: int, variant: str) -> list[int]:
    import psutil

    want = f"ServeReplica:tabp:LLMServer:{variant}"
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            title = " ".join(p.info["cmdline"] or []).strip()
            if os.getsid(p.pid) == sid and (title == f"ray::{want}" or title.startswith(f"ray::{want} ")):
                pids.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return pids


def _stream_until_end(client, model, started: threading.Event, outcome: list) -> None:
    """One long stream; `outcome` gets ('completed' | 'error-event' | 'cut', detail)."""
    import openai

    try:
        stream = client.completions.create(model=model, prompt="Tell me a long story:",
                                           max_tokens=400, temperature=0.8, stream=True,
                                           extra_body={"ignore_eos": True})
        for _ in stream:
            started.set()
        outcome.append(("completed", ""))
    except openai.APIError as exc:  # an SSE error event (or an HTTP error status)
        outcome.append(("error-event" if "temporarily unavailable" in str(exc) else "cut", repr(exc)))
    except Exception as exc:  # noqa: BLE001 - a cut connection, a timeout
        outcome.append(("cut", repr(exc)))
    finally:
        started.set()


def test_killed_replica_other_variant_unaffected_and_restarts(server, client):
    """Kill one variant's replica while its streams run and another variant serves traffic: the
    streams end with an OpenAI error event (not a hang, not a cut connection), the variant comes
    back, the other variant never fails."""
    pids = _replica_pids(server.pid, ARC)
    assert len(pids) == 1, pids
    results, errors = [], []
    stop = threading.Event()

    def traffic():
        # paced: back to back, these requests took CPU from the killed replica's restart (2 cores)
        while not stop.is_set() and len(results) < 200:
            try:
                results.append(greedy(client, GSM8K, "The sky is", max_tokens=4).choices[0].text)
            except Exception as exc:  # noqa: BLE001 - any failure counts
                errors.append(repr(exc))
            stop.wait(0.5)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        streamer = server.openai_client(timeout=120, max_retries=0)
        streams = []
        for _ in range(3):
            started, outcome = threading.Event(), []
            th = threading.Thread(target=_stream_until_end, args=(streamer, ARC, started, outcome))
            th.start()
            streams.append((th, started, outcome))
        for _, started, _ in streams:
            assert started.wait(120), "a stream never started"
        time.sleep(1)
        os.kill(pids[0], signal.SIGKILL)
        t_kill = time.time()
        for th, _, _ in streams:
            th.join(timeout=90)
        ended_s = time.time() - t_kill
        outcomes = [o[0][0] if o else "hung" for _, _, o in streams]
        assert outcomes == ["error-event"] * 3 and ended_s < 30, ([o for _, _, o in streams], ended_s)
        t0 = time.time()
        back = False
        while time.time() - t0 < READY_TIMEOUT:
            new = _replica_pids(server.pid, ARC)
            if new and new != pids:
                try:
                    if greedy(client, ARC, "The sky is", max_tokens=2).usage.completion_tokens == 2:
                        back = True
                        break
                except Exception:  # noqa: BLE001 - still restarting
                    pass
            time.sleep(3)
    finally:  # a failed check must not leave the traffic thread spinning
        stop.set()
        t.join(timeout=300)
    assert not errors, errors[:3]
    assert len(results) >= 5 and len(set(results)) == 1
    assert back, "the killed variant did not come back"
