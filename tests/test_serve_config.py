"""`serve` before Ray: option/YAML parsing, naming, validation (fast, no engine)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tabp_vllm.errors import TabpError
from tabp_vllm.serve.commands import build_spec
from tabp_vllm.serve.deploy import ingress_options, ray_cpus_needed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def two_masks(write_mask):
    return write_mask([20, 21, 22, 23], task="gsm8k", name="g.json"), \
        write_mask([10, 11, 12, 13, 25], task="arc", name="a.json")


def test_names_blocks_and_speedup(two_masks):
    spec = build_spec(task_mask=list(two_masks), max_model_len=512, kv_cache_gib=0.25)
    assert [v.name for v in spec.variants] == ["llama", "llama-gsm8k", "llama-arc"]
    dense, g, a = spec.variants
    assert (dense.blocks_kept, g.blocks_kept, a.blocks_kept) == (30, 26, 25)
    assert dense.theoretical_speedup == 1.0 < g.theoretical_speedup < a.theoretical_speedup < 30 / 25
    assert g.metadata()["mask_hash"] == g.mask_hash and len(g.mask_hash) == 12
    assert ray_cpus_needed(spec) == 7
    assert spec.host == "127.0.0.1"


def test_task_override_and_no_dense(two_masks):
    spec = build_spec(task_mask=list(two_masks), task=["math"], dense=False)
    assert [v.name for v in spec.variants] == ["llama-math", "llama-arc"]
    assert spec.variants[0].task == "math"


def test_duplicate_and_empty_are_errors(two_masks):
    with pytest.raises(TabpError, match="two variants are named"):
        build_spec(task_mask=[two_masks[0], two_masks[0]])
    with pytest.raises(TabpError, match="nothing to serve"):
        build_spec(dense=False)
    with pytest.raises(TabpError, match="--engine-arg"):
        build_spec(engine_arg=["novalue"])


def test_llm_configs_carry_engine_args(two_masks):
    from tabp_vllm.serve.deploy import llm_configs

    spec = build_spec(task_mask=[two_masks[0]], max_model_len=512, kv_cache_gib=0.25,
                      replicas=2, engine_arg=["max_num_seqs=8"])
    dense, pruned = llm_configs(spec)
    assert pruned.model_id == "llama-gsm8k"
    kw = pruned.engine_kwargs
    assert kw["load_format"] == "tabp_pruned" and kw["hf_overrides"]["num_hidden_layers"] == 26
    assert kw["model_loader_extra_config"]["tabp_removed_layers"] == [20, 21, 22, 23]
    assert kw["max_model_len"] == 512 and kw["max_num_seqs"] == 8
    assert kw["kv_cache_memory_bytes"] == int(0.25 * 1024**3)
    assert "hf_overrides" not in dense.engine_kwargs
    assert pruned.deployment_config["num_replicas"] == 2


def test_request_path_options_reach_the_app(tmp_path, two_masks):
    """Defaults leave Ray Serve LLM's own settings; given ones land in the LLMConfigs and the
    ingress deployment's options, file < CLI."""
    from tabp_vllm.serve.deploy import llm_configs

    ray_defaults = {"max_ongoing_requests": 10**9,
                    "autoscaling_config": {"target_ongoing_requests": 10**9}}
    plain = build_spec(task_mask=[two_masks[0]])
    assert all("stream_batching_interval_ms" not in c.experimental_configs for c in llm_configs(plain))
    assert ingress_options(plain, ray_defaults) == ray_defaults

    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"request_path": {"stream_batching_interval_ms": 10,
                                                    "ingress_replicas": 3}}))
    spec = build_spec(config=cfg, stream_batching_interval_ms=0.0, ingress_max_ongoing_requests=64)
    assert {c.experimental_configs["stream_batching_interval_ms"] for c in llm_configs(spec)} == {0.0}
    options = ingress_options(spec, ray_defaults)
    assert options == {"max_ongoing_requests": 64, "num_replicas": 3}
    # the local Ray gets a logical CPU for every ingress replica (else the 2nd never schedules)
    assert len(spec.variants) == 1 and ray_cpus_needed(spec) == 2 + 3
    assert ray_defaults["max_ongoing_requests"] == 10**9  # Ray's dict is not changed
    with pytest.raises(TabpError, match="request_path.ingress_replicas"):
        build_spec(ingress_replicas=0)


