"""How long `route fit` takes with its defaults (issue target: N = 4 clusters at k = 4 on the demo
model within 10 minutes on this machine). Runs the product's command, reads the wall time and the
passes the router records, and writes them with the CPU and the load average before and after
(a busy machine inflates the time: say so rather than hide it).

    python bench/route_fit_time.py [--clusters 4] [--k 4] [--out bench/results/routing/fit_time.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tabp_vllm.hardware import cpu_info  # noqa: E402

TARGET_S = 600.0
TASKS = ("arc_easy", "piqa", "boolq", "gsm8k")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "routing" / "fit_time.json")
    a = ap.parse_args()
    router = a.out.with_suffix(".router.json")
    cmd = [sys.executable, "-m", "tabp_vllm", "route", "fit", "--model", "llama",
           *sum((["--task", t] for t in TASKS), []), "--clusters", str(a.clusters),
           "--k", str(a.k), "-o", str(router)]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    command_s = time.perf_counter() - t0
    r = json.loads(router.read_text())
    p = r["provenance"]
    res = {"command": " ".join(["tabp-vllm"] + cmd[3:]), "clusters": a.clusters, "k": a.k,
           "inputs": p["samples"], "hyperparameters": r["method"]["params"],
           "fit_wall_s": p["wall_s"], "command_wall_s": round(command_s, 1),
           "forward_passes": p["forward_passes"], "backward_passes": p["backward_passes"],
           "per_cluster": p["clusters"], "target_s": TARGET_S,
           "target_met": command_s <= TARGET_S,
           "loadavg_before": [round(x, 2) for x in load_before],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()],
           "cpu": cpu_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("per_cluster", "hyperparameters")},
                     indent=2))


if __name__ == "__main__":
    main()
