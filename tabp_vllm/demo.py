"""`make demo`: the main job end to end on the embedded defaults.

1. score the demo model's blocks with TaBP (the product's default settings) on the bundled
   (generated) calibration set, once at the largest candidate k, and cut the smaller k from the
   same scores (`masks cut`);
2. accuracy of dense and every candidate on the bundled questions calibration did not see (`eval`,
   through lm-evaluation-harness); the demo serves the largest k before the first whose accuracy
   falls under KEEP_ACCURACY of dense's: pruning that breaks the model is not worth serving;
3. fit an input-guided router on the same set at that k: 2 clusters of inputs (arithmetic vs the
   rest), one learned mask each (`route fit`), and its accuracy on the same held-out questions;
4. `tabp-vllm serve` the dense model, the pruned variant and the router's variants behind one
   OpenAI endpoint, with the routed name `llama-auto`;
5. ask every variant the same question through the official `openai` client;
6. send an arithmetic and a general question to `llama-auto`: each is answered by the variant
   of its cluster, and the response says which;
7. measure dense vs pruned throughput under load (`bench`, short);
8. read the per-variant counters from the server's Prometheus endpoint; stop the server cleanly;
   then one summary line: the k chosen, the accuracy it kept and the speedup it measured.

Each step runs the real `tabp-vllm` command, so the demo shows what a user would type.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from tabp_vllm import prometheus as prom
from tabp_vllm.errors import TabpError
from tabp_vllm.routing.options import STEPS
from tabp_vllm.serve.launcher import ServeProcess
from tabp_vllm.serve.options import ServeOptions, VariantOptions

console = Console()
OUT = Path(os.environ.get("TABP_VLLM_DEMO_OUT", "out/demo"))
PORT, METRICS_PORT = 8000, 8090
CLI = [sys.executable, "-m", "tabp_vllm"]
VARIANTS = ("llama", "llama-demo")  # --model llama + one mask of task "demo" (<alias>-<task>)
ROUTED = "llama-auto"  # the router's routed name (<alias>-auto)
ROUTED_QUESTIONS = ("What is 12 plus 9?", "What is the capital of France?")
CHAT_QUESTION = "What color is the sky on a clear day?"  # not in the bundled set
CANDIDATE_KS = (2, 4, 6)  # blocks removed (the demo model has 30); scored once at the largest
KEEP_ACCURACY = 0.9  # serve the largest k before the first under 90 % of dense's accuracy
SUCCESS, BLOCKS_KEPT = "ray_vllm_request_success_total", "ray_tabp_variant_blocks_kept"
SPEEDUP, ROUTED_COUNT = "ray_tabp_variant_theoretical_speedup", "ray_tabp_routed_requests_total"
SHOWN = (SUCCESS, "ray_vllm_generation_tokens_total", BLOCKS_KEPT, SPEEDUP, ROUTED_COUNT)
GAUGES = (BLOCKS_KEPT, SPEEDUP)  # every replica of a variant reports the same value


def step(title: str) -> None:
    console.rule(f"[bold cyan]{title}")


def variant_metrics(families) -> dict[tuple[str, str], float]:
    """{(metric, variant): value} for the SHOWN series over their other labels (Ray adds its
    own, and a counter is split by e.g. finished_reason): counters summed, gauges the largest."""
    out: dict[tuple[str, str], float] = {}
    for metric in SHOWN:
        by = prom.max_by if metric in GAUGES else prom.sum_by
        out.update(((metric, variant), value) for variant, value in by(families, metric).items()
                   if variant)  # "": a series without a model_name
    return out


def wait_for_metrics(url: str, deadline_s: float = 120.0) -> dict[tuple[str, str], float]:
    """Wait until every variant's request is counted and its tabp gauge is there.

    Ray exports each replica's metrics on its own few-second timer: the dense variant's counter
    can show while the pruned one's is not exported yet, so wait for all of them.
    """
    t_end = time.monotonic() + deadline_s
    while True:
        got = variant_metrics(prom.scrape(url, timeout=10))
        missing = [v for v in VARIANTS
                   if got.get((SUCCESS, v), 0) < 1 or (BLOCKS_KEPT, v) not in got]
        if sum(x for (m, _), x in got.items() if m == ROUTED_COUNT) < len(ROUTED_QUESTIONS):
            missing.append(ROUTED)
        if not missing:
            return got
        if time.monotonic() > t_end:
            raise TabpError(f"{url} did not show the requests of {', '.join(missing)} "
                            f"within {deadline_s:.0f} s")
        time.sleep(2)


def show_console(log: str) -> None:
    """What `serve` printed for a person, from its variant table to its READY line."""
    lines = log.splitlines()
    first = next((i for i, ln in enumerate(lines) if "tabp-vllm serve:" in ln), 0)
    last = next((i for i, ln in enumerate(lines) if ln.startswith("READY")), len(lines) - 1)
    print("\n".join(lines[first:last + 1]))


def held_out_results(eval_json: Path) -> dict[int | None, dict[str, Any]]:
    """k (None: dense) -> lm-eval's results for the held-out demo task, from `eval -o`'s JSON."""
    from tabp_vllm.mask import load_mask

    out = {}
    for row in json.loads(eval_json.read_text())["results"]:
        k = None if row["mask"] is None else len(load_mask(row["mask"]).removed_layers)
        out[k] = row["results"]["tabp_demo"]
    return out


def held_out_accuracy(eval_json: Path) -> dict[int | None, float]:
    """k (None: dense) -> acc on the held-out demo questions."""
    return {k: r["acc,none"] for k, r in held_out_results(eval_json).items()}


def choose_k(accuracy: dict[int | None, float]) -> tuple[int, str]:
    """Going up from the smallest candidate k, the last one before the first whose held-out
    accuracy falls under KEEP_ACCURACY of dense's (the smallest k when even it does), and the
    sentence that says why. Stopping at the first miss: on 32 questions a larger k that scores
    higher again is noise, not a model that recovered."""
    dense = accuracy[None]
    kept = []
    for k in CANDIDATE_KS:
        if accuracy[k] < KEEP_ACCURACY * dense:
            break
        kept.append(k)
    k = kept[-1] if kept else CANDIDATE_KS[0]
    table = ", ".join(f"k = {c}: {accuracy[c]:.3f}" for c in CANDIDATE_KS)
    return k, (f"held-out accuracy: dense {dense:.3f}, {table}; serving k = {k}: "
               + (f"the largest k before the first that keeps under {KEEP_ACCURACY:.0%} of dense's "
                  f"accuracy" if kept else
                  f"no k keeps {KEEP_ACCURACY:.0%} of dense's accuracy, so the smallest"))


def summary(mask: Path, accuracy: dict[int | None, float], eval_json: Path, bench_json: Path) -> str:
    """One line: what pruning kept (accuracy, with lm-eval's standard error and the number of
    questions) and what it bought (measured vs ideal speedup)."""
    from tabp_vllm.mask import load_mask

    served = load_mask(mask)
    k, n_blocks = len(served.removed_layers), served.num_hidden_layers
    task = held_out_results(eval_json)[k]
    n, stderr = task.get("sample_len"), task.get("acc_stderr,none")
    rows = json.loads(bench_json.read_text())["comparison"]["speedups"]
    row = next(r for r in rows if r["variant"] == VARIANTS[1])
    ideal = f", ideal {row['ideal_speedup']:.3f}x" if row.get("ideal_speedup") else ""
    about = "; ".join(x for x in (f"{n} questions" if n else "",
                                  f"one standard error {stderr:.3f}" if stderr else "") if x)
    return (f"summary: {VARIANTS[1]} removes {k} of {n_blocks} blocks, keeps {accuracy[k]:.3f} "
            f"held-out accuracy of dense's {accuracy[None]:.3f} ({accuracy[k] / accuracy[None]:.0%}"
            f"{'; ' + about if about else ''}) and ran at {row['achieved_speedup']:.3f}x "
            f"dense's output tokens/s with {row['level']:g} clients{ideal}")


# The demo's router fit is short on purpose (the demo runs in minutes): a converged fit takes
# hundreds of steps per cluster (docs/routing.md); this one says so in its output.
DEMO_FIT_STEPS = 12


def short_fit_note(router: Path) -> str:
    """The line that says the demo's fit is short, and whether it converged."""
    p = json.loads(router.read_text())["provenance"]
    bad = p.get("not_converged") or []
    state = (f"NOT converged (clusters {', '.join(map(str, bad))}): its masks are the ranking of a "
             f"few steps, not an L0 solution" if bad else "converged")
    return (f"[yellow]note: a short fit ({DEMO_FIT_STEPS} steps per cluster; without --steps "
            f"route fit trains each cluster until converged, at most {STEPS} steps: the L0 study "
            f"in docs/routing.md gives what that costs), {state}; {p['wall_s']:.0f} s, "
            f"{p['forward_passes']} forward + {p['backward_passes']} backward passes")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    mask = OUT / "demo.json"

    step(f"1. score: TaBP (product defaults) on the bundled calibration set, k = {CANDIDATE_KS[-1]}, "
         f"then cut k = {', '.join(map(str, CANDIDATE_KS[:-1]))} from the same scores")
    masks = {k: OUT / f"demo-k{k}.json" for k in CANDIDATE_KS}
    scored = masks[CANDIDATE_KS[-1]]  # the one scoring run; the smaller k are cut from it
    subprocess.run(CLI + ["score", "--model", "llama", "--task", "demo", "--method", "tabp",
                          "--k", str(CANDIDATE_KS[-1]), "--samples", "64", "-o", str(scored)],
                   check=True)
    for k in CANDIDATE_KS[:-1]:
        subprocess.run(CLI + ["masks", "cut", str(scored), "--k", str(k), "-o", str(masks[k])],
                       check=True)
    subprocess.run(CLI + ["masks", "show", str(scored)], check=True)

    step("2. eval: dense and every k on the 32 bundled questions calibration did not use (lm-eval)")
    subprocess.run(CLI + ["eval", "--model", "llama", "--task", "tabp_demo"]
                   + [a for k in CANDIDATE_KS for a in ("--task-mask", str(masks[k]))]
                   + ["-o", str(OUT / "eval.json")], check=True)
    accuracy = held_out_accuracy(OUT / "eval.json")
    k, why = choose_k(accuracy)
    console.print(why)
    shutil.copyfile(masks[k], mask)

    step(f"3. route fit: input-guided masks, 2 clusters of the same set, k = {k} (Hard-Concrete L0), "
         f"a SHORT fit of {DEMO_FIT_STEPS} steps, the gates' masks unpolished (--polish none: the "
         f"swap search from so short a fit costs minutes); inputs far from both clusters take the "
         f"static mask")
    router = OUT / "router.json"
    subprocess.run(CLI + ["route", "fit", "--model", "llama", "--task", "demo", "--clusters", "2",
                          "--k", str(k), "--steps", str(DEMO_FIT_STEPS), "--polish", "none",
                          "--fallback", str(mask),
                          "-o", str(router)], check=True)
    subprocess.run(CLI + ["masks", "show", str(router)], check=True)
    console.print(short_fit_note(router))
    subprocess.run(CLI + ["eval", "--model", "llama", "--task", "tabp_demo", "--no-dense",
                          "--router", str(router), "-o", str(OUT / "eval_routed.json")], check=True)

    step("4. serve: dense + pruned + routed, one OpenAI endpoint (Ray Serve + vLLM)")
    server = ServeProcess(
        ServeOptions(model="llama", variants=[VariantOptions(mask=str(mask))], router=str(router),
                     port=PORT, metrics_port=METRICS_PORT,
                     engine={"kv_cache_gib": 0.25, "max_model_len": 1024}),
        OUT / "serve.log", ready_timeout_s=600, stop_grace_s=120)
    missing = [name for name in (*VARIANTS, ROUTED) if name not in server.model_names]
    if missing:  # (the router's own variants come on top)
        raise TabpError(f"the server would not serve {missing}: it names {server.model_names}")
    server.start()
    try:
        server.wait_ready()  # every variant's engine is up
        show_console(server.log_text())

        step("5. the same question to every variant (openai client, greedy)")
        client = server.openai_client()
        question = [{"role": "user", "content": CHAT_QUESTION}]
        for m in client.models.list().data:
            if m.id == ROUTED:
                continue
            reply = client.chat.completions.create(model=m.id, messages=question, max_tokens=32,
                                                   temperature=0)
            meta = (m.model_extra or {}).get("metadata", {})
            console.print(f"[bold]{m.id}[/] (blocks kept {meta.get('blocks_kept')}/"
                          f"{meta.get('blocks_total')}): [green]{reply.choices[0].message.content}")

        step(f"6. routing: two kinds of question to {ROUTED}")
        served_by = set()
        for q in ROUTED_QUESTIONS:
            raw = client.chat.completions.with_raw_response.create(
                model=ROUTED, messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0)
            reply = raw.parse()
            served_by.add(reply.model)
            console.print(f"[bold]{q}[/] -> cluster {raw.headers.get('x-tabp-cluster')}, answered "
                          f"by [bold]{raw.headers.get('x-tabp-variant')}[/]: "
                          f"[green]{reply.choices[0].message.content}")
        if len(served_by) < 2:
            console.print("[yellow]both questions went to one variant: this router's clusters "
                          "share a mask or split the questions otherwise")

        step("7. bench: dense vs pruned throughput, 4 concurrent clients, 2 x 15 s interleaved")
        subprocess.run(CLI + ["bench", "--url", server.base_url, "--variant", VARIANTS[0],
                              "--variant", VARIANTS[1], "--mask", f"{VARIANTS[1]}={mask}",
                              "--levels", "4", "--duration", "30", "--rounds", "2", "--ramp", "2",
                              "--output-len", "32", "--out", str(OUT), "--name", "bench"], check=True)

        step("8. Prometheus metrics, per variant")
        got = wait_for_metrics(server.metrics_url)
        for metric in SHOWN:
            for variant in VARIANTS:
                if (metric, variant) in got and metric != ROUTED_COUNT:
                    console.print(f"  {metric} {{model_name={variant}}} {got[metric, variant]:g}")
        for (metric, variant), value in sorted(got.items()):
            if metric == ROUTED_COUNT:
                console.print(f"  {metric} {{routed_name={ROUTED}, model_name={variant}}} {value:g}")
        console.print(f"\nmask: {mask}   router: {router}   server log: {server.log_path}")
        console.print(summary(mask, accuracy, OUT / "eval.json", OUT / "bench.json"))
    finally:
        step("9. stop (Ctrl-C)")
        left = server.stop()
        console.print(f"server exited with code {server.returncode}"
                      + (f"; killed {len(left)} process(es) still running after 120 s"
                         if left else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TabpError as exc:
        sys.exit(f"error: {exc}")
