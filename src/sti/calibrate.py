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
  - `first_layer_ms`, the median of the first layer's busy time beyond its scaled compute;
and the IO lane's pace with the profile's (the two IO threads beside the compute lane, as
they run in the engine; the profile times each alone, beside one busy thread):
  - `io_scale`, the median over layers with streamed shards of the IO lane's progress since
    the embeddings (the end of the layer's last decode, less the decoder's waits for the
    compute lane to free a group) over the timeline's prediction of it;
  - `embed_scale`, the median of the embedding rows' read time over the profile's;
and what a request costs outside its lanes' work, on its clock:
  - `setup_ms`, the median time from the call until its lanes start (tokenizing included);
  - `tail_ms`, the median time after its last layer (the head, the answer, the lanes' end),
    and `embed_step_ms`, the compute lane's embedding step once the rows are read: their
    sum sets the head's time if longer than profiled (the timeline counts the embedding
    step with the head, at the end).
Measured in three `sti bench` runs on the full-preset store (2026-12-03, before the waits
for groups were taken out; the corrected profiles are in benchmarks/results/io_calibration/
and headline/): io_scale 1.10-1.11 at emulated 100 MB/s and 1.01-1.29 cold, embed_scale
1.24-1.72 (docs/PROFILES.md has what taking the waits out changed).
`corrected` applies them: compute_coef scaled, `first_layer_ms` set (the timeline adds it
to the first executed layer, planning/plan.py `simulate`), `setup_ms` set (both lanes
start after it), `head_ms` at least the tail and the embedding step, shard read and decode
times and the embedding read scaled, and the figures recorded in the profile's `calibrated`
field, with the raw profile's id. Plans made from the corrected profile predict what the engine
does, so the guard's headroom is left for jitter.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from .errors import InputError
from .planning import simulate
from .profiles import DeviceProfile, profile_id

PROBES = 48          # probe requests: spread over the lengths of the texts given


@dataclass(frozen=True)
class Calibration:
    compute_scale: float       # engine busy time / profiled compute, layers after the first
    first_layer_ms: float      # the first layer's busy time beyond its scaled compute
    requests: int
    io_scale: float = 1.0      # the engine's IO lane progress / the timeline's, layers with streamed shards
    embed_scale: float = 1.0   # the engine's embedding read / the profile's
    setup_ms: float = 0.0      # a request's time from the call until its lanes start
    tail_ms: float = 0.0       # a request's time after its last layer: the head, the answer, the lanes' end
    embed_step_ms: float = 0.0  # the compute lane's embedding step after the rows are read


def measure(engine, texts: list, probes: int = PROBES) -> Calibration:
    """Run up to `probes` of `texts` (spread evenly; each a text or a (text, second text)
    pair) through `engine` without its deadline guard, and compare each layer's busy time
    with the profile's compute time."""
    if not texts:
        raise InputError("calibration needs at least one probe text")
    reports = _probe(engine, texts, probes)
    device = engine.device
    ratios, firsts = [], []
    for r in reports:
        for k, lr in enumerate(r.layers):
            planned = device.compute_ms(lr.shards, r.width)
            busy = lr.busy_ms
            if planned <= 0:
                continue
            (firsts if k == 0 else ratios).append((busy, planned))
    scale = statistics.median(busy / planned for busy, planned in ratios) if ratios else 1.0
    scale = max(scale, 0.5)
    first = statistics.median(busy - scale * planned for busy, planned in firsts) if firsts else 0.0
    io, embed = io_paces(engine, reports)
    return Calibration(compute_scale=scale, first_layer_ms=max(0.0, first), requests=len(reports),
                       io_scale=_bounded(io), embed_scale=_bounded(embed),
                       setup_ms=statistics.median(r.setup_ms for r in reports),
                       tail_ms=statistics.median([r.latency_ms - r.layers[-1].end_ms for r in reports if r.layers]
                                                 or [0.0]),
                       embed_step_ms=statistics.median([max(0.0, r.layers[0].start_ms - r.setup_ms - r.embed_read_ms)
                                                        for r in reports if r.layers] or [0.0]))


