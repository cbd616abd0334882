"""Following the device: an engine that replans when the device drifts, against one that
keeps its plans and lets the deadline guard keep T (src/sti/runtime/follow.py).

    .venv/bin/python benchmarks/bench_drift.py [--store DIR] [--per-phase 200] [--runs 3] [--absolute]

On the real store at emulated 100 MB/s, M = 2 MB, T = 1.5 x the fused fp32 model's median
latency (measured in the same run), one torch thread, own lengths. In each run the device
profile is calibrated on the engine once, and two engines are opened from that one profile:
`follow=True`, and `follow=False` (the plans made at open, the guard cutting what does not
fit). Both serve every request, alternating which goes first, through four phases of
`--per-phase` test requests each (the phases take consecutive test requests):
  1. as profiled;
  2. the storage 2x slower (both engines' emulated bandwidth halved);
  3. the storage still slow, and a background thread taking CPU from the compute lane
     (one-thread 384 x 384 matrix products in a loop: another app on the same cores);
  4. both restored.
A third engine is opened from scratch at 50 MB/s (its own calibration and plans) and serves
phase 2's requests: the plan a user would make for the slower storage. With `--absolute`
the follower judges every lane, shard reads too, against the profile itself
(`Band(absolute=LANES)`) and writes drift_absolute.json. Per phase: served accuracy (labels
returned against the gold labels), requests within T, requests the guard changed, replans,
median measured / predicted latency, and how many requests after a change the first
replan came. Runs differ in the machine's moment and their calibration; the top-level
figures are medians over runs.
Each phase's figures are also given over the requests served after its first replan.
Writes benchmarks/results/drift.json (top-level `hit_rate_after_drift`,
`served_accuracy_after_drift`, their `_no_calibration` twins: phase 2, median over runs;
`served_accuracy_from_scratch_slow_storage`; and `hit_rate_after_replan` and the other
figures over phase 2's requests after the follow engine's first replan) and prints the
tables.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import threading
from pathlib import Path

import torch
from tqdm import tqdm

from sti import api
from sti.atomic import atomic_write_json
from sti.bench import full_compute_ms
from sti.data import load_split
from sti.planning import PlanError
from sti.runtime.follow import LANES, Band, rescaled
from sti.store import Store
from sti.tokenizer import Tokenizer

STORAGE = "emulate:100MB/s"
SLOW = "emulate:50MB/s"
PHASES = ("as profiled", "storage 2x slower", "storage slow + CPU taken", "restored")
OUT = Path(__file__).parent / "results" / "drift.json"
FIGURES = ("served_accuracy", "hit_rate", "guard_rate", "measured_over_predicted")


class CpuHog:
    """A background thread doing one-thread matrix products until stopped."""

    def __init__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        a = torch.randn(384, 384)
        while not self.stop.is_set():
            a = torch.tanh(a @ a)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def figures(results: list, gold: list[int], labels: tuple) -> dict:
    reports = [r.report for r in results]
    if not reports:
        return {"requests": 0}
    return {"requests": len(results),
            "served_accuracy": sum(labels[g] == r.label for g, r in zip(gold, results)) / len(results),
            "hit_rate": sum(r.met_deadline for r in reports) / len(reports),
            "guard_rate": sum(bool(r.guard_changes) for r in reports) / len(reports),
            "latency_median_ms": statistics.median(r.latency_ms for r in reports),
            "measured_over_predicted": statistics.median(r.latency_ms / r.predicted_ms for r in reports)}


def phase_row(name: str, results: list, gold: list[int], labels: tuple, history: list, first: int) -> dict:
    """A phase's figures, and the same over the requests served after its first replan (the
    plans it swapped in; `first`: the engine's request count when the phase began)."""
    # a history entry's `request` is the engine's count with the request that asked for it
    replans = [h for h in history if first < h["request"] <= first + len(results) and "from_request" in h]
    row = {"phase": name, **figures(results, gold, labels), "replans": len(replans),
           "first_replan_after": min((h["request"] - first for h in replans), default=None)}
    if replans:
        since = min(h["from_request"] for h in replans) - first
        row["after_first_replan"] = figures(results[since:], gold[since:], labels)
    return row


