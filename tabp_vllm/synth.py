"""Synthetic checkpoints of published model shapes: random weights, real size, for speed only.

`tabp-vllm synth-model --arch llama-3.1-8b -o DIR` writes a checkpoint with the published
config.json shape of a 7-8B model (layers, widths, heads, vocabulary) and seeded random weights,
so that the speed of dense vs pruned variants can be measured at the scale users run without
downloading (or being licensed for) the real weights. Speed does not depend on weight values;
accuracy does: a synthetic checkpoint is marked `"tabp_synthetic": {"speed_only": true, ...}` in
its config.json and README.md, and nothing it scores or answers means anything.

The model is never materialised: it is built on the meta device for the tensor names and shapes,
then each tensor is generated (on the GPU when there is one), written shard by shard (~2 GB
safetensors shards + model.safetensors.index.json) and dropped. Each tensor draws from its own
generator, seeded from (seed, tensor name): the same seed gives the same tensors whatever the
shard size, but CPU and CUDA generators draw different streams (the device is recorded).

Imports torch, transformers and safetensors only (no vLLM, no pydantic): it runs where only
a training stack is installed.
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from tabp_vllm.errors import TabpError, user_errors

def _decoder(arch: str, model_type: str, layers: int, hidden: int, mlp: int, heads: int,
             kv_heads: int, vocab: int, max_pos: int, rope_theta: float, eps: float,
             **extra: Any) -> dict[str, Any]:
    """A decoder config.json in the common HF layout (SiLU MLP, untied head unless `extra` says)."""
    return {"architectures": [arch], "model_type": model_type, "num_hidden_layers": layers,
            "hidden_size": hidden, "intermediate_size": mlp, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "max_position_embeddings": max_pos, "rope_theta": rope_theta, "rms_norm_eps": eps,
            "hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": False,
            **extra}


# Published config.json values (HF hub, as of 2025). Only the shape and the architecture matter
# for speed; token ids are set from the tokenizer that is copied in.
ARCHS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": _decoder(
        "LlamaForCausalLM", "llama", 32, 4096, 14336, 32, 8, 128256, 131072, 500000.0, 1e-5,
        head_dim=128, attention_bias=False, mlp_bias=False,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    # Qwen/Qwen2.5-7B (q/k/v projections carry a bias in Qwen2)
    "qwen2.5-7b": _decoder(
        "Qwen2ForCausalLM", "qwen2", 28, 3584, 18944, 28, 4, 152064, 131072, 1000000.0, 1e-6,
        use_sliding_window=False, sliding_window=131072, max_window_layers=28),
    # mistralai/Mistral-7B-v0.1
    "mistral-7b": _decoder(
        "MistralForCausalLM", "mistral", 32, 4096, 14336, 32, 8, 32000, 32768, 10000.0, 1e-5,
        sliding_window=4096),
    # for tests: 4 blocks, hidden 128, head_dim 64 (vLLM's CPU attention refuses 16);
    # vocabulary = the SmolLM2 tokenizer's
    "tiny-llama": _decoder(
        "LlamaForCausalLM", "llama", 4, 128, 256, 2, 1, 49152, 2048, 10000.0, 1e-5),
}

# Parameter counts of the published models (embeddings and LM head included).
PUBLISHED_PARAMS = {"llama-3.1-8b": 8.03e9, "qwen2.5-7b": 7.62e9, "mistral-7b": 7.24e9}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
NOTE = "random weights: speed does not depend on weight values, accuracy does"


def arch_config(arch: str, **overrides: Any):
    """The transformers config of a known shape (published values, `overrides` on top)."""
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise TabpError(f"unknown --arch {arch!r}: known are {', '.join(ARCHS)}")
    cfg = {**ARCHS[arch], **overrides}
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def meta_model(config):
    """The model on the meta device: names and shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the checkpoint holds, in the model's order."""
    sd = meta_model(config).state_dict()
    return [(name, tuple(t.shape)) for name, t in sd.items()]


def count_params(config) -> int:
    return sum(p.numel() for p in meta_model(config).parameters())


def tensor_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def init_tensor(name: str, shape: tuple[int, ...], dtype, device: str, seed: int, std: float):
    """Norm weights 1, biases 0, everything else N(0, std): transformers' own init rule."""
    import torch

    if name.endswith("norm.weight") or "layernorm" in name or "_norm" in name:
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(tensor_seed(seed, name))
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], itemsize: int,
                max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TabpError(f"--device {device}: CUDA is not available")
    return device


