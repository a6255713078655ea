"""Aggregate slices into per-(variant, level) metrics, compare with the ideal, write JSON/MD/PNG."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from tabp_vllm.loadtest.loadgen import SliceResult

TARGET_ACHIEVED_OVER_IDEAL = 0.95
TARGET_SERVER_OVER_BARE = 0.95
PCTS = (50, 90, 99)


def _pct(values: list[float], q: float) -> float | None:
    """numpy's percentile (linear interpolation), None for no values."""
    return float(np.percentile(values, q)) if len(values) else None


def _dist(values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {"mean": statistics.fmean(values) if values else None}
    for q in PCTS:
        out[f"p{q}"] = _pct(values, q)
    return out


def aggregate(slices: list[SliceResult]) -> dict[tuple[str, float], dict[str, Any]]:
    """Per (variant, level): throughputs over all its slices, latency distributions, errors."""
    groups: dict[tuple[str, float], list[SliceResult]] = {}
    for s in slices:
        groups.setdefault((s.variant, s.level), []).append(s)
    out = {}
    for key, group in groups.items():
        reqs = [r for s in group for r in s.completed]
        duration = sum(s.duration for s in group)
        tokens = sum(s.tokens_in_window for s in group)
        errors = [r for s in group for r in s.errors]
        out[key] = {
            "variant": key[0], "level": key[1], "slices": len(group),
            "duration_s": duration,
            "completed": len(reqs), "errors": len(errors), "cancelled_at_window_end":
                sum(s.cancelled for s in group),
            "error_samples": sorted({e.error or "" for e in errors})[:3],
            "output_tokens": tokens,
            "output_tokens_per_s": tokens / duration if duration else 0.0,
            "requests_per_s": len(reqs) / duration if duration else 0.0,
            "mean_prompt_tokens": statistics.fmean(r.prompt_tokens for r in reqs) if reqs else None,
            "mean_output_tokens": statistics.fmean(r.output_tokens for r in reqs) if reqs else None,
            "ttft_s": _dist([r.ttft for r in reqs if r.ttft is not None]),
            "itl_s": _dist([x for r in reqs for x in r.itls]),
            "tpot_s": _dist([r.tpot for r in reqs if r.tpot is not None]),
            "e2e_s": _dist([r.e2e for r in reqs if r.e2e is not None]),
            "per_round_output_tokens_per_s": [s.output_throughput for s in
                                              sorted(group, key=lambda s: s.round)],
            "per_round_tpot_p50_s": [_pct([r.tpot for r in s.completed if r.tpot is not None], 50)
                                     for s in sorted(group, key=lambda s: s.round)],
            "e2e_samples_s": [round(r.e2e, 4) for r in reqs if r.e2e is not None],
        }
    return out


def _ratio_stats(num: list[float], den: list[float]) -> dict[str, Any]:
    per_round = [a / b for a, b in zip(num, den) if b > 0]
    return {
        "per_round": per_round,
        "min": min(per_round) if per_round else None,
        "max": max(per_round) if per_round else None,
        "stdev": statistics.stdev(per_round) if len(per_round) > 1 else None,
    }


def _speedup(m: dict[str, Any], d: dict[str, Any], mode: str) -> tuple[float | None, dict]:
    """Variant over dense. Closed loop: output tokens/s ratio. Open loop: below saturation the
    throughput is the offered load whatever the model's speed, so the ratio of median time per
    output token (dense / variant) is the speedup there."""
    if mode == "open":
        mt, dt = m["tpot_s"]["p50"], d["tpot_s"]["p50"]
        # a round where either side finished no request has no time per token to compare
        pairs = [(a, b) for a, b in zip(d["per_round_tpot_p50_s"], m["per_round_tpot_p50_s"])
                 if a and b]
        per_round = _ratio_stats([a for a, _ in pairs], [b for _, b in pairs])
        return (dt / mt if mt and dt else None), per_round
    achieved = (m["output_tokens_per_s"] / d["output_tokens_per_s"]
                if d["output_tokens_per_s"] else None)
    return achieved, _ratio_stats(m["per_round_output_tokens_per_s"],
                                  d["per_round_output_tokens_per_s"])


def compare(metrics: dict[tuple[str, float], dict[str, Any]], dense: str,
            ideals: dict[str, dict[str, Any] | None], bare: str | None,
            mode: str = "closed") -> dict[str, Any]:
    """Pruned / dense speed vs the FLOPs ideal, and dense-on-our-server / bare vLLM."""
    levels = sorted({lvl for (_, lvl) in metrics})
    variants = sorted({v for (v, _) in metrics})
    top = max(levels) if levels else None
    speedups, overhead = [], []
    for lvl in levels:
        d = metrics.get((dense, lvl))
        if not d:
            continue
        for v in variants:
            if v in (dense, bare) or (v, lvl) not in metrics:
                continue
            m = metrics[(v, lvl)]
            achieved, rounds = _speedup(m, d, mode)
            ideal = (ideals.get(v) or {}).get("ideal_speedup")
            row = {
                "variant": v, "level": lvl, "achieved_speedup": achieved,
                "speedup_basis": "tpot_p50" if mode == "open" else "output_tokens_per_s",
                "achieved_speedup_rounds": rounds,
                "ideal_speedup": ideal,
                "achieved_over_ideal": achieved / ideal if achieved and ideal else None,
                "e2e_p50_ratio": ((d["e2e_s"]["p50"] / m["e2e_s"]["p50"])
                                  if m["e2e_s"]["p50"] and d["e2e_s"]["p50"] else None),
            }
            # the target is stated for the highest concurrency of a closed loop
            if mode == "closed" and lvl == top and row["achieved_over_ideal"] is not None:
                row["target"] = TARGET_ACHIEVED_OVER_IDEAL
                row["target_met"] = row["achieved_over_ideal"] >= TARGET_ACHIEVED_OVER_IDEAL
            speedups.append(row)
        if bare and (bare, lvl) in metrics:
            b = metrics[(bare, lvl)]
            ratio = (d["output_tokens_per_s"] / b["output_tokens_per_s"]
                     if b["output_tokens_per_s"] else None)
            overhead.append({
                "level": lvl, "server_variant": dense, "bare_variant": bare,
                "throughput_ratio": ratio,
                "throughput_ratio_rounds": _ratio_stats(d["per_round_output_tokens_per_s"],
                                                        b["per_round_output_tokens_per_s"]),
                "target": TARGET_SERVER_OVER_BARE,
                "target_met": ratio is not None and ratio >= TARGET_SERVER_OVER_BARE,
            })
    return {"speedups": speedups, "server_overhead": overhead}


def _f(x: Any, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    return "-" if x is None else fmt.format(x * scale)


def markdown(result: dict[str, Any]) -> str:
    plan = result["plan"]
    unit = "concurrency" if plan["mode"] == "closed" else "offered req/s"
    cpu = result["host"].get("cpu")
    cpu_text = (f"{cpu['model']}, flags: {', '.join(cpu['flags']) or 'none recorded'}" if cpu
                else "CPU model not recorded (a run from before the bench recorded it)")
    lines = [f"# Serving bench: {result['model']} ({plan['mode']} loop)", "",
             f"{result['started_at']} on {result['host']['node']} "
             f"({result['host']['cpu_count']} CPUs: {cpu_text}); "
             f"{plan['duration']:.0f} s measured per variant "
             f"per level in {plan['rounds']} interleaved rounds (each after a "
             f"{plan.get('ramp', 0):g} s unmeasured ramp); prompt {plan['input_len']} / output "
             f"{plan['output_len']} tokens (+-{plan['range_ratio'] * 100:.0f} %, EOS ignored); "
             f"seed {plan['seed']}.", "",
             f"| variant | {unit} | out tok/s | req/s | TTFT p50/p90/p99 (ms) | "
             f"ITL p50/p90/p99 (ms) | E2E p50/p90/p99 (s) | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for m in result["metrics"]:
        t, i, e = m["ttft_s"], m["itl_s"], m["e2e_s"]
        lines.append(
            f"| {m['variant']} | {m['level']:g} | {m['output_tokens_per_s']:.1f} | "
            f"{m['requests_per_s']:.2f} | "
            f"{_f(t['p50'], '{:.0f}', 1e3)} / {_f(t['p90'], '{:.0f}', 1e3)} / "
            f"{_f(t['p99'], '{:.0f}', 1e3)} | "
            f"{_f(i['p50'], '{:.1f}', 1e3)} / {_f(i['p90'], '{:.1f}', 1e3)} / "
            f"{_f(i['p99'], '{:.1f}', 1e3)} | "
            f"{_f(e['p50'])} / {_f(e['p90'])} / {_f(e['p99'])} | {m['errors']} |")
    cmp_ = result["comparison"]
    if cmp_["speedups"]:
        basis = ("median time per output token, dense / variant: in an open loop below "
                 "saturation the throughput is the offered load, whatever the model's speed"
                 if plan["mode"] == "open" else "output tokens/s ratio")
        lines += ["", f"Speedup over `{result['dense_variant']}` ({basis}; the range is the "
                      "per-round ratio min-max) against the FLOPs ideal:", "",
                  f"| variant | {unit} | achieved | per-round range | ideal | achieved / ideal |",
                  "|---|---|---|---|---|---|"]
        for r in cmp_["speedups"]:
            rr = r["achieved_speedup_rounds"]
            mark = ""
            if "target_met" in r:
                mark = " (target >= 0.95: " + ("met" if r["target_met"] else "not met") + ")"
            lines.append(f"| {r['variant']} | {r['level']:g} | {_f(r['achieved_speedup'], '{:.3f}')} | "
                         f"{_f(rr['min'], '{:.3f}')}-{_f(rr['max'], '{:.3f}')} | "
                         f"{_f(r['ideal_speedup'], '{:.3f}')} | "
                         f"{_f(r['achieved_over_ideal'], '{:.3f}')}{mark} |")
    if cmp_["server_overhead"]:
        lines += ["", "Server overhead (server's dense variant / bare vLLM, output tokens/s):", "",
                  f"| {unit} | ratio | per-round range | target >= 0.95 |", "|---|---|---|---|"]
        for r in cmp_["server_overhead"]:
            rr = r["throughput_ratio_rounds"]
            lines.append(f"| {r['level']:g} | {_f(r['throughput_ratio'], '{:.3f}')} | "
                         f"{_f(rr['min'], '{:.3f}')}-{_f(rr['max'], '{:.3f}')} | "
                         f"{'met' if r['target_met'] else 'not met'} |")
    return "\n".join(lines) + "\n"


def plots(result: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = result["plan"]
    xlabel = "concurrency" if plan["mode"] == "closed" else "request rate (req/s)"
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for m in result["metrics"]:
        by_variant.setdefault(m["variant"], []).append(m)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for v, ms in by_variant.items():
        ms = sorted(ms, key=lambda m: m["level"])
        ax.plot([m["level"] for m in ms], [m["output_tokens_per_s"] for m in ms], marker="o",
                label=v)
    if plan["mode"] == "closed":
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Throughput: {result['model']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    p = out_dir / f"{stem}_throughput.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    levels = sorted({m["level"] for m in result["metrics"]})
    fig, axes = plt.subplots(1, len(levels), figsize=(4 * len(levels), 4), squeeze=False)
    for ax, lvl in zip(axes[0], levels):
        names, data = [], []
        for v, ms in by_variant.items():
            for m in ms:
                if m["level"] == lvl and m["e2e_samples_s"]:
                    names.append(v)
                    data.append(m["e2e_samples_s"])
        if data:
            ax.boxplot(data, showfliers=True)
            ax.set_xticks(range(1, len(names) + 1), names, rotation=20)
        ax.set_title(f"{xlabel} {lvl:g}")
        ax.set_ylabel("end-to-end latency (s)")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Latency distribution: {result['model']}")
    fig.tight_layout()
    p = out_dir / f"{stem}_latency.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def write_all(result: dict[str, Any], out_dir: str | Path, stem: str = "serving") -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jp = out_dir / f"{stem}.json"
    jp.write_text(json.dumps(result, indent=1) + "\n")
    mp = out_dir / f"{stem}.md"
    mp.write_text(markdown(result))
    return [jp, mp, *plots(result, out_dir, stem)]
