"""Summarise /tmp/subacc/eval.json into bench/results/sublayer_accuracy/summary.json (per-document
acc_norm kept, paired bootstrap against the whole-block TaBP k = 4 mask and against dense)."""
import json, subprocess, sys
import numpy as np
from tabp_vllm.comparison import paired_bootstrap

src, out = sys.argv[1], sys.argv[2]
doc = json.load(open(src))
rows = doc["variants"] if isinstance(doc, dict) and "variants" in doc else doc
rows = rows if isinstance(rows, list) else doc["results"]
per = {}
for r in rows:
    per[r["variant"]] = {t: {s["doc_id"]: s["metrics"]["acc_norm"] for s in ss}
                         for t, ss in r["samples"].items()}
ref = "tabp-arc_easy-s0-k4"
cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1].strip()
flags = subprocess.run("lscpu", capture_output=True, text=True).stdout
summary = {"source": "tabp-vllm eval (see README.md)", "cpu": cpu,
           "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
           "metric": "acc_norm", "reference": ref, "rows": []}
for v, tasks in per.items():
    for t, d in tasks.items():
        ids = sorted(d)
        x = np.array([d[i] for i in ids])
        row = {"variant": v, "task": t, "n": len(ids), "acc_norm": round(float(x.mean()), 4),
               "per_doc": [int(a) for a in x]}
        for other in (ref, "dense"):
            if other != v and other in per:
                y = np.array([per[other][t][i] for i in ids])
                b = paired_bootstrap(x, y)
                row[f"minus_{other}"] = {"mean": round(b["mean"], 4),
                                        "interval": [round(b["interval"][0], 4), round(b["interval"][1], 4)]}
        summary["rows"].append(row)
json.dump(summary, open(out, "w"), indent=1)
for r in summary["rows"]:
    print(r["variant"], r["task"], r["n"], r["acc_norm"], r.get(f"minus_{ref}"), r.get("minus_dense"))
