"""`make demo`: the main job on the embedded defaults (demo model, bundled calibration data)."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

console = Console()
OUT = Path("out/demo")


def main() -> int:
    from vllm import SamplingParams

    from tabp_vllm.engine import build_llm
    from tabp_vllm.mask import make_mask
    from tabp_vllm.models import resolve_model

    model = resolve_model("llama")
    mask = make_mask(model, [22, 24, 26, 28], task="demo", model_id="llama")
    mask_path = mask.save(OUT / "demo.json")
    console.print(f"[bold]mask[/] {mask_path}: removes blocks {mask.removed_layers}")
    prompt = "The three primary colors are"
    for name, m in (("dense", None), ("pruned", mask)):
        llm = build_llm(model, m, kv_cache_gib=0.25)
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
        kept = f"{m.num_kept}/{m.num_hidden_layers}" if m else "30/30"
        console.print(f"[bold]{name}[/] (blocks kept {kept}): {prompt}[green]{out[0].outputs[0].text}")
        llm.llm_engine.engine_core.shutdown()
        del llm
    return 0


if __name__ == "__main__":
    sys.exit(main())