def _probe(engine, texts: list, probes: int) -> list:
    """Reports of up to `probes` of `texts` (spread evenly) run with the guard off."""
    step = max(1, len(texts) // probes)
    chosen = texts[::step][:probes]
    guard, engine.guard = engine.guard, False    # every shard of the plan runs as planned
    try:
        return [(engine.run(*t) if isinstance(t, tuple) else engine.run(t)).report for t in chosen]
    finally:
        engine.guard = guard


MIN_IO_MS = 0.2      # layers whose predicted IO since the embeddings is shorter are not compared


def io_paces(engine, reports) -> tuple[list[float], list[float]]:
    """Per (request, layer the timeline has done more than MIN_IO_MS of IO by): the IO lane's
    progress since the embedding rows (when the layer's last decode ends, preloaded shards'
    decodes included) over the timeline's; per request: the embedding read over the
    profile's. Each request is simulated from its own measured embedding time. The decoder
    also waits for the compute lane to free a group (it decodes at most the pool's slabs
    ahead); those waits are the compute lane's pace, which the timeline already has, so
    they are taken out of the IO lane's progress (counted in, they made a compute-bound
    request's IO look 1.6-2.7x slower: plans then streamed too little; docs/PROFILES.md)."""
    device, rows = engine.device, engine.rows.cache
    io, embed = [], []
    for r in reports:
        c = engine.walks[engine.plans.index_for(r.width)].plan.choice
        planned = device.embed_rows_ms(r.width, r.embed_misses, engine.rows_per_block, r.width > rows.positions)
        if planned > 0 and r.embed_read_ms > 0:
            embed.append(r.embed_read_ms / planned)
        # both measured from the end of the embedding read: the request's setup (on its clock,
        # and in the timeline as the profile has it) is not the IO lane's
        timeline = simulate(c.layers, c.m, c.bits, c.preload, device, r.width, embed_ms=r.embed_read_ms, setup_ms=0.0)
        start = r.setup_ms + r.embed_read_ms
        waited = 0.0  # the decoder's waits for free groups so far: the compute lane's pace, not IO's
        for t, lr in zip(timeline, r.layers):
            waited += lr.group_wait_ms
            if lr.decode_end_ms > 0 and t.io_end - r.embed_read_ms > MIN_IO_MS:
                io.append((lr.decode_end_ms - start - waited) / (t.io_end - r.embed_read_ms))
    return io, embed


def _bounded(ratios: list[float]) -> float:
    return min(5.0, max(0.5, statistics.median(ratios))) if ratios else 1.0


def calibrated(engine, texts: list, log=print, source: str = "dev split") -> DeviceProfile:
    """The engine's device profile corrected by `measure` on `texts` (the engine is left as
    it was, guard included)."""
    cal = measure(engine, texts)
    log(f"calibrated on the engine ({cal.requests} requests from the {source}): compute x{cal.compute_scale:.2f}, "
        f"first layer +{cal.first_layer_ms:.2f} ms, IO x{cal.io_scale:.2f}, embedding rows x{cal.embed_scale:.2f}, "
        f"setup {cal.setup_ms:.2f} ms, embedding step {cal.embed_step_ms:.2f} ms, after the last layer "
        f"{cal.tail_ms:.2f} ms")
    return corrected(engine.device, cal)


def corrected(device: DeviceProfile, cal: Calibration) -> DeviceProfile:
    """The profile as the engine runs: compute scaled, the first layer's extra cost set."""
    return replace(device, compute_coef=tuple(c * cal.compute_scale for c in device.compute_coef),
                   first_layer_ms=cal.first_layer_ms, setup_ms=cal.setup_ms,
                   # the head as the engine runs it: its profiled time holds the embeddings'
                   # LayerNorm too, which the timeline counts here, at the end (the lanes'
                   # start is the setup and the read): at least the tail and that step
                   head_ms=max(device.head_ms, cal.tail_ms + cal.embed_step_ms),
                   shard_read_ms={b: v * cal.io_scale for b, v in device.shard_read_ms.items()},
                   shard_decode_ms={b: v * cal.io_scale for b, v in device.shard_decode_ms.items()},
                   embed_ms=tuple(v * cal.embed_scale for v in device.embed_ms),
                   calibrated={"compute_scale": cal.compute_scale, "first_layer_ms": cal.first_layer_ms,
                               "io_scale": cal.io_scale, "embed_scale": cal.embed_scale, "setup_ms": cal.setup_ms,
                               "tail_ms": cal.tail_ms, "embed_step_ms": cal.embed_step_ms,
                               "requests": cal.requests, "raw_profile": profile_id(device)})
