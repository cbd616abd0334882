"""One request in flight: its clock, the hand-off between its three lanes, its report, and
what the deadline guards left out. Each lane holds the same `Request`; nothing of it
outlives the request."""

from __future__ import annotations

import threading
import time

from .report import Report
from .schedule import Schedule

SKIPPED = object()     # the deadline guard left the shard out: nothing to use
PRELOADED = object()   # the shard is in the preload buffer: nothing to read


class Request:
    def __init__(self, report: Report, sched: Schedule, t0: float):
        self.report = report
        self.sched = sched         # the plan this request runs, as the engine walks it
        self.t0 = t0               # the clock's zero (`time.perf_counter()`): the call, for the caller's T
        self.cond = threading.Condition()
        self.items: dict = {}      # delivered by the IO side, keyed by (layer, shard) or "embed"
        self.error: BaseException | None = None
        self.cancelled = False
        self.dropped: set = set()  # (layer, shard) the compute guard left out
        self.skipped: set = set()  # (layer, shard) the IO guard left out
        self._report_lock = threading.Lock()

    def now(self) -> float:
        """Milliseconds since the request started."""
        return (time.perf_counter() - self.t0) * 1e3

    def put(self, key, value) -> None:
        with self.cond:
            self.items[key] = value
            self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        """An IO-side lane failed: the compute lane re-raises `exc` at its next take."""
        with self.cond:
            self.error = exc
            self.cond.notify_all()

    def take(self, key):
        with self.cond:
            while key not in self.items:
                if self.error is not None:
                    raise self.error
                self.cond.wait()
            return self.items.pop(key)

    def span(self, lane: str, name: str, start_ms: float, end_ms: float) -> None:
        self.report.spans.append((lane, name, start_ms, end_ms))

    def add_decode(self, pos: int, start_ms: float, end_ms: float) -> None:
        with self._report_lock:
            layer = self.report.layers[pos]
            layer.decode_ms += end_ms - start_ms
            layer.decode_end_ms = max(layer.decode_end_ms, end_ms)