def paired(store: Path, target: float, examples: list, per_phase: int, band) -> dict:
    """One run: a calibration, the two engines opened from it, every phase served by both."""
    quiet = lambda *a: None  # noqa: E731
    device = api.calibrated_device(store, target, 2.0, storage=STORAGE, log=quiet)
    with api.open_engine(store, target, 2.0, storage=STORAGE, follow=band, device=device, log=quiet) as follow, \
            api.open_engine(store, target, 2.0, storage=STORAGE, follow=False, device=device, log=quiet) as fixed:
        engines = {"follow": follow, "no_calibration": fixed}
        labels = follow.config.labels
        predicted = predicted_after_slowdown(follow, target)
        starts = {key: e.requests for key, e in engines.items()}  # the warm-up request came first
        rows = {key: [] for key in engines}
        for k, name in enumerate(PHASES):
            chunk = examples[k * per_phase:(k + 1) * per_phase]
            for e in engines.values():
                e.store.reader.bandwidth *= {1: 0.5, 3: 2.0}.get(k, 1.0)
            served = {key: [] for key in engines}
            with CpuHog() if k == 2 else contextlib.nullcontext():
                for i, ex in enumerate(tqdm(chunk, desc=name, leave=False)):
                    for key in (list(engines) if i % 2 == 0 else list(engines)[::-1]):
                        served[key].append(engines[key].run(ex.text))
            for key, e in engines.items():
                rows[key].append(phase_row(name, served[key], [x.label for x in chunk], labels, e.history,
                                           starts[key] + k * per_phase))
        trace = [{"paces": p, "drift": d} for p, d in follow.follower.trace]
        return {"calibrated": device.calibrated, "predicted_storage_2x_slower": predicted,
                "engines": {key: {"phases": rows[key], "history": e.history} for key, e in engines.items()},
                "trace": trace}


def predicted_after_slowdown(engine, target: float) -> dict:
    """The expected accuracy the planner predicts, before any request, for the storage 2x
    slower: plans around the engine's buffer and rows, and with a buffer chosen afresh."""
    from sti.planning.rows import replan_drifted
    slow = rescaled(engine.device, {"read": 2.0})
    importance, tokens, hidden, per_block = engine.replan.prepare()
    around = engine.replan(slow, target, 2.0, engine.plans, False)
    fresh = replan_drifted(engine.plans, slow, importance, tokens, per_block, hidden, api.DEFAULT_HEADROOM, gain=-1.0)
    return {"around_kept_buffer": around.expected_accuracy, "new_buffer": fresh.expected_accuracy}


def serve(engine, examples, labels, name: str, first: int) -> dict:
    results = [engine.run(e.text) for e in tqdm(examples, desc=name, leave=False)]
    return phase_row(name, results, [e.label for e in examples], labels, engine.history, first)


def from_scratch(store: Path, target: float, examples: list) -> dict:
    try:
        with api.open_engine(store, target, 2.0, storage=SLOW, log=lambda *a: None) as engine:
            return serve(engine, examples, engine.config.labels, "from scratch at 50 MB/s", engine.requests)
    except PlanError as exc:   # its calibration found no plan for T: say so, keep the other runs
        return {"phase": "from scratch at 50 MB/s", "error": str(exc)}


