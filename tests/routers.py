"""A router for the demo model built from two clearly different prompt sets (arithmetic vs
commonsense): the real encoder, seeded k-means into two clusters, each cluster given the mask of
the kind most of its prompts are. Shared by the serve and eval routing tests."""

from __future__ import annotations

from pathlib import Path

ARITHMETIC = [
    "What is 17 + 25?", "Compute 9 * 8.", "What is 144 divided by 12?", "Add 3,456 and 1,209.",
    "What is 15% of 80?", "Subtract 58 from 203.", "What is 7 squared plus 4?",
    "Solve for x: 2x + 6 = 20.", "What is 1/4 + 1/2 as a fraction?", "Multiply 23 by 11.",
    "A shirt costs $12 and a hat $7. How much do both cost?", "What is 1000 minus 357?",
]
COMMONSENSE = [
    "Why do people wear coats in winter?", "Where would you keep milk so it stays fresh?",
    "What do plants need from the sun to grow?", "Why does ice float on water?",
    "What happens to a puddle on a hot sunny day?", "Which animal is known for building dams?",
    "Why do we use umbrellas when it rains?", "What should you do before crossing a street?",
    "Where do birds usually build their nests?", "Why do leaves change color in autumn?",
    "What tool would you use to cut paper?", "Why do people brush their teeth?",
]


def build_two_kind_router(model_path: str, masks: dict[str, list[int]], out: Path,
                          encoder: str = "minilm", seed: int = 0,
                          fallback: tuple[list[int], float] | None = None,
                          sublayers: dict[str, dict[str, list[int]]] | None = None):
    """`masks`: removed blocks for "arithmetic" and "commonsense"; `fallback`: (removed blocks,
    radius) of the mask for inputs far from both centroids; `sublayers`: per kind, the sublayers
    its mask also removes (`removed_attention` / `removed_mlp`), which makes it a sublayer
    router (k counts units, as `route fit --units sublayers` writes). Returns the saved Router."""
    import numpy as np

    from tabp_vllm.mask import make_mask
    from tabp_vllm.models import load_model_config, model_fingerprint
    from tabp_vllm.routing.encoder import load_encoder
    from tabp_vllm.routing.fit import kmeans
    from tabp_vllm.routing.router import Router, removed_units

    enc = load_encoder(encoder)
    texts = ARITHMETIC + COMMONSENSE
    kinds = ["arithmetic"] * len(ARITHMETIC) + ["commonsense"] * len(COMMONSENSE)
    labels, centroids = kmeans(enc.encode(texts), 2, seed)
    cluster_masks, sizes = [], []
    for c in range(2):
        members = [kinds[i] for i in np.flatnonzero(labels == c)]
        kind = max(set(members), key=members.count)
        cluster_masks.append(make_mask(model_path, masks[kind], task=kind, model_id="llama",
                                       **(sublayers or {}).get(kind, {})))
        sizes.append({k: members.count(k) for k in sorted(set(members))})
    assert {m.task for m in cluster_masks} == {"arithmetic", "commonsense"}, sizes
    units = "sublayers" if sublayers else "blocks"
    ks = {removed_units(m, units) for m in cluster_masks}
    router = Router(model_id="llama", fingerprint=model_fingerprint(load_model_config(model_path)),
                    k=ks.pop() if len(ks) == 1 else 0, encoder=enc.record(),
                    centroids=[list(map(float, c)) for c in centroids], masks=cluster_masks,
                    sizes=sizes, method="test", provenance={"seed": seed}, units=units)
    if fallback is not None:
        from tabp_vllm.routing.router import Fallback

        router.fallback = Fallback(radius=fallback[1], quantile=1.0, source="test",
                                   mask=make_mask(model_path, fallback[0], task="static", model_id="llama"))
    router.save(out)
    return router


# MCQA items of both kinds (tabp_vllm.data's JSONL schema) for `eval --router --data`.
MIXED_MCQA = [
    {"id": "a0", "question": "What is 12 plus 9?", "choices": ["21", "19", "23", "18"], "gold": 0},
    {"id": "c0", "question": "Where would you keep ice cream so it stays frozen?",
     "choices": ["in the oven", "in the freezer", "on a shelf", "in a drawer"], "gold": 1},
    {"id": "a1", "question": "What is 7 times 6?", "choices": ["36", "48", "42", "49"], "gold": 2},
    {"id": "c1", "question": "Why do people wear gloves in winter?",
     "choices": ["to keep hands warm", "to swim", "to cook", "to sleep"], "gold": 0},
    {"id": "a2", "question": "What is 30 minus 14?", "choices": ["14", "16", "18", "26"], "gold": 1},
    {"id": "c2", "question": "What do you use to dry yourself after a shower?",
     "choices": ["a spoon", "a pillow", "a towel", "a book"], "gold": 2},
]
