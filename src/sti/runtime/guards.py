"""The deadline guard (beyond the paper) as pure functions: given the schedule, the clock
and the lanes' pace, what to change. The engine applies the changes and reports them.

Both guards measure lateness against a layer's planned start plus a share of the plan's
spare time (T - planned latency; plans keep headroom for it):
  - the IO guard, before each read, predicts when the rest of the current layer will be in
    (at the pace IO has actually run in this request); if that is too late it lowers their
    bitwidth (least important first), then skips the least important ones;
  - the compute guard, before each layer, checks the compute lane's clock (a busy CPU, a
    slow start); if it is late it leaves out enough of the layer's least important shards to
    win the time back over the layers still to run.
Neither ever drops a layer's most important shard; a plan that may not prune (a model not
trained elastic) is only ever lowered in bitwidth.
"""

from __future__ import annotations

import math

from ..profiles import DeviceProfile
from .schedule import Step

GUARD_TOLERANCE_MS = 0.2   # how late a lane may run before the guard acts
GUARD_SHARE = 2 / 3        # share of the plan's spare time (T - planned latency) the lanes may use


class Pace:
    """How much slower than the profile a lane is running in this request. `prior_ms` of
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


def compute_guard(steps: list[list[Step]], pos: int, now_ms: float, due_ms: float, slow: float,
                  device: DeviceProfile, width: int, skipped: set) -> list[Step]:
    """Shards of layer `pos` to leave out because the compute lane runs late, or will at its
    pace: `slow` is how much slower than the profile it has run so far. Enough of the least
    important shards that, dropped in this and each later layer alike, they win back the
    lateness now plus the lateness the pace adds over the layers left. Never a layer's most
    important shard, nor one the IO guard already skipped (dropping it would save nothing)."""
    layer = steps[pos]
    ahead = sum(device.layer_ms(len(later), width, p) for p, later in enumerate(steps[pos:], pos))
    late = now_ms - due_ms + (slow - 1.0) * ahead - GUARD_TOLERANCE_MS
    if late <= 0 or len(layer) < 2:
        return []
    m, layers_left = len(layer), len(steps) - pos
    per_shard = slow * (device.compute_ms(m, width) - device.compute_ms(m - 1, width))
    count = math.ceil(late / max(1e-3, per_shard * layers_left))
    candidates = [s for s in layer if s.rank > 0 and s.shard_key not in skipped]
    return sorted(candidates, key=lambda s: -s.rank)[:count]
