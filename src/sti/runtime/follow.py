"""Following the device: notice when it runs slower or faster than its profile, and say by
how much, so that the engine can plan again.

A phone throttles as it warms, shares its cores with other apps and its storage with other
readers: a profile taken earlier stops being true, and a plan made from it is late (the
deadline guard then cuts shards from every request) or early (time the plan could have
used). The engine already times every request's lanes; this module turns those timings
into a running estimate of each lane's pace against the profile the plans were made with:

  - compute: a layer's busy time (its compute-lane span minus its waits for IO) over the
    profile's compute time, the median over the layers after the first of one request;
  - read:    the request's streamed shard reads over the profile's read times for them;
  - embed:   the embedding rows' read over the profile's.

Each lane's pace is compared with its *baseline*, the median of the first 2 x `window`
requests the engine served (the profile was just calibrated on the engine, so the baseline
is what "as profiled" looks like on this engine, extra costs and all) or, for the lanes in
`Band.absolute` (compute and embedding reads by default, whose calibration measured the
same ratio), a pace of 1.0: the profile itself is judged, and corrected if the device
was already off it when the engine opened. The spread of the first requests' paces is
kept either way. The drift of a lane
is the median of its last `window` paces over its baseline: a windowed median, so one slow
request (a page fault, a GC) moves nothing. When a lane's drift stays outside the band
(1 +- `width`) for `patience` requests in a row, `Follower.add` returns the drifts; the
engine scales the profile by the lanes that left the band (`rescaled`), plans again if that
moves the plan's predicted latency by more than the band, and calls `replanned`, which
restates the windows' paces against the new profile (their medians are then back at the
baselines). Band, windowed median and patience keep noise from causing a storm of
replans: a replan needs `patience` requests in a row whose running median, with the last
replan's correction applied, is still outside the band.
"""

from __future__ import annotations

import collections
import math
import statistics
from dataclasses import dataclass, replace

from ..profiles import DeviceProfile

LANES = ("compute", "read", "embed")
TRACE = 2000        # requests whose paces and drifts the follower keeps, for looking back
SIGNIFICANCE = 4.0   # a drift must exceed this many standard errors of its running median


@dataclass(frozen=True)
class Band:
    width: float = 0.07      # a lane drifted when its estimate is more than 7% off its baseline
    window: int = 15         # requests in the baseline and in each running median
    patience: int = 4        # requests in a row outside the band before a replan
    # lanes judged against the profile itself (a pace of 1.0), not against the engine's
    # first requests: those whose calibration (calibrate.py) measured the very ratio the
    # pace is, so that 1.0 is "as calibrated" and a profile off from the start is corrected
    # too. Shard reads are not: calibration scales them by the IO lane's whole progress
    # (decodes and waits included), so raw reads run below 1.0 by design
    absolute: tuple[str, ...] = ("compute", "embed")

    def __post_init__(self):
        if not (0 < self.width < 1 and self.window >= 1 and self.patience >= 1):
            raise ValueError(f"a band needs 0 < width < 1, window >= 1 and patience >= 1, got {self}")


