"""Whose clock T is kept on: the caller's, from the call, against the engine's former one.

    .venv/bin/python benchmarks/bench_clock.py [--targets-x 1,2] [--store DIR] [--requests N]

Until 2026-12-07 a request's clock started after it was tokenized and its report and lanes
set up, and the profile knew nothing of that setup nor of the time after the last layer
(the head as the engine runs it, the answer): callers timing the call saw about 0.9 ms the
engine's clock, its plans and its deadline guard did not. Now the clock starts at the
call, calibration measures the setup and the tail, and the plans and the guard count them.

On the real store at emulated 100 MB/s, M = 2 MB, own lengths, one torch thread, at each T
(a multiple of the fused fp32 model's median latency, measured in the same run) one
calibration on the engine, then two engines opened from it serve every test request,
taking turns (which goes first alternates), in one process, so that both see the same
moments of a shared machine:
  - `call`: the engine as it is;
  - `engine`: the former clock (started after tokenizing; the former engine started it
    later still, after setting up the request's report, so this arm is if anything kinder
    to it), plans from the same profile without setup and with the profiled head.
Per engine: served test accuracy, requests within T on the caller's clock (the call timed
around `engine.run`), guard rate, median measured / predicted (each engine's own clock and
prediction), median caller's clock minus the engine's, and the plans' expected accuracy.
Writes benchmarks/results/clock.json (or `--out`) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sti import api
from sti.atomic import atomic_write_json
from sti.bench import full_compute_ms
from sti.data import load_split
from sti.runtime import Engine
from sti.store import Store
from sti.tokenizer import Tokenizer

STORAGE = "emulate:100MB/s"
OUT = Path(__file__).parent / "results" / "clock.json"


class EngineClock(Engine):
    """The former clock: a request's zero is taken after it is tokenized."""

    def run(self, text: str, pair: str | None = None):
        batch = self.tokenizer.encode([text], pairs=None if pair is None else [pair])
        with self._lock, torch.inference_mode():
            torch.set_num_threads(self.threads)
            return self._serve(batch, time.perf_counter())


def engines(store: Path, target: float, log) -> dict:
    calibrated = api.calibrated_device(store, target, 2.0, storage=STORAGE, log=log)
    raw = api.device_profile(store, STORAGE, log=lambda *a: None)
    former = dataclasses.replace(calibrated, setup_ms=0.0, head_ms=raw.head_ms)
    out = {}
    for name, device, kind in (("call", calibrated, Engine), ("engine", former, EngineClock)):
        plans = api.plan(store, target, 2.0, storage=STORAGE, device=device, log=lambda *a: None)
        out[name] = kind(Store(store, STORAGE), plans, device, storage=STORAGE)
        out[name].run("warm up")
    return out


def serve(opened: dict, examples, target: float) -> dict:
    rows = {name: [] for name in opened}
    names = list(opened)
    for i, e in enumerate(tqdm(examples, desc=f"T = {target:.1f} ms", leave=False)):
        for name in names[i % len(names):] + names[:i % len(names)]:
            a = time.perf_counter()
            result = opened[name].run(e.text)
            rows[name].append(((time.perf_counter() - a) * 1e3, result))
    out = {}
    for name, got in rows.items():
        reports = [r.report for _, r in got]
        labels = opened[name].config.labels
        out[name] = {
            "served_accuracy": statistics.mean(r.label == labels[e.label] for (_, r), e in zip(got, examples)),
            "within_t": statistics.mean(w <= target for w, _ in got),
            "guard_rate": statistics.mean(bool(r.guard_changes) for r in reports),
            "measured_over_predicted": statistics.median(r.latency_ms / r.predicted_ms for r in reports),
            "caller_minus_engine_ms": statistics.median(w - r.report.latency_ms for w, r in got),
            "setup_ms": statistics.median(r.setup_ms for r in reports),
            "expected_accuracy": opened[name].plans.expected_accuracy}
    return out


def main() -> None:
    from sti.demo import demo_store_path
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=None, help="default: the demo's store")
    ap.add_argument("--targets-x", default="1,2")
    ap.add_argument("--requests", type=int, default=None, help="test requests (default: all)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    store = args.store or demo_store_path()
    torch.set_num_threads(1)
    test = load_split("test")[:args.requests]
    with Store(store) as s:
        weights = s.load_model(32)
    unit = full_compute_ms(weights, Tokenizer(store, max_length=128), [e.text for e in test[:200]], None)
    points = []
    for x in (float(v) for v in args.targets_x.split(",")):
        opened = engines(store, x * unit, print)
        try:
            points.append({"target_x": x, "target_ms": x * unit, "engines": serve(opened, test, x * unit)})
        finally:
            for e in opened.values():
                e.close()
        atomic_write_json({"conditions": {"storage": STORAGE, "memory_mb": 2.0, "threads": 1,
                                               "full_ms": unit, "requests": len(test), "store": str(store),
                                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                                "points": points}, args.out)
    print("| T | engine | served acc | within T (caller) | guard acted | measured / predicted | caller - engine ms "
          "| plans' expected acc |\n|---|---|---|---|---|---|---|---|")
    for p in points:
        for name, f in p["engines"].items():
            print(f"| {p['target_x']:g}x ({p['target_ms']:.1f} ms) | {name} | {f['served_accuracy']:.4f} | "
                  f"{f['within_t']:.1%} | {f['guard_rate']:.1%} | {f['measured_over_predicted']:.2f} | "
                  f"{f['caller_minus_engine_ms']:.2f} | {f['expected_accuracy']:.4f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
