"""Planner benchmark: time both planners on a synthetic BERT-base-sized profile and compare
their predicted accuracy.

The profiles are synthetic (labelled so in the output) but shaped like a real measurement:
12 layers x 12 shards (hidden 768, FFN 3072), every shard stored at 2, 3, 4, 5, 6 and 32
bits with a group-wise linear code (0.5 bit of scales per weight), eMMC-class storage
(200 MB/s, 0.1 ms per record), a phone-class CPU (about 20 ms per full-width layer at 64
tokens), and bit errors shaped like the uniform-quantisation measurements in STI.md
(2 bits lose ~35 accuracy points over the whole model, 3 bits ~11, 4 bits ~2).

Run: .venv/bin/python benchmarks/bench_planner.py [--runs 20] [--out benchmarks/results/planner.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from sti.planning import PlanError, make_plan
from sti.planning import joint
from sti.planning.problem import Problem
from sti.profiles import DeviceProfile, ImportanceProfile

STORE = "bench-synthetic-bert-base"
BITS = (2, 3, 4, 5, 6, 32)
BITS_ERROR = {2: 1.0, 3: 0.33, 4: 0.063, 5: 0.015, 6: 0.003, 32: 0.0}
SEQ_LEN = 64
TARGET_MS = 50.0


def synthetic_profiles(seed: int = 0, layers: int = 12, shards: int = 12, hidden: int = 768,
                       mb_per_s: float = 200.0, all_submodels: bool = True):
    """(device, importance, fixed_bytes) for a BERT-base-shaped model."""
    rng = np.random.default_rng(seed)
    weights = 12 * hidden * hidden // shards            # 4 h^2 attention + 8 h^2 FFN, per shard
    biases = 3 * hidden // shards + 4 * hidden // shards
    nbytes = {b: (weights * 4.0 if b == 32 else weights * (b + 0.5) / 8) + biases * 4.0 for b in BITS}
    read = {b: 0.1 + nbytes[b] / (mb_per_s * 1e3) for b in BITS}
    decode = {b: 0.0 if b == 32 else 0.6 for b in BITS}
    device = DeviceProfile(
        store_id=STORE, storage=f"emulate:{mb_per_s:g}MB/s,0.1ms", threads=2, seq_len=SEQ_LEN,
        shard_bytes=nbytes, shard_read_ms=read, shard_decode_ms=decode, layer_read_ms=0.2,
        compute_coef=(0.5, 0.01, 0.02, 0.00005), compute_fit_error=0.03, embed_ms=(0.3, 0.01), head_ms=1.0,
        machine={"synthetic": True}, created="synthetic")
    # importance: rewired, so shard j's importance falls with j; layers differ
    layer_scale = rng.lognormal(0.0, 0.5, size=layers)
    kl = layer_scale[:, None] * np.exp(-np.arange(shards) / 4.0)[None, :] * rng.lognormal(0.0, 0.4, (layers, shards))
    kappa = 0.35 / kl.sum()                               # the whole model at 2 bits loses 35 points
    sub = {}
    for n in range(1, layers + 1):
        for m in range(1, shards + 1):
            if not all_submodels and (n % 3 or m % 3):
                continue
            dn, dm = 1 - n / layers, 1 - m / shards
            acc = 0.92 - 0.30 * dn ** 2.2 - 0.15 * dm ** 2 - 0.05 * dn * dm + rng.normal(0, 0.002)
            sub[f"{n},{m}"] = float(min(0.92, acc))
    importance = ImportanceProfile(
        store_id=STORE, method="degrade", split="synthetic", seed=seed, lowest_bits=2, full_accuracy=0.92,
        submodel_accuracy=sub, shard_kl=tuple(tuple(float(x) for x in row) for row in kl), shard_acc_drop=None,
        bits_error=dict(BITS_ERROR), kl_to_acc=float(kappa), created="synthetic")
    fixed = layers * (2 * 2 * hidden + 2 * hidden) * 4 + (hidden * 2 + 2) * 4   # LayerNorms, output biases, head
    return device, importance, fixed


def model_fp32_bytes(device: DeviceProfile, layers: int = 12, shards: int = 12) -> float:
    return device.shard_bytes[32] * layers * shards


def time_plan(device, importance, fixed, T, M, planner, runs):
    """Median and worst wall time, median CPU time of this process (what a busy shared
    machine disturbs least), the plan or the error."""
    times, cpu, plan, error = [], [], None, None
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            plan = make_plan(device, importance, STORE, T, M, seq_len=SEQ_LEN, planner=planner, fixed_bytes=fixed)
        except PlanError as exc:
            error = str(exc)
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(times), max(times), statistics.median(cpu), plan, error


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "planner.json")
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    # the first plan of a process loads the planner's compiled kernels (numba's on-disk
    # cache, or compiles them once after an edit): timed apart, then excluded
    device, importance, fixed = synthetic_profiles(0)
    t0 = time.perf_counter()
    make_plan(device, importance, STORE, 200.0, int(model_fp32_bytes(device) * 0.02), seq_len=SEQ_LEN, fixed_bytes=fixed)
    first_call_ms = (time.perf_counter() - t0) * 1e3
    print(f"first plan of the process (kernel load): {first_call_ms:.0f} ms")

    targets = (120.0, 200.0, 300.0, 450.0)
    fractions = (0.005, 0.01, 0.02, 0.05)             # preload budget as a share of the fp32 encoder
    rows = []
    print("synthetic BERT-base-shaped profiles (12 layers x 12 shards x 6 bitwidths, 144 submodels), "
          f"seq_len {SEQ_LEN}; median of {args.runs} runs")
    print(f"{'seed':>4} {'T ms':>6} {'M MB':>6} | {'paper ms':>8} {'acc':>7} | {'joint ms':>8} {'acc':>7} "
          f"{'(n,m)':>8} {'search alone':>12}")
    for seed in range(args.seeds):
        device, importance, fixed = synthetic_profiles(seed)
        total = model_fp32_bytes(device)
        for T in targets:
            for frac in fractions:
                M = int(total * frac) + fixed
                row = {"seed": seed, "target_ms": T, "memory_bytes": M, "memory_fraction": frac}
                for planner in ("paper", "joint"):
                    med, worst, cpu, plan, error = time_plan(device, importance, fixed, T, M, planner, args.runs)
                    row[planner] = {"median_ms": med, "max_ms": worst, "median_cpu_ms": cpu,
                                    "accuracy": plan.predicted.accuracy if plan else None,
                                    "latency_ms": plan.predicted.latency_ms if plan else None,
                                    "n": plan.choice.n if plan else None, "m": plan.choice.m if plan else None,
                                    "preload_bytes": plan.predicted.preload_bytes if plan else None,
                                    "error": None if plan else error}
                # the joint search on its own (without the paper plan as a floor): is it better by itself?
                P = Problem.of(device, importance, STORE, T, M, SEQ_LEN, fixed, None)
                alone = joint.search(P, joint.Families(P))
                row["joint_search_alone_accuracy"] = alone[0] if alone else None
                rows.append(row)
                pa, jo = row["paper"], row["joint"]
                fmt = lambda v: f"{v:7.4f}" if v is not None else "   none"
                nm = f"({jo['n']},{jo['m']})" if jo["n"] else "-"
                print(f"{seed:>4} {T:>6.0f} {M / 1e6:>6.1f} | {pa['median_ms']:>8.2f} {fmt(pa['accuracy'])} | "
                      f"{jo['median_ms']:>8.2f} {fmt(jo['accuracy'])} {nm:>8} {fmt(row['joint_search_alone_accuracy']):>12}")

    def summary(planner):
        meds = [r[planner]["median_ms"] for r in rows]
        cpus = [r[planner]["median_cpu_ms"] for r in rows]
        return {"median_of_medians_ms": statistics.median(meds), "worst_median_ms": max(meds),
                "worst_single_ms": max(r[planner]["max_ms"] for r in rows),
                "median_cpu_ms": statistics.median(cpus), "worst_median_cpu_ms": max(cpus)}

    both = [r for r in rows if r["paper"]["accuracy"] is not None and r["joint"]["accuracy"] is not None]
    gains = [r["joint"]["accuracy"] - r["paper"]["accuracy"] for r in both]
    alone = [r for r in both if r["joint_search_alone_accuracy"] is not None]
    result = {
        "synthetic": True,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.processor()},
        "load_before": load_before, "load_after": os.getloadavg(), "cpu_count": os.cpu_count(),
        "runs": args.runs, "seq_len": SEQ_LEN, "first_call_ms": first_call_ms, "target_ms": TARGET_MS, "targets_ms": targets, "memory_fractions": fractions,
        "paper": summary("paper"), "joint": summary("joint"),
        "accuracy": {
            "cases": len(rows), "both_feasible": len(both),
            "only_joint_feasible": sum(r["paper"]["accuracy"] is None and r["joint"]["accuracy"] is not None for r in rows),
            "joint_better": sum(g > 1e-12 for g in gains), "mean_gain_points": 100 * statistics.mean(gains) if gains else 0,
            "max_gain_points": 100 * max(gains) if gains else 0,
            "search_alone_beats_paper": sum(r["joint_search_alone_accuracy"] > r["paper"]["accuracy"] + 1e-12 for r in alone),
            "search_alone_below_paper": sum(r["joint_search_alone_accuracy"] < r["paper"]["accuracy"] - 1e-12 for r in alone),
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for planner in ("paper", "joint"):
        s = result[planner]
        print(f"{planner:>5}: median {s['median_of_medians_ms']:.2f} ms per plan, worst median "
              f"{s['worst_median_ms']:.2f} ms, worst single run {s['worst_single_ms']:.2f} ms; CPU time: median "
              f"{s['median_cpu_ms']:.2f} ms, worst median {s['worst_median_cpu_ms']:.2f} ms")
    print(f"load average before / after: {load_before[0]:.1f} / {result['load_after'][0]:.1f} on "
          f"{os.cpu_count()} cores (other work on the machine slows the wall times)")
    a = result["accuracy"]
    print(f"accuracy: joint > paper in {a['joint_better']} of {a['both_feasible']} cases where both plan "
          f"(mean +{a['mean_gain_points']:.2f} points, max +{a['max_gain_points']:.2f}); only joint plans in "
          f"{a['only_joint_feasible']}; the joint search alone beats paper in {a['search_alone_beats_paper']} "
          f"and falls below it in {a['search_alone_below_paper']}")
    print(f"wrote {args.out}")
    # the target is on the planner's own cost: its CPU time, which equals the wall time on an
    # idle machine and is what a shared, busy one disturbs least
    wall = all(result[p]["worst_median_ms"] < TARGET_MS for p in ("paper", "joint"))
    cpu = all(result[p]["worst_median_cpu_ms"] < TARGET_MS for p in ("paper", "joint"))
    print(f"target: under {TARGET_MS:.0f} ms per plan (worst median over the grid): CPU time "
          f"{'met' if cpu else 'NOT met'}, wall time {'met' if wall else 'not met at this load'}")
    return 0 if cpu else 1


if __name__ == "__main__":
    sys.exit(main())