def test_ray_serve_profile_sets_the_environment_a_user_did_not():
    from tabp_vllm.serve.deploy import apply_ray_serve_profile
    from tabp_vllm.serve.options import RAY_SERVE_PROFILES

    assert build_spec().request_path.ray_serve == "throughput-optimized"  # measured best (docs/serving.md)
    env = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "2"}  # the user's own value wins
    applied = apply_ray_serve_profile("lean", env)
    assert applied == env == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                              "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
                              "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "2",
                              "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}
    # the default profile turns direct ingress on: a local server's Ctrl-C must not wait its 30 s
    # drain for a load balancer that is not there (unless the user asks for one)
    env = {}
    assert apply_ray_serve_profile("throughput-optimized", env)[
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "0"
    env = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "30"}
    assert apply_ray_serve_profile("throughput-optimized", env)[
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"
    env = {}
    assert apply_ray_serve_profile("default", env) == {} and env == {}
    assert set(RAY_SERVE_PROFILES["throughput-optimized"]) < set(RAY_SERVE_PROFILES["lean"])
    assert build_spec(ray_serve="default").request_path.ray_serve == "default"
    with pytest.raises(TabpError, match="request_path.ray_serve"):
        build_spec(ray_serve="fast")


def test_yaml_config(tmp_path, two_masks):
    (tmp_path / "m").mkdir()
    for p in two_masks:
        p.rename(tmp_path / "m" / p.name)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": "llama", "dense_name": "llama-dense", "port": 8050, "replicas": 1,
        "engine": {"max_model_len": 256, "kv_cache_gib": 0.5, "extra": {"max_num_seqs": 4}},
        "variants": [{"mask": "m/g.json"}, {"mask": "m/a.json", "task": "arc-easy"},
                     {"mask": "m/a.json", "name": "tiny"}],
    }))
    spec = build_spec(config=cfg)
    assert [v.name for v in spec.variants] == ["llama-dense", "llama-gsm8k", "llama-arc-easy", "tiny"]
    assert spec.port == 8050 and spec.engine.max_model_len == 256
    assert spec.engine.extra == {"max_num_seqs": 4}


def test_example_yaml_parses():
    from tabp_vllm.serve.options import load_yaml_spec

    doc = load_yaml_spec(REPO / "examples" / "serve.yaml")
    assert doc["model"] == "llama" and len(doc["variants"]) == 2


def test_bad_yaml_is_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: llama\nvariantz: []\n")
    with pytest.raises(TabpError, match="unknown key"):
        build_spec(config=cfg)


def test_bad_mask_fails_before_ray_with_one_line(write_mask, tmp_path):
    bad = write_mask([3], task="x", edit=lambda d: d.update(removed_layers=[99]))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "tabp_vllm", "serve", "--task-mask", str(bad),
                           "--port", "8099"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Triton" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert time.time() - t0 < 120


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:1", "no Ray cluster answers there"),   # nobody listens: fail in seconds, not minutes
    ("no-port-here", "expected auto, HOST:PORT"),
])
def test_unreachable_cluster_is_one_line(address, message):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "tabp_vllm", "serve", "--no-dense", "--task-mask",
                           str(REPO / "bench/results/masks/k4.json"), "--address", address],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Triton" not in ln]
    assert len(lines) == 1 and message in lines[0] and address in lines[0], proc.stderr
    assert time.time() - t0 < 120


