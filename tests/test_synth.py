"""Synthetic checkpoints (tabp_vllm.synth), the timed decode (tabp_vllm.timed_decode) and the GPU
bench (bench/gpu_check.sh -> bench/gpu.py), on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tabp_vllm import timed_decode
from tabp_vllm.synth import ARCHS, PUBLISHED_PARAMS, arch_config, meta_model, synth_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TABP_VLLM_DATA", REPO.parent / "shared" / "data"))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("model-*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, demo_model):
    root = tmp_path_factory.mktemp("synth")
    # a tiny shard size forces several shards, so the index and sharded loading are exercised
    res = synth_model("tiny-llama", root / "s0", seed=0, device="cpu", tokenizer=demo_model,
                      shard_gib=4 / 1024, log=lambda m: None)
    return root, res


def test_tiny_checkpoint_loads_and_runs(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, res = tiny
    path = root / "s0"
    assert res["shards"] > 1
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = _tensors(path)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                 for t in tensors.values())
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tabp_synthetic"]["speed_only"] is True
    assert cfg["tabp_synthetic"]["arch"] == "tiny-llama" and cfg["tabp_synthetic"]["seed"] == 0
    assert "speed" in (path / "README.md").read_text() and "random weights" in cfg[
        "tabp_synthetic"]["note"]

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    assert model.config.num_hidden_layers == ARCHS["tiny-llama"]["num_hidden_layers"]
    # every tensor came from the checkpoint, none was left to the init
    sd = model.state_dict()
    for name, t in tensors.items():
        assert torch.equal(sd[name].to(t.dtype), t), name
    assert torch.all(tensors["model.norm.weight"] == 1)
    assert 0.015 < tensors["model.layers.0.mlp.up_proj.weight"].float().std() < 0.025
    ids = tok("The three primary colors are", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], ARCHS["tiny-llama"]["vocab_size"])
    assert torch.isfinite(logits).all()


def test_seeded(tiny, demo_model):
    root, _ = tiny
    kw = dict(device="cpu", tokenizer=demo_model, log=lambda m: None)
    synth_model("tiny-llama", root / "s0b", seed=0, **kw)  # default shard size: one shard
    synth_model("tiny-llama", root / "s1", seed=1, **kw)
    a, b, c = _tensors(root / "s0"), _tensors(root / "s0b"), _tensors(root / "s1")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)  # same seed, other shard layout: identical
    w = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(a[w], c[w])
    assert not torch.equal(a[w], a["model.layers.2.self_attn.q_proj.weight"])


@pytest.mark.parametrize("arch", sorted(PUBLISHED_PARAMS))
def test_published_shapes_on_meta(arch):
    cfg = arch_config(arch)
    model = meta_model(cfg)
    params = list(model.parameters())
    assert all(p.is_meta for p in params)  # nothing allocated
    n = sum(p.numel() for p in params)
    assert abs(n / PUBLISHED_PARAMS[arch] - 1) < 0.002, n
    names = dict(model.named_parameters())
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == (arch == "qwen2.5-7b")
    assert model.lm_head.weight.shape == (cfg.vocab_size, cfg.hidden_size)
    assert not cfg.tie_word_embeddings


def test_unknown_arch_is_one_line_error():
    from tabp_vllm.errors import TabpError

    with pytest.raises(TabpError, match="unknown --arch"):
        arch_config("gpt-5")


def test_removed_blocks_latter_half_final_kept():
    for k in (4, 8):
        r = timed_decode.removed_blocks(32, k)
        assert len(r) == k and min(r) >= 16 and max(r) <= 30
    assert timed_decode.removed_blocks(4, 1) == [2]
    assert timed_decode.removed_blocks(4, 2) == [1, 2]  # latter half too short: blocks 1..B-2
    with pytest.raises(ValueError):
        timed_decode.removed_blocks(4, 3)


def test_timed_decode_matches_generate_with_blocks_deleted(tiny):
    """The bench's manual decode loop is greedy decoding of the model with the blocks deleted."""
    from transformers import AutoModelForCausalLM

    root, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(str(root / "s0"), dtype=torch.float32).eval()
    vs = timed_decode.Variants(model)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    outs = {}
    for removed in ([], [2], [1, 2], []):
        vs.use(removed)
        got = timed_decode.generate_timed(model, ids, 6, "cpu")
        assert len(got["steps_s"]) == 5
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                 attention_mask=torch.ones_like(ids))
        assert torch.equal(got["tokens"], ref[:, ids.shape[1]:]), removed
        outs.setdefault(tuple(removed), []).append(got["tokens"])
    assert torch.equal(*outs[()])  # switching variants back restores the dense model
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4


