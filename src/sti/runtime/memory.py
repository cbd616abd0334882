"""Who holds which bytes: the model bytes alive (our accounting, checked against what is
allocated), the process's peak RSS, and the windows that bound how far the IO side may run
ahead of the compute lane."""

from __future__ import annotations

import math
import threading

import psutil

from ..store import Record


class ModelBytes:
    """Bytes of model weights alive in memory, with the peak (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.now = self.peak = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.now += n
            self.peak = max(self.peak, self.now)

    def sub(self, n: int) -> None:
        with self._lock:
            self.now -= n

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.now


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def blob_bytes(rec: Record, names) -> int:
    """Bytes decoded out of the record's packed blobs among `names` (float32 parts are
    views into the record's buffer, counted with the buffer)."""
    return sum(4 * math.prod(p.shape) for p in rec.parts if p.name in names and p.encoding == "blob")


class PeakRSS:
    """Process peak RSS over a span: Linux lets us reset the high-water mark (VmHWM)."""

    def __init__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = True
        except OSError:
            self.ok = False

    def growth(self) -> int:
        if self.ok:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return max(0, int(line.split()[1]) * 1024 - self.base)
        return max(0, self.proc.memory_info().rss - self.base)


class Window:
    """Bounds the bytes one side may hold ahead of the other: an acquire waits until enough
    earlier ones have been released (one item is always allowed)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()
        self.cancelled = False

    def acquire(self, n: int) -> None:
        with self.cond:
            while self.used > 0 and self.used + n > self.limit and not self.cancelled:
                self.cond.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def reset(self) -> None:
        with self.cond:
            self.used, self.cancelled = 0, False

    def cancel(self) -> None:
        with self.cond:
            self.cancelled = True
            self.cond.notify_all()