def test_memory_estimate_and_refusal_before_ray(two_masks, monkeypatch):
    """`serve` estimates the memory of its variants first and refuses, in one line and before Ray
    starts, a set that cannot fit what the machine has available (here a fake 3 GiB)."""
    from collections import namedtuple

    import psutil
    import typer
    from typer.testing import CliRunner

    from tabp_vllm.memory import GiB
    from tabp_vllm.memory import (CPU_APP_OVERHEAD_GIB, CPU_ENGINE_IN_REPLICA_OVERHEAD_GIB,
                                  CPU_ENGINE_OVERHEAD_GIB)
    from tabp_vllm.serve.commands import serve
    from tabp_vllm.serve.spec import check_memory

    spec = build_spec(task_mask=list(two_masks), kv_cache_gib=0.5, dtype="float32")
    need, per = spec.cpu_memory_estimate()
    assert list(per) == ["llama", "llama-gsm8k", "llama-arc"]
    # the dense demo model in float32: 134.5M parameters (tied head) = 0.50 GiB; + the packed
    # embedding and head (2 x 49,152 x 576 x 4 bytes) and the tokenizers (4 x 800 x 49,152 bytes)
    extra = (2 * 49152 * 576 * 4 + 4 * 800 * 49152) / GiB
    assert per["llama"] == pytest.approx((0.501 + 0.5 + extra + CPU_ENGINE_OVERHEAD_GIB) * GiB,
                                         rel=1e-2)
    assert per["llama"] > per["llama-gsm8k"] > per["llama-arc"]      # fewer blocks, fewer bytes
    assert need == int(CPU_APP_OVERHEAD_GIB * GiB) + sum(per.values())
    check_memory(spec, available_bytes=need + 1)
    with pytest.raises(TabpError, match=r"^3 variants need ~\d+\.\d GiB .* 3\.0 GiB is available: "
                       r"serve fewer variants, add --engine-in-replica or lower --kv-cache-gib"):
        check_memory(spec, available_bytes=3 * GiB)
    # one process per variant (the engine core in the replica): its own, smaller overhead
    lean = build_spec(task_mask=list(two_masks), kv_cache_gib=0.5, dtype="float32",
                      cpu_engine_in_replica=True)
    lean_need, lean_per = lean.cpu_memory_estimate()
    assert lean_per["llama"] == pytest.approx(
        (0.501 + 0.5 + extra + CPU_ENGINE_IN_REPLICA_OVERHEAD_GIB) * GiB, rel=1e-2)
    assert lean_need < need
    with pytest.raises(TabpError, match=r"serve fewer variants or lower --kv-cache-gib$"):
        check_memory(lean, available_bytes=3 * GiB)

    Mem = namedtuple("Mem", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem(3 * GiB))
    app = typer.Typer()
    app.command()(serve)
    args = ["--task-mask", str(two_masks[0]), "--task-mask", str(two_masks[1]), "--dry-run"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: 3 variants need ~")
    assert CliRunner().invoke(app, [*args, "--no-memory-check"]).exit_code == 0


def test_one_progress_line_per_variant_as_it_becomes_ready(two_masks, monkeypatch):
    """`wait_running` polls Serve's status while the app deploys and prints one line per variant
    when all its replicas run (fake status here; tests/test_serve.py sees the real lines)."""
    from types import SimpleNamespace as NS

    from ray import serve

    from tabp_vllm.serve import deploy

    spec = build_spec(task_mask=list(two_masks))
    steps = iter([{}, {"LLMServer:llama-arc": 1}, {"LLMServer:llama-arc": 1, "LLMServer:llama": 1},
                  {"LLMServer:llama-arc": 1, "LLMServer:llama": 1, "LLMServer:llama-gsm8k": 1}])

    def status():
        running = next(steps)
        deps = {name: NS(replica_states={"RUNNING": n}) for name, n in running.items()}
        deps["TabpIngress"] = NS(replica_states={"RUNNING": 1})
        app = NS(status="RUNNING" if len(running) == 3 else "DEPLOYING", deployments=deps,
                 message="")
        return NS(applications={deploy.APP_NAME: app})

    monkeypatch.setattr(serve, "status", status)
    lines: list[str] = []
    deploy.wait_running(spec, log=lines.append, poll_s=0)
    assert [ln.split(" (")[0] for ln in lines] == [
        "ready: llama-arc", "ready: llama", "ready: llama-gsm8k"]
    assert lines[-1].startswith("ready: llama-gsm8k (3/3 variants, ")

    failed = NS(applications={deploy.APP_NAME: NS(status="DEPLOY_FAILED", deployments={},
                                                    message="replica crashed")})
    monkeypatch.setattr(serve, "status", lambda: failed)
    with pytest.raises(RuntimeError, match="replica crashed"):
        deploy.wait_running(spec, log=lines.append, poll_s=0)


# ---- serve --router ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_kind_router(tmp_path_factory, demo_model):
    from routers import build_two_kind_router

    path = tmp_path_factory.mktemp("router") / "mix.json"
    build_two_kind_router(demo_model, {"arithmetic": [20, 21, 22, 23],
                                       "commonsense": [10, 11, 12, 13]}, path)
    return path


def test_router_variants_share_equal_masks(two_masks, two_kind_router):
    import json

    spec = build_spec(task_mask=[two_masks[0]], router=str(two_kind_router))
    # the arithmetic cluster's mask is the --task-mask's: one variant; the other is new
    assert [v.name for v in spec.variants] == ["llama", "llama-gsm8k", "llama-auto-0"]
    doc = json.loads(two_kind_router.read_text())
    tasks = [c["mask"]["task"] for c in doc["clusters"]]
    expect = ["llama-gsm8k" if t == "arithmetic" else "llama-auto-0" for t in tasks]
    assert spec.routed.name == "llama-auto" and spec.routed.cluster_variants == expect
    new = spec.variants[2]
    assert new.blocks_kept == 26 and new.clusters == [tasks.index("commonsense")]
    assert new.metadata()["router_clusters"] == new.clusters
    app = spec.routed_app_config()
    assert app["cluster_variants"] == expect and app["router"]["format"] == "tabp-vllm-router"
    assert "router_doc" not in json.dumps(spec.to_dict())
    # without the --task-mask both clusters get new variants; a name of one's own
    spec = build_spec(router=str(two_kind_router), dense=False, routed_name="mix")
    assert sorted(v.name for v in spec.variants) == ["mix-0", "mix-1"]
    assert spec.routed.name == "mix" and spec.routed.fallback_variant is None


def test_router_fallback_variant(tmp_path, two_masks, demo_model):
    """The fallback mask gets a variant like a cluster's: the --task-mask's when equal, else one
    of its own; the ingress config names it."""
    from routers import build_two_kind_router

    masks = {"arithmetic": [20, 21, 22, 23], "commonsense": [10, 11, 12, 13]}
    path = tmp_path / "fb.json"
    build_two_kind_router(demo_model, masks, path, fallback=([20, 21, 22, 23], 0.9))
    spec = build_spec(task_mask=[two_masks[0]], router=str(path))
    assert [v.name for v in spec.variants] == ["llama", "llama-gsm8k", "llama-auto-0"]
    assert spec.routed.fallback_variant == "llama-gsm8k"
    assert spec.routed_app_config()["fallback_variant"] == "llama-gsm8k"
    build_two_kind_router(demo_model, masks, path, fallback=([1, 2, 3, 4], 0.9))
    spec = build_spec(router=str(path), dense=False)
    assert [v.name for v in spec.variants] == ["llama-auto-0", "llama-auto-1", "llama-auto-2"]
    assert spec.routed.fallback_variant == "llama-auto-2"
    assert spec.variants[2].task == "clusters fallback" and spec.variants[2].clusters == []


def test_router_errors_are_one_line_before_ray(tmp_path, two_kind_router, demo_model):
    import json

    doc = json.loads(two_kind_router.read_text())
    with pytest.raises(TabpError, match="--routed-name needs --router"):
        build_spec(routed_name="auto")
    with pytest.raises(TabpError, match="also a variant's name"):
        build_spec(router=str(two_kind_router), routed_name="llama")
    other = json.loads(json.dumps(doc))
    other["model"]["fingerprint"]["num_hidden_layers"] = 24
    other["num_hidden_layers"] = 24
    for c in other["clusters"]:
        c["mask"]["model"]["fingerprint"]["num_hidden_layers"] = 24
        c["mask"]["num_hidden_layers"] = 24
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(TabpError, match="router was made for model"):
        build_spec(router=str(tmp_path / "other.json"))
    gone = json.loads(json.dumps(doc))
    gone["encoder"]["name"] = str(tmp_path / "no-such-encoder")
    (tmp_path / "gone.json").write_text(json.dumps(gone))
    with pytest.raises(TabpError, match="encoder cannot be loaded"):
        build_spec(router=str(tmp_path / "gone.json"))
    # the CLI: one line, exit 2, nothing started
    r = subprocess.run([sys.executable, "-m", "tabp_vllm", "serve", "--router",
                        str(tmp_path / "gone.json"), "--dry-run"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "encoder" in r.stderr


def test_dry_run_table_shows_weights_total_and_routes(two_kind_router):
    r = subprocess.run([sys.executable, "-m", "tabp_vllm", "serve", "--router", str(two_kind_router),
                        "--dry-run", "--no-dense"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "llama-auto-0" in r.stdout and "llama-auto-1" in r.stdout and "total" in r.stdout
    assert "GiB" in r.stdout
    routes = next(l for l in r.stdout.splitlines() if l.startswith("routed:"))
    assert "llama-auto (2 clusters" in routes and "cluster 0 -> llama-auto-" in routes


def test_sublayer_variant_kv_cache_table_and_memory(tmp_path, demo_model):
    """An attention-only mask: its sublayer counts, KV bytes per token and KV cache tokens in the
    metadata `/v1/models` and the gauges show, in the startup table, and in the memory estimate."""
    import io

    from tabp_vllm.mask import make_mask
    from tabp_vllm.serve.console import print_table

    path = tmp_path / "attn.json"
    make_mask(demo_model, [], removed_attention=list(range(15, 23)), task="attn",
              model_id="llama").save(path)
    spec = build_spec(task_mask=[str(path)], kv_cache_gib=0.25, dtype="float32")
    dense, attn = spec.variants
    assert (attn.blocks_kept, attn.attention_kept, attn.mlp_kept) == (30, 22, 30)
    assert 1.0 < attn.theoretical_speedup < 30 / 22
    meta = spec.variant_metadata(gpu=False)
    # float32 demo: 1,536 bytes a token per attention kept; 0.25 GiB in 128-token blocks
    assert meta["llama"]["kv_bytes_per_token"] == 46_080 and meta["llama"]["kv_cache_tokens"] == 5_760
    assert meta["llama-attn"]["kv_bytes_per_token"] == 33_792
    assert meta["llama-attn"]["kv_cache_tokens"] == 7_936
    assert (meta["llama-attn"]["attention_kept"], meta["llama-attn"]["mlp_kept"]) == (22, 30)
    assert spec.kv_cache(gpu=True)["llama"]["kv_cache_tokens"] == 5_824  # 16-token GPU blocks
    # weights shrink by the 8 attention sublayers only
    needs = {n.name: n for n in spec.engine_needs(gpu=False)}
    attn_bytes = (576 * 576 * 2 + 576 * 192 * 2 + 576) * 4
    assert needs["llama"].weight_bytes - needs["llama-attn"].weight_bytes == 8 * attn_bytes
    out = io.StringIO()
    print_table(spec, out)
    row = next(line for line in out.getvalue().splitlines() if "llama-attn" in line)
    assert "22/30" in row and "33,792" in row and "7,936" in row