def _tokenizer_ids(tok_dir: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    return {k: int(v) for k, v in ids.items() if isinstance(v, int)}


def default_tokenizer_dir() -> Path:
    from tabp_vllm.models import demo_model_dir

    return demo_model_dir()


def synth_model(arch: str, out: Path | str, seed: int = 0, dtype: str = "bfloat16",
                device: str = "auto", tokenizer: Path | str | None = None,
                shard_gib: float = 2.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the synthetic checkpoint of `arch` to `out`; return a summary (sizes, timings)."""
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    out = Path(out)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise TabpError(f"--dtype {dtype!r}: expected a float dtype (bfloat16, float16, float32)")
    tok_dir = Path(tokenizer) if tokenizer else default_tokenizer_dir()
    tok_files = [tok_dir / f for f in TOKENIZER_FILES if (tok_dir / f).is_file()]
    if not any(f.name.startswith("tokenizer") for f in tok_files):
        raise TabpError(f"no tokenizer files in {tok_dir} (pass --tokenizer DIR)")
    dev = pick_device(device)

    meta = {"speed_only": True, "arch": arch, "seed": int(seed), "dtype": dtype,
            "generator_device": dev.split(":")[0], "tokenizer": str(tok_dir), "note": NOTE}
    config = arch_config(arch, dtype=dtype, tabp_synthetic=meta, **_tokenizer_ids(tok_dir))
    specs = tensor_specs(config)
    std = float(getattr(config, "initializer_range", 0.02))
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards = plan_shards(specs, itemsize, int(shard_gib * 2**30))

    # Write into a staging folder and rename at the end: a half-written checkpoint is never used.
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    gen_s = write_s = 0.0
    for n, shard in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        t = time.perf_counter()
        for name, shape in shard:
            tensors[name] = init_tensor(name, shape, torch_dtype, dev, seed, std).cpu()
            weight_map[name] = fname
            total += tensors[name].numel() * itemsize
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        gen_s += time.perf_counter() - t
        t = time.perf_counter()
        save_file(tensors, str(staging / fname), metadata={"format": "pt"})
        write_s += time.perf_counter() - t
        del tensors
        log(f"shard {n}/{len(shards)} written ({fname})")
    (staging / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config.save_pretrained(str(staging))
    for f in tok_files:
        shutil.copy2(f, staging / f.name)
    n_params = sum(_numel(s) for _, s in specs)
    (staging / "README.md").write_text(_readme(arch, meta, config, n_params))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return {"arch": arch, "path": str(out), "params": n_params, "bytes": total,
            "shards": len(shards), "device": dev, "dtype": dtype, "seed": int(seed),
            "generate_s": round(gen_s, 3), "write_s": round(write_s, 3),
            "wall_s": round(time.perf_counter() - t0, 3)}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _readme(arch: str, meta: dict[str, Any], config, n_params: int) -> str:
    return (
        f"# Synthetic checkpoint: {arch} shape, random weights (speed only)\n\n"
        f"Written by `tabp-vllm synth-model --arch {arch} --seed {meta['seed']} "
        f"--dtype {meta['dtype']}`.\n\n"
        f"- Shape: {config.architectures[0]}, {config.num_hidden_layers} blocks, hidden "
        f"{config.hidden_size}, intermediate {config.intermediate_size}, "
        f"{config.num_attention_heads}/{config.num_key_value_heads} heads, vocabulary "
        f"{config.vocab_size}: {n_params / 1e9:.3f} B parameters, as published.\n"
        f"- Weights: seeded random, N(0, {config.initializer_range}) (norms 1, biases 0), "
        f"generated on {meta['generator_device']}.\n"
        f"- Tokenizer: copied from {meta['tokenizer']} (smaller than the vocabulary; the LM "
        f"head keeps the published width so it costs what the real one does).\n\n"
        f"**{NOTE}.** Use it to time dense vs pruned variants; its scores, masks and answers "
        f"mean nothing. config.json marks it with `tabp_synthetic.speed_only = true`.\n"
    )


def _default(name: str) -> Any:
    """`synth_model`'s own default (its one home; the command shows and passes it on)."""
    import inspect

    return inspect.signature(synth_model).parameters[name].default


@user_errors
def synth_model_command(
    arch: str = typer.Option(..., "--arch", help=f"One of: {', '.join(ARCHS)}."),
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint folder to write."),
    seed: int = typer.Option(_default("seed"), "--seed"),
    dtype: str = typer.Option(_default("dtype"), "--dtype", help="bfloat16|float16|float32"),
    device: str = typer.Option(_default("device"), "--device",
                               help="Where to generate the weights: auto|cpu|cuda."),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", help="Folder with tokenizer files (default: the demo model's)."),
    shard_gib: float = typer.Option(_default("shard_gib"), "--shard-gib", help="Shard size in GiB."),
) -> None:
    """Write a random-weight checkpoint of a published shape (speed measurements only)."""
    res = synth_model(arch, output, seed=seed, dtype=dtype, device=device, tokenizer=tokenizer,
                      shard_gib=shard_gib, log=lambda m: print(m, flush=True))
    print(json.dumps(res))
