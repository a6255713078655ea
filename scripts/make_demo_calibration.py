"""Generate tabp_vllm/demo_data/demo_mcqa.jsonl: 64 simple, seeded MCQA items (arithmetic, opposites,
capitals, animal facts) so the demo can score without the shared data sets.

    python scripts/make_demo_calibration.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tabp_vllm" / "demo_data" / "demo_mcqa.jsonl"
OPPOSITES = [("hot", "cold"), ("up", "down"), ("big", "small"), ("day", "night"), ("fast", "slow"),
             ("open", "closed"), ("full", "empty"), ("happy", "sad"), ("light", "dark"), ("old", "new")]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Russia", "Moscow")]
ANIMALS = [("cow", "moo"), ("dog", "bark"), ("cat", "meow"), ("duck", "quack"), ("lion", "roar"),
           ("sheep", "baa")]


def items(rng):
    out = []
    for _ in range(30):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        right = a + b
        wrong = rng.sample([x for x in range(right - 6, right + 7) if x != right and x > 0], 3)
        out.append((f"What is {a} plus {b}?", [str(right)] + [str(w) for w in wrong]))
    for w, o in OPPOSITES:
        others = rng.sample([x for p in OPPOSITES for x in p if x not in (w, o)], 3)
        out.append((f"What is the opposite of {w}?", [o] + others))
    for c, cap in CAPITALS:
        others = rng.sample([x for _, x in CAPITALS if x != cap], 3)
        out.append((f"What is the capital of {c}?", [cap] + others))
    for an, s in ANIMALS:
        others = rng.sample([x for _, x in ANIMALS if x != s], 3)
        out.append((f"What sound does a {an} make?", [s] + others))
    for i in range(64 - len(out)):
        n = rng.randint(3, 9)
        out.append((f"How many sides does a shape with {n} corners have?",
                    [str(n)] + [str(n + d) for d in (1, 2, -1)]))
    recs = []
    for i, (q, ch) in enumerate(out):
        right = ch[0]
        rng.shuffle(ch)
        recs.append({"id": f"demo-{i}", "question": q, "choices": ch, "gold": ch.index(right)})
    return recs


if __name__ == "__main__":
    recs = items(random.Random(0))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r) + "\n" for r in recs))
    print(f"wrote {len(recs)} items to {OUT}")