class Follower:
    """The running estimate of each lane's drift (see the module's docstring)."""

    def __init__(self, band: Band = Band()):
        self.band = band
        self.baseline: dict[str, float] = {}
        self._spread: dict[str, float] = {}   # the baseline paces' median absolute deviation, relative
        self._first: dict[str, list[float]] = {lane: [] for lane in LANES}
        self._recent = {lane: collections.deque(maxlen=band.window) for lane in LANES}
        self.streak = 0
        self.trace: collections.deque = collections.deque(maxlen=TRACE)  # (paces, drift) of recent requests

    def add(self, paces: dict[str, float | None]) -> dict[str, float] | None:
        """One request's paces (a lane it did not use: None). Returns the drifts of the
        lanes that left the band once they have been out for `patience` requests in a row."""
        for lane, pace in paces.items():
            if pace is None or not math.isfinite(pace) or pace <= 0:
                continue
            if lane in self.baseline:
                self._recent[lane].append(pace)
                continue
            self._first[lane].append(pace)
            if len(self._first[lane]) == 2 * self.band.window:
                base = statistics.median(self._first[lane])
                self._spread[lane] = _relative_mad(self._first[lane], base)
                self.baseline[lane] = 1.0 if lane in self.band.absolute else base
        drift = self.drift()
        off = self.outside(drift)
        self.trace.append((paces, drift))
        self.streak = self.streak + 1 if off else 0
        return off if self.streak >= self.band.patience else None

    def drift(self) -> dict[str, float]:
        """Each lane's running median over its baseline (lanes with a full window)."""
        return {lane: statistics.median(q) / self.baseline[lane] for lane, q in self._recent.items()
                if lane in self.baseline and len(q) == self.band.window}

    def outside(self, drift: dict[str, float] | None = None) -> dict[str, float]:
        """The drifted lanes (of `drift`, by default `self.drift()`): off by more than the
        band, and by more than `SIGNIFICANCE` standard errors of their running median (so a
        noisier device needs a larger change)."""
        out = {}
        for lane, d in (self.drift() if drift is None else drift).items():
            q = self._recent[lane]
            spread = max(_relative_mad(q, d * self.baseline[lane]), self._spread[lane])
            # the standard error of the difference of two medians (the window's, of n paces,
            # and the baseline's, of 2n), from the larger relative median absolute deviation
            # of the two (one window's alone is too unsteady an estimate)
            error = 1.4826 * spread * 1.2533 * math.sqrt(1.5 / len(q)) * d
            if abs(d - 1.0) > max(self.band.width, SIGNIFICANCE * error):
                out[lane] = d
        return out

    def replanned(self, applied: dict[str, float]) -> None:
        """The profile was scaled by `applied` (lane -> factor): the paces in the windows,
        measured against the old profile, are restated against the new one, so each
        drifted lane's running median is back at its baseline; paces measured from now on
        move it again only if the device keeps changing."""
        for lane, factor in applied.items():
            q = self._recent[lane]
            q.extend([v / factor for v in [q.popleft() for _ in range(len(q))]])
        self.streak = 0


def _relative_mad(paces, median: float) -> float:
    """The median absolute deviation of `paces` from their `median`, relative to it."""
    return statistics.median(abs(v - median) for v in paces) / median


def layer_paces(report, device: DeviceProfile) -> list[float | None]:
    """Each executed layer's busy time (`LayerReport.busy_ms`) over the profile's time for it
    (`layer_ms`); None for a layer with no planned compute or that did not run."""
    return [lr.busy_ms / planned
            if (planned := device.layer_ms(lr.shards, report.width, k)) > 0 and lr.end_ms > 0 else None
            for k, lr in enumerate(report.layers)]


def request_paces(report, device: DeviceProfile, rows_per_block: int, resident_positions: int) -> dict:
    """One request's pace per lane against `device` (None where the request did not use the
    lane). Layers with no planned compute and reads the profile puts at zero are left out;
    so is the first layer (its extra cost is calibrated apart, `first_layer_ms`)."""
    ratios = [v for v in layer_paces(report, device)[1:] if v is not None]
    embed = device.embed_rows_ms(report.width, report.embed_misses, rows_per_block,
                                 report.width > resident_positions)
    return {"compute": statistics.median(ratios) if ratios else None,
            "read": report.read_ms / report.read_profiled_ms if report.read_profiled_ms > 0 else None,
            "embed": report.embed_read_ms / embed if embed > 0 and report.embed_read_ms > 0 else None}


def rescaled(device: DeviceProfile, drift: dict[str, float]) -> DeviceProfile:
    """The profile with each drifted lane's times scaled by its drift: compute (and the CPU
    work beside it: decoding, the first layer's extra, the head, the request's setup), shard
    reads, embedding reads."""
    c, r, e = (drift.get(lane, 1.0) for lane in LANES)
    return replace(device, compute_coef=tuple(v * c for v in device.compute_coef),
                   first_layer_ms=device.first_layer_ms * c, head_ms=device.head_ms * c, setup_ms=device.setup_ms * c,
                   shard_decode_ms={b: v * c for b, v in device.shard_decode_ms.items()},
                   shard_read_ms={b: v * r for b, v in device.shard_read_ms.items()},
                   layer_read_ms=device.layer_read_ms * r,
                   embed_ms=tuple(v * e for v in device.embed_ms))
