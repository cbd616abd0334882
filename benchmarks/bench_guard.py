"""The deadline guard as a safety net: how often it acts, and what it saves.

    .venv/bin/python benchmarks/bench_guard.py [--store DIR] [--targets-x 1,1.5] [--requests N]

On the real store at emulated 100 MB/s, M = 2 MB, own lengths, one torch thread; T a
multiple of the fused fp32 model's median latency (measured in the same run). For each T
one engine (the defaults of `sti.open_engine`: length-aware plans, calibrated at open)
serves every test request twice, with the guard on and with it off, alternating which
goes first, so both see the same machine at the same moment. Per T and mode: requests
within T, requests the guard changed, served accuracy, median measured / predicted, the
99th percentile of latency / T.

With the guard off, before each layer the compute guard's two rules are evaluated without
acting, to say which requests each would have acted on, and how many of the requests that
then missed T it would have caught:
  - `finish`: the projected finish (the layers left at their positions' usual pace,
    runtime/guards.py `PositionPaces`, times this request's pace against it, at the
    request's own length) later than T less a third of the plan's spare time: the rule
    the engine runs;
  - `layer starts`: the lane later than the layer's planned start plus two thirds of the
    spare, plus the pace so far projected over the layers left: the rule before
    2026-12-03, here with the new rule's pace (against the positions' usual paces, one
    on-time layer counted in) where it had the profile's.
The engine's usual paces per layer position (against the calibrated profile) are printed.
Writes benchmarks/results/guard.json and prints the tables.
"""

from __future__ import annotations

import argparse
import statistics
import types
from pathlib import Path

import torch
from tqdm import tqdm

from sti import api
from sti.atomic import atomic_write_json
from sti.bench import full_compute_ms
from sti.data import load_split
from sti.runtime.guards import GUARD_TOLERANCE_MS, compute_guard, finish_by
from sti.store import Store
from sti.tokenizer import Tokenizer

STORAGE = "emulate:100MB/s"
OUT = Path(__file__).parent / "results" / "guard.json"


def watch_rules(engine) -> dict:
    """Make the engine's compute guard, while the guard is off, record for the request in
    flight whether each rule would have acted at some layer."""
    would: dict = {"finish": False, "layer starts": False}
    dropped = engine._dropped

    def watched(self, pos, width, req, slow, usual):
        if self.guard:
            return dropped(pos, width, req, slow, usual)
        steps, dev, now = req.sched.steps, self.device, req.now()
        if len(steps[pos]) > 1 and compute_guard(steps, pos, now, finish_by(req.sched), slow, dev, width, set(), usual):
            would["finish"] = True
        ahead = sum(dev.layer_ms(len(steps[p]), width, p) for p in range(pos, len(steps)))
        late = now - self._late_after(req, pos) + (slow - 1.0) * ahead - GUARD_TOLERANCE_MS
        if len(steps[pos]) > 1 and late > 0:
            would["layer starts"] = True
        return set()

    engine._dropped = types.MethodType(watched, engine)
    return would


def summary(rows: list[dict], target: float) -> dict:
    lat = sorted(r["latency_ms"] for r in rows)
    return {"requests": len(rows),
            "hit_rate": sum(r["latency_ms"] <= target for r in rows) / len(rows),
            "guard_rate": sum(r["guarded"] for r in rows) / len(rows),
            "served_accuracy": sum(r["correct"] for r in rows) / len(rows),
            "measured_over_predicted": statistics.median(r["latency_ms"] / r["predicted_ms"] for r in rows),
            "p99_latency_over_t": lat[min(len(lat) - 1, int(0.99 * len(lat)))] / target}


def rules(off: list[dict], target: float) -> dict:
    missed = [r for r in off if r["latency_ms"] > target]
    out = {}
    for rule in ("finish", "layer starts"):
        acted = [r for r in off if r["would"][rule]]
        out[rule] = {"would_act": len(acted) / len(off), "misses": len(missed),
                     "misses_caught": sum(r["would"][rule] for r in missed)}
    return out


def one_target(store: Path, target: float, examples: list) -> dict:
    with api.open_engine(store, target, 2.0, storage=STORAGE, log=lambda *a: None) as engine:
        labels = engine.config.labels
        would = watch_rules(engine)
        served = {"on": [], "off": []}
        for i, e in enumerate(tqdm(examples, desc=f"T = {target:.1f} ms", leave=False)):
            for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
                engine.guard = mode == "on"
                would.update({"finish": False, "layer starts": False})
                r = engine.run(e.text)
                served[mode].append({"latency_ms": r.report.latency_ms, "predicted_ms": r.report.predicted_ms,
                                     "guarded": bool(r.report.guard_changes), "correct": labels[e.label] == r.label,
                                     "would": dict(would)})
        engine.guard = True
        layers = max(len(w.steps) for w in engine.walks)
        seen = lambda p: any(len(r) > p and r[p] is not None for r in engine.positions.recent)  # noqa: E731
        usual = [f if seen(p) else None for p, f in enumerate(engine.positions.factors(layers))]  # None: no request
    return {"target_ms": target, "calibrated": engine.device.calibrated,
            "modes": {m: summary(rows, target) for m, rows in served.items()},
            "rules_with_guard_off": rules(served["off"], target), "usual_paces": usual}


def main() -> None:
    from sti.demo import demo_store_path
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=None, help="default: the demo's store")
    ap.add_argument("--targets-x", default="1,1.5")
    ap.add_argument("--requests", type=int, default=None, help="default: every test request")
    args = ap.parse_args()
    store = args.store or demo_store_path()
    torch.set_num_threads(1)
    test = load_split("test")
    examples = test[:args.requests] if args.requests else test
    with Store(store) as s:
        weights = s.load_model(32)
    full_ms = full_compute_ms(weights, Tokenizer(store), [e.text for e in test[:40]], None)
    print(f"fused fp32 model {full_ms:.2f} ms; M = 2 MB, {STORAGE}, {len(examples)} test requests, guard on and off")
    points = [one_target(store, float(x) * full_ms, examples) | {"x": float(x)} for x in args.targets_x.split(",")]
    print(f"{'T':>4} {'guard':5} {'within T':>8} {'acted':>6} {'served':>7} {'meas/pred':>9} {'p99/T':>6}")
    for p in points:
        for mode, m in p["modes"].items():
            print(f"{p['x']:3g}x {mode:5} {m['hit_rate']:8.1%} {m['guard_rate']:6.1%} {m['served_accuracy']:7.4f} "
                  f"{m['measured_over_predicted']:9.3f} {m['p99_latency_over_t']:6.3f}")
    print("with the guard off, the compute guard's rules evaluated without acting:")
    for p in points:
        for rule, r in p["rules_with_guard_off"].items():
            print(f"{p['x']:3g}x {rule:13} would act on {r['would_act']:6.1%}, catching {r['misses_caught']} "
                  f"of the {r['misses']} requests that missed T")
        print(f"{p['x']:3g}x usual paces by layer position: {', '.join('-' if f is None else f'{f:.2f}' for f in p['usual_paces'])}")
    result = {"conditions": {"storage": STORAGE, "memory_mb": 2.0, "threads": 1, "full_ms": full_ms,
                             "requests": len(examples), "store": str(store)}, "points": points}
    atomic_write_json(result, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
