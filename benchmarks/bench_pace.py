"""How steady the engine's pace is, and whether what a process did before slows it.

    .venv/bin/python benchmarks/bench_pace.py --same-conditions-as RESULTS_DIR [--storage S]
        [--target-x X] [--memory-mb M] [--requests N] [--passes P] [--out FILE]

Takes the T unit and the calibrated device profile of an earlier `sti bench` run (its
results.json; the run must have measured sti-joint at this storage, own lengths, T and M),
so that every pass serves the very same plans with the very same predictions. Then it serves
N test requests (one at a time, the deadline guard off, so that each runs its whole plan)
P times on one engine, and, between passes on fresh engines, does what `sti bench` does in
its process before it serves a point: measures the T unit (the fused model over the test
split), a device profile, and a calibration on the engine. For each pass: the median latency,
the median of latency over the plan's prediction, stalls and the compute lane's busy time.

Two questions it answers: whether a process that has measured first serves slower than one
that has not (if so, the "after ..." passes run slower than the first), and how far the pace
of one engine moves from one pass to the next on this machine, seconds apart (the spread of
the passes). Writes benchmarks/results/pace-<UTC start>.json (or --out): one file a run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from sti.bench import BenchConfig, Harness, full_compute_ms, planned
from sti.profile_device import measure_device
from sti.runtime import Engine
from sti.store import Store
from sti.demo import demo_store_path
from sti.errors import StiError
from sti.finetune import default_model_dir

RESULTS = Path(__file__).parent / "results"


def serve(h: Harness, plans, device, storage: str, texts: list[str], passes: int) -> list[dict]:
    """`passes` passes over `texts` on one engine (after one warm-up request), guard off."""
    out = []
    with Engine(Store(h.store_dir, storage), plans, device, storage=storage, guard=False, pad_to=None) as engine:
        engine.run(texts[0])
        for _ in range(passes):
            t0 = time.perf_counter()
            reports = [engine.run(t).report for t in texts]
            out.append({"seconds": time.perf_counter() - t0,
                        "latency_median_ms": statistics.median(r.latency_ms for r in reports),
                        "measured_over_predicted": statistics.median(r.latency_ms / r.predicted_ms for r in reports),
                        "stall_median_ms": statistics.median(r.stall_ms for r in reports),
                        "busy_median_ms": statistics.median(sum(x.busy_ms for x in r.layers) for r in reports)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--same-conditions-as", required=True, help="an earlier `sti bench` run's directory or results.json")
    ap.add_argument("--store", type=Path, default=None, help="the store (default: the demo's, of the full preset)")
    ap.add_argument("--model", type=Path, default=None, help="its model directory (default: the demo's)")
    ap.add_argument("--storage", default="emulate:100MB/s")
    ap.add_argument("--target-x", type=float, default=1.0)
    ap.add_argument("--memory-mb", type=float, default=2.0)
    ap.add_argument("--requests", type=int, default=400, help="test requests a pass serves")
    ap.add_argument("--passes", type=int, default=3, help="passes on the first engine (the others serve one)")
    ap.add_argument("--out", type=Path, default=None, help="results file (default: pace-<UTC start>.json)")
    args = ap.parse_args()
    if args.requests < 1 or args.passes < 1:
        ap.error("--requests and --passes must be at least 1")
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    model = args.model or default_model_dir("full")
    st = args.storage
    cfg = BenchConfig(systems=("sti-joint",), storages=(st,), seq_modes=("own",), targets_x=(args.target_x,),
                      memories_mb=(args.memory_mb,), ood_limit=0, conditions_from=str(args.same_conditions_as))
    try:  # no demo store, a wrong results file, store or point: say which, as `sti bench` does
        store = args.store or demo_store_path()
        h = Harness(store, model, cfg, log=lambda *a: None)
        unit = h.t_unit(st, "own")
        device = h.point_device(st, "own", st, unit, args.target_x, args.memory_mb)
    except StiError as exc:
        print(f"bench_pace: {exc}", file=sys.stderr)
        return 1
    plans = planned(h, "sti-joint", device, args.target_x * unit, args.memory_mb, None)
    texts = [e.text for e in h.served_test[:args.requests]]
    rows = []

    def record(label: str, passes: int = 1) -> None:
        for k, p in enumerate(serve(h, plans, device, st, texts, passes)):
            rows.append({"step": label if passes == 1 else f"{label}, pass {k + 1}", **p})
            r = rows[-1]
            print(f"{r['step']:34} median {r['latency_median_ms']:6.2f} ms   measured/predicted "
                  f"{r['measured_over_predicted']:.3f}   busy {r['busy_median_ms']:5.2f}   stall {r['stall_median_ms']:.2f}",
                  flush=True)

    record("first engine", args.passes)
    full_compute_ms(h.weights32, h.tokenizer, h.sample, None)
    record("after measuring the T unit")
    measure_device(store, storage=st, seq_len=cfg.plan_len_own)
    record("after measuring a device profile")
    h.calibrated(device, st, None, args.target_x * unit, args.memory_mb)
    record("after a calibration")
    ratios = [r["measured_over_predicted"] for r in rows]
    summary = {"first_engine_passes": args.passes, "measured_over_predicted_min": min(ratios), "measured_over_predicted_max": max(ratios),
               "first_pass": ratios[0], "after_measuring_median": statistics.median(ratios[args.passes:])}
    print(f"measured/predicted over {len(rows)} passes: {min(ratios):.3f}-{max(ratios):.3f}")
    args.out = args.out if args.out is not None else RESULTS / f"pace-{started[:16].replace(' ', '-').replace(':', '')}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"conditions_from": str(args.same_conditions_as), "store": str(store),
                                    "storage": st, "target_x": args.target_x, "memory_mb": args.memory_mb,
                                    "t_unit_ms": unit, "requests": len(texts), "threads": device.threads,
                                    "guard": False, "started_utc": started,
                                    **summary, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
