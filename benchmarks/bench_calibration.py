"""Is the engine's calibration at open measuring the device? (issue: plans and calibration)

The IO scale (`sti.calibrate.io_paces`): an engine on the store, opened from the raw
device profile, runs --probes rounds of calibration probes (48 dev requests each, guard off),
and each round's reports are read three ways: the IO lane's progress over the timeline's with
the decoder's waits for free groups taken out (what calibration does now), the same with them
counted in (what it did before), and the streamed reads alone over the profile's.

Served accuracy with the calibration at open is `sti bench` (calibrated per storage):
`sti bench STORE MODEL --systems sti-joint --storages emulate:100MB/s --seq-modes own
--targets-x 1,1.5,2 --memories-mb 2`, under PYTHONPATH=OLD/src for an older tree.

    .venv/bin/python benchmarks/bench_calibration.py [--store DIR] [--latencies-ms 16 32]

Emulated storage 100 MB/s, M = 2 MB, 1 torch thread. Writes benchmarks/results/calibration.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

import sti
from sti import calibrate
from sti.data import load_split
from sti.profile_device import machine

OUT = Path(__file__).resolve().parent / "results" / "calibration.json"
STORAGE, MEMORY_MB = "emulate:100MB/s", 2.0


def io_scales(store: Path, latency_ms: float, rounds: int) -> list[dict]:
    dev = [e.text for e in load_split("dev")]
    out = []
    with sti.open_engine(store, latency_ms=latency_ms, memory_mb=MEMORY_MB, storage=STORAGE, calibrate=False,
                         log=lambda *a: None) as engine:
        for _ in range(rounds):
            reports = calibrate._probe(engine, dev, calibrate.PROBES)
            counted = [dataclasses.replace(r, layers=[dataclasses.replace(lr, group_wait_ms=0.0) for lr in r.layers])
                       for r in reports]
            now, _ = calibrate.io_paces(engine, reports)
            before, _ = calibrate.io_paces(engine, counted)
            out.append({"latency_ms": latency_ms, "io_scale": statistics.median(now),
                        "io_scale_waits_counted": statistics.median(before),
                        "reads_over_profile": statistics.median(r.read_ms / r.read_profiled_ms for r in reports
                                                                if r.read_profiled_ms > 0),
                        "group_wait_ms_median": statistics.median(sum(lr.group_wait_ms for lr in r.layers)
                                                                  for r in reports)})
            print(json.dumps({k: round(v, 3) for k, v in out[-1].items()}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=None, help="default: the demo's store")
    ap.add_argument("--latencies-ms", type=float, nargs="+", default=[16.0, 32.0])
    ap.add_argument("--probes", type=int, default=3, help="rounds of calibration probes per latency")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    store = args.store or sti.demo_store_path()
    rows = [row for t in args.latencies_ms for row in io_scales(store, t, args.probes)]
    result = {"rows": rows, "conditions": {"store": str(store), "storage": STORAGE, "memory_mb": MEMORY_MB,
                                           "torch_threads": 1, "probes": calibrate.PROBES, "machine": machine(),
                                           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
