"""The benchmark's outputs: results.json (written atomically, after every step of a sweep),
results.md, the results document (`sti report`) and the plots. Everything here reads the
results dictionary `bench.run_bench` returns, or the JSON it wrote, and nothing else."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

from .atomic import atomic_write_json, atomic_write_text
from .bench import PLANNED, SYSTEMS
from .data import OOD_SETS


def save_results(results: dict, out_dir: Path) -> Path:
    return write_json(results, Path(out_dir) / "results.json")


def write_json(results: dict, path: Path) -> Path:
    """Write `results` as JSON atomically: a temporary file beside `path`, then a rename."""
    return atomic_write_json(results, path, default=float)  # numpy numbers as floats


def _fmt(v, spec: str, none: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def shown_accuracy(r: dict) -> float | None:
    """The test accuracy a row stands for: served where it was served, else the batch one."""
    return (r.get("served_accuracy") or {}).get("test", (r.get("accuracy") or {}).get("test"))


def _conditions_line(c: dict) -> str:
    return (f"Machine: {c['machine'].get('processor')} ({c['machine'].get('cpus')} CPUs), torch threads "
            f"{c['threads']}, {c['date']}. Model: {c['model']}; fp32 model {c['fp32_model_bytes'] / 1e6:.1f} MB. "
            f"Served: {c['latency_sample']} test requests per point (of {c['test_size']}) and "
            f"{c['ood_sizes']} out-of-domain ones, one request at a time after a warm-up; latency over the test "
            f"requests (slow baselines fewer). T unit (full fp32 model resident): "
            + ", ".join(f"{k} {v:.2f} ms" for k, v in c['full_compute_ms'].items()))


def markdown(results: dict) -> str:
    """results.md: the conditions, then one table per storage and length mode."""
    lines = ["# sti benchmark", "", _conditions_line(results["conditions"]), "",
             "served = accuracy of the labels returned, request by request; plan = the same weights in batches "
             "(for sti: the plan's submodel and bitwidths, before the deadline guard)", ""]
    rows = results["rows"]
    for storage in dict.fromkeys(r["storage"] for r in rows):
        for mode in dict.fromkeys(r["seq_mode"] for r in rows):
            sel = [r for r in rows if r["storage"] == storage and r["seq_mode"] == mode]
            if not sel:
                continue
            lines += [f"## storage {storage}, {mode} lengths", "",
                      "| system | T (x) | T ms | M MB | served test | plan test | served OOD (tw/am/nyt) "
                      "| median ms | p95 ms | p99 ms | planned ms | measured / predicted | hit rate (95% CI) | guard "
                      "| skipped / lowered per request | peak model MB | requests | note |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in sel:
                a, sv = r["accuracy"] or {}, r.get("served_accuracy") or {}
                ood = "/".join(_fmt(sv.get(k), ".3f") for k in OOD_SETS)
                ci = r.get("hit_rate_ci")
                hit = _fmt(r["hit_rate"], ".1%") + (f" ({ci[0]:.1%}-{ci[1]:.1%})" if ci else "")
                cuts = (f"{r['guard_skipped_mean']:.2f} / {r['guard_lowered_mean']:.2f}"
                        if r.get("guard_skipped_mean") is not None else "-")
                lines.append(
                    f"| {r['system']} | {_fmt(r['target_x'], 'g')} | {_fmt(r['target_ms'], '.1f')} | "
                    f"{_fmt(r['memory_mb'], 'g')} | {_fmt(sv.get('test'), '.4f')} | {_fmt(a.get('test'), '.4f')} | "
                    f"{ood} | {_fmt(r['latency_median_ms'], '.1f')} | {_fmt(r['latency_p95_ms'], '.1f')} | "
                    f"{_fmt(r.get('latency_p99_ms'), '.1f')} | "
                    f"{_fmt(r['planned_ms'], '.1f')} | {_fmt(r.get('predicted_ratio'), '.2f')} | {hit} | "
                    f"{_fmt(r['guard_rate'], '.0%')} | {cuts} | "
                    f"{_fmt(r['peak_model_bytes'] and r['peak_model_bytes'] / 1e6, '.2f')} | {r['requests']} | "
                    f"{r['note'][:80]} |")
            lines.append("")
    return "\n".join(lines)


HEADLINE_X = (1.0, 2.0, 3.0)
HEADLINE_MB = 2.0


def headline(results: dict, mode: str = "own") -> list[dict]:
    """The rows of the headline table: T = 1x, 2x, 3x at M = 2 MB (systems without a memory
    budget at every T), every storage, every system, in the order measured."""
    return [r for r in results["rows"] if r["seq_mode"] == mode and r["target_x"] in HEADLINE_X
            and r["memory_mb"] in (HEADLINE_MB, None)]


def headline_table(results: dict, mode: str = "own") -> list[str]:
    lines = ["| storage | system | T | served test acc | plan acc | median / p95 ms | within T | guard acted "
             "| peak model MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in headline(results, mode):
        sv = (r.get("served_accuracy") or {}).get("test")
        plan = (r.get("accuracy") or {}).get("test")
        if sv is None and plan is None:
            lines.append(f"| {r['storage']} | {r['system']} | {r['target_x']:g}x | - | - | - | - | - | - "
                         f"({r['note'][:60]}) |")
            continue
        lines.append(
            f"| {r['storage']} | {r['system']} | {r['target_x']:g}x ({r['target_ms']:.1f} ms) | "
            f"{_fmt(sv, '.4f', 'batch only')} | {_fmt(plan, '.4f')} | {_fmt(r['latency_median_ms'], '.1f')} / "
            f"{_fmt(r['latency_p95_ms'], '.1f')} | {_fmt(r['hit_rate'], '.1%')} | {_fmt(r['guard_rate'], '.0%')} | "
            f"{_fmt(r['peak_model_bytes'] and r['peak_model_bytes'] / 1e6, '.2f')} |")
    return lines


def report(results: dict, source: Path, out: Path) -> str:
    """docs/RESULTS.md from one results.json (in `source`, written to `out`): conditions, the
    headline table, the gap between served and planned accuracy, the plots. Every figure is
    read from `results`."""
    c, rows = results["conditions"], results["rows"]
    command = c.get("command", "")
    rel = Path(os.path.relpath(Path(source), Path(out).parent)).as_posix()
    full = next((shown_accuracy(r) for r in rows if r["system"] == "preload" and shown_accuracy(r) is not None), None)
    lines = ["# sti results", "",
             ("**Partial results: the sweep was interrupted; only the points below were measured.**\n\n"
              if results.get("partial") else "")
             + f"Generated by `sti report {Path(source).as_posix()} --out {Path(out).as_posix()}` from its results.json"
             + (f", which `{command}` wrote" if command else "") + ". Do not edit by hand: rerun the command.", "",
             "## Conditions", "", _conditions_line(c) + ".", "",
             f"Sweep: T in {results['config']['targets_x']} x the T unit, M in {results['config']['memories_mb']} MB, "
             f"storages {', '.join(results['config']['storages'])}, length modes "
             f"{', '.join(results['config']['seq_modes'])}; plans keep {results['config']['headroom']:.0%} of T "
             "as headroom for the deadline guard"
             + ("; the planned systems' engines follow the device (they plan again when it drifts)"
                if results['config'].get('follow') else "") + ".", "",
             "## Headline: T = 1x, 2x, 3x at M = 2 MB, own lengths", "",
             "Served test accuracy is the accuracy of the labels the engine returned, over every test request; plan "
             "accuracy is the same plan's weights in batches (the deadline guard's cost is the difference)."
             + (f" The full fp32 model, served resident: {full:.4f}." if full is not None else ""), ""]
    lines += headline_table(results)
    gaps = [(r, shown_accuracy(r), (r.get("accuracy") or {}).get("test")) for r in rows
            if r["system"] in PLANNED and (r.get("served_accuracy") or {}).get("test") is not None]
    if gaps:
        d = [plan - sv for _, sv, plan in gaps]
        worst = max(gaps, key=lambda g: g[2] - g[1])
        lines += ["", "## Served against planned accuracy", "",
                  f"Over the {len(gaps)} sti points served, the answers were {statistics.median(d) * 100:.1f} points "
                  f"below the plans' accuracy at the median (range {min(d) * 100:.1f} to {max(d) * 100:.1f}); the "
                  f"largest gap, {(worst[2] - worst[1]) * 100:.1f} points, at {worst[0]['system']} / "
                  f"{worst[0]['storage']} / T = {worst[0]['target_x']:g}x / M = {worst[0]['memory_mb']:g} MB, where the "
                  f"guard acted on {worst[0]['guard_rate']:.0%} of requests."]
        free = [r for r, _, _ in gaps if r.get("served_accuracy_no_guard") is not None]
        if free:
            lines += ["", "The same plans served without the deadline guard (test split):", "",
                      "| storage | T | M MB | served, guard on | served, guard off | within T, guard on |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['storage']} | {r['target_x']:g}x | {r['memory_mb']:g} | "
                      f"{r['served_accuracy']['test']:.4f} | {r['served_accuracy_no_guard']:.4f} | "
                      f"{r['hit_rate']:.1%} |" for r in free]
    lines += ["", "## Plots", "", f"![served accuracy versus latency]({rel}/accuracy_latency.png)", "",
              f"![peak resident model bytes]({rel}/memory.png)", "",
              f"Every point of the sweep: [`results.md`]({rel}/results.md)."]
    return "\n".join(lines) + "\n"


def plot(results: dict, out_dir: Path) -> list[Path]:
    """Accuracy versus median latency per system (one panel per storage and M), and memory."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in results["rows"] if r["accuracy"]]
    storages = list(dict.fromkeys(r["storage"] for r in rows))
    mems = sorted({r["memory_mb"] for r in rows if r["memory_mb"] is not None}) or [None]
    fig, axes = plt.subplots(len(storages), len(mems), figsize=(4.2 * len(mems), 3.4 * len(storages)),
                             squeeze=False)
    mode = results["config"]["seq_modes"][0]
    for i, st in enumerate(storages):
        for j, mem in enumerate(mems):
            ax = axes[i][j]
            for system in dict.fromkeys(r["system"] for r in rows):
                sel = [r for r in rows if r["storage"] == st and r["system"] == system and r["seq_mode"] == mode
                       and (r["memory_mb"] in (mem, None))]
                if system not in PLANNED:
                    sel = sel[:1]
                pts = sorted((r["latency_median_ms"], shown_accuracy(r)) for r in sel
                             if not math.isnan(r["latency_median_ms"]))
                if pts:  # one colour per system in every panel, whichever systems it shows
                    ax.plot(*zip(*pts), marker="o", label=system, linewidth=1, color=f"C{SYSTEMS.index(system)}")
            ax.set_xscale("log")
            ax.set_title(f"{st}, M = {mem} MB" if mem is not None else st, fontsize=9)
            ax.set_xlabel("median latency (ms, log)")
            ax.set_ylabel("served test accuracy")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"accuracy versus latency ({mode} lengths)", fontsize=10)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "accuracy_latency.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    mem_rows = {}
    for r in results["rows"]:
        if r["peak_model_bytes"] and (r["system"] not in mem_rows or r["memory_mb"] == 2.0):
            mem_rows[r["system"]] = r["peak_model_bytes"] / 1e6
    if mem_rows:
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.barh(list(mem_rows), list(mem_rows.values()), color="#4c72b0")
        ax.set_xscale("log")
        ax.set_xlabel("peak resident model MB (log; sti at M = 2 MB where measured)")
        fig.tight_layout()
        paths.append(out_dir / "memory.png")
        fig.savefig(paths[1], dpi=120)
        plt.close(fig)
    return paths


def write_outputs(results: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    paths = [save_results(results, out_dir)]
    md = out_dir / "results.md"
    atomic_write_text(md, markdown(results))
    return paths + [md] + plot(results, out_dir)