def _gpu_check(tmp_path, script: str, timeout: int, **settings: str) -> dict:
    """Run bench/gpu_check.sh on the CPU with these environment settings (tiny shape) and return
    the JSON document of `script` (gpu_scale / gpu_vllm / gpu_serve), its log tail on failure."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "ARCH": "tiny-llama", "BATCHES": "1,2",
           "PROMPT_LEN": "16", "ROUNDS": "2", "DEVICE": "cpu", "MODEL_DIR": str(tmp_path / "model"),
           **settings}
    # its own session: the script's `timeout` and the scorers it starts never signal pytest's group
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)
    log = (out / f"{script}.log").read_text() if (out / f"{script}.log").exists() else ""
    assert proc.returncode == 0, log[-4000:] + proc.stderr[-3000:]
    doc = json.loads((out / f"{script}.json").read_text())
    assert doc["ok"] and not doc["errors"] and doc["env"]["device"] == "cpu"
    return doc


def test_gpu_check_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "out"
    doc = _gpu_check(tmp_path, "gpu_scale", 660, KS="1,2", NEW_TOKENS="4", SCORE_SAMPLES="8",
                     SCORE_K="1", SLEB_SAMPLES="4", SCORE_RESERVE_S="0",
                     # a cap, not the expected time (34 s on an idle 2-core box): under load from
                     # other jobs a tight deadline made the script skip its scoring steps
                     DEADLINE_S="540", TABP_VLLM_DATA=str(SHARED_DATA))
    assert doc["env"]["cpu_fallback"] is True
    assert {"env", "synth", "speed", "variants", "scoring", "steps", "skipped", "note"} <= set(doc)
    assert doc["variants"]["k1"]["removed_layers"] == [2]
    runs = doc["speed"]["runs"]
    assert [r["variant"] for r in runs[:3]] == ["dense", "k1", "k2"]  # interleaved
    assert len(runs) == 2 * 2 * 3
    summ = {(s["variant"], s["batch"]): s for s in doc["speed"]["summary"]}
    assert summ[("k2", 2)]["ideal_speedup"] > summ[("k1", 2)]["ideal_speedup"] > 1
    assert summ[("dense", 1)]["speedup_output_tokens_per_s"] == 1
    for key in ("prefill_ms", "tpot_p50_ms", "tpot_p99_ms", "output_tokens_per_s"):
        assert summ[("k1", 1)][key] > 0
    for method in ("tabp", "block_influence"):
        s = doc["scoring"][method]
        assert s["rc"] == 0 and len(s["removed_layers"]) == 1 and s["wall_s"] > 0
        assert (out / f"mask_{method}.json").exists()
    assert (out / "gpu_scale.png").stat().st_size > 10_000
    assert "step speed done" in (out / "gpu_scale.log").read_text()
    assert len(list(out.iterdir())) <= 8


@pytest.mark.parametrize("arch", ["qwen2.5-7b", "mistral-7b"])
def test_block_deletion_other_families(arch):
    """Qwen2 (q/k/v bias, layer_types) and Mistral (sliding window) shrunk to 4 tiny blocks:
    the bench's variants decode like `generate` on the same model, and switch back cleanly."""
    from transformers import AutoModelForCausalLM

    cfg = arch_config(arch, num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                      max_window_layers=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    vs = timed_decode.Variants(model)
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    for removed in ([1, 2], []):
        vs.use(removed)
        got = timed_decode.generate_timed(model, ids, 5, "cpu")
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                 attention_mask=torch.ones_like(ids))
        assert torch.equal(got["tokens"], ref[:, ids.shape[1]:]), removed
        if getattr(model.config, "layer_types", None) is not None:
            assert len(model.config.layer_types) == 4 - len(removed)


