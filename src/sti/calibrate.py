"""Calibrating a device profile on the engine itself.

The device profile times each lane's work on repeated, warm inputs (beside a busy other lane,
as in the engine). Inside the engine a layer also pays for what those timings do not see:
the Python between groups, handing groups between threads, weights the decoder has just
written from another core. Measured by this module in `sti bench` runs on the full-preset
model (emulated 100 MB/s and cold, 1 compute thread; the corrected profiles are kept in each
results.json): the first executed layer took 0.14-0.62 ms longer than its profiled compute,
the later ones up to 1.25x; a plan that spends all of T is then late, and the deadline guard
cuts.

`measure` runs probe requests through an engine with the deadline guard off and compares,
request by request, each layer's busy time (its span on the compute lane minus the time it
waited for IO) with the profile's compute time at the request's width:
  - `compute_scale`, the median ratio over the layers after the first;
  - `first_layer_ms`, the median of the first layer's busy time beyond its scaled compute.
`corrected` applies them: compute_coef scaled, `first_layer_ms` set (the timeline adds it
to the first executed layer, planning/plan.py `simulate`), and the figures recorded in the
profile's `calibrated` field, with the raw profile's id. Plans made from the corrected profile
predict what the engine does, so the guard's headroom is left for jitter.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from .errors import InputError
from .profiles import DeviceProfile, profile_id

PROBES = 48          # probe requests: spread over the lengths of the texts given


@dataclass(frozen=True)
class Calibration:
    compute_scale: float       # engine busy time / profiled compute, layers after the first
    first_layer_ms: float      # the first layer's busy time beyond its scaled compute
    requests: int


def measure(engine, texts: list, probes: int = PROBES) -> Calibration:
    """Run up to `probes` of `texts` (spread evenly; each a text or a (text, second text)
    pair) through `engine` without its deadline guard, and compare each layer's busy time
    with the profile's compute time."""
    if not texts:
        raise InputError("calibration needs at least one probe text")
    step = max(1, len(texts) // probes)
    chosen = texts[::step][:probes]
    guard, engine.guard = engine.guard, False    # every shard of the plan runs as planned
    try:
        reports = [(engine.run(*t) if isinstance(t, tuple) else engine.run(t)).report for t in chosen]
    finally:
        engine.guard = guard
    device = engine.device
    ratios, firsts = [], []
    for r in reports:
        for k, lr in enumerate(r.layers):
            planned = device.compute_ms(lr.shards, r.width)
            busy = lr.end_ms - lr.start_ms - lr.stall_ms
            if planned <= 0:
                continue
            (firsts if k == 0 else ratios).append((busy, planned))
    scale = statistics.median(busy / planned for busy, planned in ratios) if ratios else 1.0
    scale = max(scale, 0.5)
    first = statistics.median(busy - scale * planned for busy, planned in firsts) if firsts else 0.0
    return Calibration(compute_scale=scale, first_layer_ms=max(0.0, first), requests=len(reports))


def calibrated(engine, texts: list, log=print, source: str = "dev split") -> DeviceProfile:
    """The engine's device profile corrected by `measure` on `texts` (the engine is left as
    it was, guard included)."""
    cal = measure(engine, texts)
    log(f"calibrated on the engine ({cal.requests} requests from the {source}): compute x{cal.compute_scale:.2f}, "
        f"first layer +{cal.first_layer_ms:.2f} ms")
    return corrected(engine.device, cal)


def corrected(device: DeviceProfile, cal: Calibration) -> DeviceProfile:
    """The profile as the engine runs: compute scaled, the first layer's extra cost set."""
    return replace(device, compute_coef=tuple(c * cal.compute_scale for c in device.compute_coef),
                   first_layer_ms=cal.first_layer_ms,
                   calibrated={"compute_scale": cal.compute_scale, "first_layer_ms": cal.first_layer_ms,
                               "requests": cal.requests, "raw_profile": profile_id(device)})
