"""The deadline guard (beyond the paper) as pure functions: given the schedule, the clock
and the lanes' pace, what to change. The engine applies the changes and reports them.

Both let the lanes use a share of the plan's spare time (T - planned latency; plans keep
headroom for it):
  - the IO guard, before each read, predicts when the rest of the current layer will be in
    (at the pace IO has actually run in this request); if that is later than the layer's
    planned start plus the share, it lowers their bitwidth (least important first), then
    skips the least important ones;
  - the compute guard, before each layer, projects when the request will finish: the layers
    left at the pace each position has run at in recent requests (`PositionPaces`),
    times how much slower than that this request has run so far. If that is later than T
    less the rest of the spare time, it leaves out enough of the layer's least important
    shards to win the time back over the layers still to run.
Neither ever drops a layer's most important shard; a plan that may not prune (a model not
trained elastic) is only ever lowered in bitwidth.
"""

from __future__ import annotations

import collections
import math
import statistics

from ..profiles import DeviceProfile
from .schedule import Schedule, Step

GUARD_TOLERANCE_MS = 0.2   # how late a lane may run before the guard acts
GUARD_SHARE = 2 / 3        # share of the plan's spare time (T - planned latency) the lanes may use


class Pace:
    """How much slower than planned a lane is running in this request (the IO lane: than
    the profile; the compute lane: than its positions' usual pace). `prior_ms` of
    on-time work is counted in from the start, so that one short read that ran long (the
    embedding rows of a short request: 1.1 ms planned, 2.4 ms measured) does not make the
    guard take the whole request for 2x slow and skip shards it had time for."""

    def __init__(self, prior_ms: float = 0.0):
        self.planned = self.actual = prior_ms

    def add(self, planned_ms: float, actual_ms: float) -> None:
        self.planned += planned_ms
        self.actual += actual_ms

    def slowdown(self) -> float:
        return max(1.0, self.actual / self.planned) if self.planned > 0 else 1.0


class PositionPaces:
    """Each layer position's compute time over the profile's (`layer_ms`), median over the
    last `memory` requests: what the compute guard projects the layers left at. The
    calibration at open scales the profile by one median over all layers, from 48 probe
    requests at one moment of a shared machine; what recent requests measured is both
    closer in time and position by position (the early layers run beside the IO lane;
    `benchmarks/bench_guard.py` prints them: 0.80-1.51 of the calibrated profile in two
    runs on 2026-12-03, differing by up to 0.37 between positions of one engine)."""

    def __init__(self, memory: int = 15):
        self.recent: collections.deque = collections.deque(maxlen=memory)

    def add(self, ratios: list[float | None]) -> None:
        """One request's paces by position (None: a layer with nothing to compare)."""
        self.recent.append(ratios)

    def factors(self, n: int) -> list[float]:
        """Per position 0..n-1: the median pace there; where no recent request has run (a
        length bucket's plan with more layers than the others), the median of the positions
        seen; 1.0 before any request."""
        seen = {p: statistics.median(v) for p in range(n)
                if (v := [r[p] for r in self.recent if len(r) > p and r[p] is not None])}
        rest = statistics.median(seen.values()) if seen else 1.0
        return [seen.get(p, rest) for p in range(n)]


def io_guard(remaining: list[Step], bits: dict, now_ms: float, due_ms: float, slow: float,
             device: DeviceProfile, lowest: int, prune: bool) -> list[tuple]:
    """Changes (layer, shard, bits before, bits after or None = skipped) that make the IO of
    the layer's `remaining` shards (at `bits[shard]`, None if already out) fit before
    `due_ms`: lower bitwidths to `lowest`, least important first, then skip shards."""
    bits = dict(bits)
    changes = []

    def late() -> bool:
        io = sum(device.io_ms(bits[s.shard]) for s in remaining if bits[s.shard] is not None)
        return now_ms + slow * io > due_ms + GUARD_TOLERANCE_MS

    least_first = sorted(remaining, key=lambda s: -s.rank)
    for s in least_first:
        if not late():
            return changes
        if bits[s.shard] is not None and bits[s.shard] > lowest:
            changes.append((s.layer, s.shard, bits[s.shard], lowest))
            bits[s.shard] = lowest
    if not prune:
        return changes
    for s in least_first:
        if not late():
            return changes
        if s.rank > 0 and bits[s.shard] is not None:  # keep each layer's most important shard
            changes.append((s.layer, s.shard, bits[s.shard], None))
            bits[s.shard] = None
    return changes


def finish_by(sched: Schedule) -> float:
    """When the compute guard wants a request of this schedule finished: T less the third
    of the plan's spare time the lanes may not use."""
    return sched.plan.request.target_ms - (1.0 - GUARD_SHARE) * sched.spare_ms


def compute_guard(steps: list[list[Step]], pos: int, now_ms: float, end_ms: float, slow: float,
                  device: DeviceProfile, width: int, skipped: set, paces: list[float] | None = None) -> list[Step]:
    """Shards of layer `pos` to leave out because, at the pace the compute lane runs, the
    request would finish after `end_ms` (T less a third of the plan's spare time): the
    layers left take `paces[p]` x the profile each (the usual pace at position p, 1.0 if
    not given) times `slow`, how much slower than usual this request has run so far, and
    the head follows. Enough of the least important shards that, dropped in this and each
    later layer alike, bring the finish back to `end_ms`. Never a layer's most important
    shard, nor one the IO guard already skipped (dropping it would save nothing).

    The finish against T, not this layer's start against the plan's: the plan's schedule
    is made for its length bucket's longest request (and may wait for IO at later layers),
    so a request late for it can still finish in time. Measured with the guard off
    (`benchmarks/bench_guard.py`, every test request, 100 MB/s, M = 2 MB, two runs on
    2026-12-03, MEASUREMENTS.md): both rules caught the same requests that missed T, and
    where the device ran as planned the finish rule acted on 2.6-3.5x fewer requests (at
    T = 1x, 5.2% against 13.7%, and 1.1% against 3.9%)."""
    layer = steps[pos]
    paces = paces or [1.0] * len(steps)
    left = range(pos, len(steps))
    finish = now_ms + slow * sum(paces[p] * device.layer_ms(len(steps[p]), width, p) for p in left) + device.head_ms
    late = finish - end_ms - GUARD_TOLERANCE_MS
    if late <= 0 or len(layer) < 2:
        return []
    m, layers_left = len(layer), len(steps) - pos
    shard_ms = device.compute_ms(m, width) - device.compute_ms(m - 1, width)
    per_shard = slow * statistics.mean(paces[p] for p in left) * shard_ms
    count = math.ceil(late / max(1e-3, per_shard * layers_left))
    candidates = [s for s in layer if s.rank > 0 and s.shard_key not in skipped]
    return sorted(candidates, key=lambda s: -s.rank)[:count]