def test_gpu_check_vllm_engines_on_cpu(tmp_path):
    """ENGINE=vllm: the variants are real vLLM engines built by tabp_vllm.engine (the pruned loader),
    all alive at once and measured interleaved; on the CPU engine here, tiny shape."""
    out = tmp_path / "out"
    doc = _gpu_check(tmp_path, "gpu_vllm", 660, ENGINE="vllm", KS="1", NEW_TOKENS="4",
                     DEADLINE_S="540")
    engines = doc["speed"]["engines"]
    # what each engine actually built: the loader dropped block 2 and its weights
    assert engines["dense"]["model_stats"]["num_layers"] == 4
    assert engines["k1"]["model_stats"]["num_layers"] == 3
    assert engines["k1"]["removed_layers"] == [2]
    assert 0 < engines["k1"]["model_stats"]["weight_bytes"] < engines["dense"]["model_stats"]["weight_bytes"]
    runs = doc["speed"]["runs"]
    assert [r["variant"] for r in runs[:2]] == ["dense", "k1"] and len(runs) == 2 * 2 * 2
    assert all(r["output_tokens"] == r["batch"] * 4 for r in runs)  # EOS ignored, every token made
    summ = {(s["variant"], s["batch"]): s for s in doc["speed"]["summary"]}
    assert summ[("dense", 2)]["speedup_output_tokens_per_s"] == 1
    assert summ[("k1", 2)]["ideal_speedup"] > 1 and summ[("k1", 2)]["tpot_mean_ms"] > 0
    assert (out / "gpu_vllm.png").stat().st_size > 10_000


def test_gpu_check_serve_against_bare_vllm_on_cpu(tmp_path):
    """ENGINE=serve: `tabp-vllm serve` (Ray Serve, dense + one pruned variant through the loader)
    and a bare vLLM api_server of the same checkpoint, loaded by `tabp-vllm bench` interleaved; on
    the CPU engine here, tiny shape. What a GPU run of bench/gpu_check.sh returns, end to end."""
    out = tmp_path / "out"
    # 1 s measured per slice (2 rounds) and a 0.5 s ramp: ~10 tiny-model requests per slice,
    # enough for every target to complete some at each level (4 s / 1 s took 18 s more)
    doc = _gpu_check(tmp_path, "gpu_serve", 720, ENGINE="serve", KS="1", NEW_TOKENS="8",
                     DURATION="2", RAMP="0.5", DEADLINE_S="600")
    serve = doc["serve"]
    # what the server built and lists: the dense checkpoint and the variant without block 2
    assert serve["served_names"] == {"dense": "model", "k1": "model-k1"}
    assert serve["models"]["model"]["blocks_kept"] == 4
    assert serve["models"]["model-k1"]["blocks_kept"] == 3
    assert doc["variants"]["k1"]["removed_layers"] == [2]
    assert len(serve["serve_ready_lines"]) == 2 and serve["serve_ready_s"] >= serve["bare_ready_s"] > 0
    # each engine's KV cache as vLLM logged it: the same bytes each on CPU, so the same tokens for
    # the two dense engines and a third more for the variant with 3 of 4 blocks
    kv = serve["kv_cache_tokens"]
    assert kv["serve"]["model"] == kv["bare"]["engine"] > 0
    assert kv["serve"]["model-k1"] == pytest.approx(kv["serve"]["model"] * 4 / 3, rel=0.01)
    bench = json.loads((out / "gpu_serve_bench.json").read_text())
    assert bench["plan"]["levels"] == [1, 2] and bench["plan"]["input_len"] == 16
    for m in bench["metrics"]:  # every target answered at every level, with every token
        assert m["completed"] > 0 and m["errors"] == 0, m
        assert m["mean_output_tokens"] == 8
    assert {m["variant"] for m in bench["metrics"]} == {"model", "model-k1", "bare-vllm"}
    overhead = {r["level"]: r for r in bench["comparison"]["server_overhead"]}
    assert sorted(overhead) == [1, 2] and all(r["throughput_ratio"] > 0 for r in overhead.values())
    speed = [r for r in bench["comparison"]["speedups"] if r["variant"] == "model-k1"]
    assert len(speed) == 2 and all(r["ideal_speedup"] > 1 and r["achieved_speedup"] > 0 for r in speed)
    assert "server / bare" in (out / "gpu_serve.log").read_text()
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # what one device call returns
    assert {"gpu_serve.json", "gpu_serve_bench.md", "serve.log", "bare.log"} <= set(files)
