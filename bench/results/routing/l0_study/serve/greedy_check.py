"""Greedy continuations (12 tokens) of the serve check's prompts: dense and each cluster mask of the
router, through transformers (sublayers.without_units), to read the served answers against."""
import json, sys
sys.path.insert(0, "bench")
import torch
from routing import SERVE_PROMPTS
from tabp_vllm.models import resolve_model
from tabp_vllm.routing.router import load_router
from tabp_vllm.scoring.probe import load_model
from tabp_vllm.sublayers import mask_units, without_units
r = load_router(sys.argv[1])
model, tok = load_model(resolve_model("llama"), "cpu")
out = {}
def gen(p):
    ids = tok(p, return_tensors="pt")
    g = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return tok.decode(g[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
with torch.no_grad():
    out["dense"] = [gen(p) for p in SERVE_PROMPTS]
    for c, m in enumerate(r.masks):
        with without_units(model, mask_units(m.removed_layers, m.removed_attention, m.removed_mlp)):
            out[f"cluster {c}"] = [gen(p) for p in SERVE_PROMPTS]
print(json.dumps(out, indent=1))