def main() -> None:
    from sti.demo import demo_store_path
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=None, help="default: the demo's store")
    ap.add_argument("--per-phase", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--absolute", action="store_true", help="judge every lane against the profile itself")
    args = ap.parse_args()
    out = OUT.with_name("drift_absolute.json") if args.absolute else OUT
    band = Band(absolute=LANES) if args.absolute else Band()
    store = args.store or demo_store_path()
    torch.set_num_threads(1)
    test = load_split("test")
    if not 0 < 4 * args.per_phase <= len(test):
        ap.error(f"--per-phase must be 1..{len(test) // 4}: the four phases take consecutive test requests")
    examples = test[:4 * args.per_phase]
    with Store(store) as s:
        weights = s.load_model(32)
    full_ms = full_compute_ms(weights, Tokenizer(store), [e.text for e in test[:40]], None)
    target = 1.5 * full_ms
    print(f"T = 1.5 x {full_ms:.2f} ms = {target:.2f} ms, M = 2 MB, {STORAGE}, {args.per_phase} requests a phase")
    runs = []
    for run in range(args.runs):
        print(f"run {run + 1} of {args.runs}")
        runs.append(paired(store, target, examples, args.per_phase, band))
        runs[-1]["from_scratch_slow_storage"] = from_scratch(store, target, examples[args.per_phase:2 * args.per_phase])
    print(f"{'run':4} {'engine':15} {'phase':26} {'served':>7} {'within T':>8} {'guard':>6} {'replans':>7} "
          f"{'first':>5} {'meas/pred':>9}")
    for n, run in enumerate(runs, 1):
        for key, served in run["engines"].items():
            for r in served["phases"]:
                print(f"{n:<4} {key:15} {r['phase']:26} {r['served_accuracy']:7.4f} {r['hit_rate']:8.1%} "
                      f"{r['guard_rate']:6.1%} {r['replans']:7d} {str(r['first_replan_after']):>5} "
                      f"{r['measured_over_predicted']:9.3f}")
                if r.get("after_first_replan", {}).get("requests"):
                    a = r["after_first_replan"]
                    print(f"{'':4} {'':15} {'  after its first replan':26} {a['served_accuracy']:7.4f} "
                          f"{a['hit_rate']:8.1%} {a['guard_rate']:6.1%} {'':7} {'':>5} "
                          f"{a['measured_over_predicted']:9.3f}")
        p = run["predicted_storage_2x_slower"]
        print(f"{n:<4} predicted for the storage 2x slower: {p['around_kept_buffer']:.4f} around the kept buffer, "
              f"{p['new_buffer']:.4f} with a new one")
        scratch = run["from_scratch_slow_storage"]
        if "error" in scratch:
            print(f"{n:<4} {'from scratch':15} {'storage 2x slower':26} no plan: {scratch['error']}")
        else:
            print(f"{n:<4} {'from scratch':15} {'storage 2x slower':26} {scratch['served_accuracy']:7.4f} "
                  f"{scratch['hit_rate']:8.1%} {scratch['guard_rate']:6.1%} {'':7} {'':>5} "
                  f"{scratch['measured_over_predicted']:9.3f}")

    def median(key: str, figure: str, phase: int = 1):
        return statistics.median(r["engines"][key]["phases"][phase][figure] for r in runs)
    scratch = [r["from_scratch_slow_storage"].get("served_accuracy") for r in runs]
    scratch = [v for v in scratch if v is not None]
    result = {"conditions": {"storage": STORAGE, "slow_storage": SLOW, "threads": 1, "full_ms": full_ms,
                             "target_ms": target, "memory_mb": 2.0, "per_phase": args.per_phase, "runs": args.runs,
                             "store": str(store)},
              "runs": runs,
              "medians_over_runs": {key: [{figure: median(key, figure, k) for figure in FIGURES}
                                          for k in range(len(PHASES))] for key in runs[0]["engines"]},
              "hit_rate_after_drift": median("follow", "hit_rate"),
              "served_accuracy_after_drift": median("follow", "served_accuracy"),
              "hit_rate_after_drift_no_calibration": median("no_calibration", "hit_rate"),
              "served_accuracy_after_drift_no_calibration": median("no_calibration", "served_accuracy"),
              "served_accuracy_from_scratch_slow_storage": statistics.median(scratch) if scratch else None}
    after = [r["engines"]["follow"]["phases"][1].get("after_first_replan") for r in runs]
    after = [a for a in after if a and a["requests"]]
    for figure in FIGURES:   # phase 2, the follow engine, from the plans its first replan swapped in
        result[f"{figure}_after_replan"] = statistics.median(a[figure] for a in after) if after else None
    result["after_replan_runs"] = len(after)   # runs whose follow engine replanned in phase 2
    result["conditions"]["band"] = dataclasses.asdict(band)
    atomic_write_json(result, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
