"""Reading byte ranges of a store file: warm (page cache), cold (O_DIRECT).

Each read returns a new writable buffer that the caller owns (numpy and torch can wrap it
without copying). Cold reads use O_DIRECT with page-aligned offsets, lengths and buffers, so
they measure the storage device and not the page cache; where a filesystem refuses O_DIRECT
(tmpfs, some overlays) the reader falls back to evicting the file's pages before each read
(posix_fadvise DONTNEED), which is the next best way to read cold.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import re
import sys
import threading
import time
from pathlib import Path

from .errors import StoreError

PAGE = 4096


class WarmReader:
    """Plain positioned reads; repeated reads come from the page cache."""

    mode = "warm"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise StoreError(f"cannot open {self.path}: {exc.strerror}") from None

    def read(self, offset: int, length: int) -> memoryview:
        buf = bytearray(length)
        got = os.preadv(self.fd, [buf], offset)
        if got != length:
            raise StoreError(f"{self.path}: short read at offset {offset} ({got} of {length} bytes): "
                             "the file is truncated")
        return memoryview(buf)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()


class ColdReader(WarmReader):
    """O_DIRECT reads (bypassing the page cache), or cache eviction where unsupported."""

    mode = "cold"

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.direct = _try_open_direct(self.path)

    def read(self, offset: int, length: int) -> memoryview:
        if self.direct is None:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return super().read(offset, length)
        start = offset - offset % PAGE
        span = -(-(offset + length - start) // PAGE) * PAGE
        buf = mmap.mmap(-1, span)  # anonymous maps are page-aligned, as O_DIRECT requires
        got = os.preadv(self.direct, [buf], start)
        if got < offset - start + length:
            raise StoreError(f"{self.path}: short read at offset {offset} ({max(0, got - (offset - start))} "
                             f"of {length} bytes): the file is truncated")
        return memoryview(buf)[offset - start:offset - start + length]

    def close(self) -> None:
        if getattr(self, "direct", None) is not None:
            os.close(self.direct)
            self.direct = None
        super().close()


def _try_open_direct(path: Path) -> int | None:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None
    try:  # some filesystems accept the flag at open and fail the read
        probe = mmap.mmap(-1, PAGE)
        os.preadv(fd, [probe], 0)
    except OSError:
        os.close(fd)
        return None
    return fd


class EmulatedReader(WarmReader):
    """Storage of a given bandwidth and per-request latency (eMMC, SD cards, boards),
    reproduced on any machine: the bytes come from the page cache, and each read returns
    no earlier than a device of that speed would have delivered it. The device is modelled
    as one queue: a read starts when the previous one has finished (or now, if idle)."""

    def __init__(self, path: str | Path, bandwidth: float, latency_s: float = 0.0):
        super().__init__(path)
        if not (math.isfinite(bandwidth) and bandwidth > 0) or not (math.isfinite(latency_s) and latency_s >= 0):
            raise StoreError(f"emulated storage needs a positive bandwidth and a latency >= 0, "
                             f"got {bandwidth} B/s and {latency_s} s")
        self.bandwidth, self.latency_s = bandwidth, latency_s
        self.mode = f"emulate:{bandwidth / 1e6:g}MB/s,{latency_s * 1e3:g}ms"
        self._free_at = 0.0
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> memoryview:
        with self._lock:
            start = max(time.perf_counter(), self._free_at)
            self._free_at = done = start + self.latency_s + length / self.bandwidth
        buf = super().read(offset, length)
        # Only sleep, never spin: a thread spinning in Python holds the GIL, and the compute
        # lane, which takes the GIL back after every torch op, waits out the spin each time
        # (benchmarks/bench_lanes.py: a 0.1 ms spin before every 0.5 ms sleep made a layer
        # 1.4x slower). A 0.3 ms sleep ends late by the timer slack plus the wake-up (100 us
        # here); a 1 ns slack cuts that to ~40 us. What is left is part of the emulated
        # device, and the device profile, which times these very reads, includes it.
        _fine_timer_slack()
        if (left := done - time.perf_counter()) > 0:
            time.sleep(left)
        return buf


_slack = threading.local()


def _fine_timer_slack() -> None:
    """Ask Linux, once per thread, to end this thread's sleeps within 1 ns of their deadline
    instead of the default 50 us (prctl PR_SET_TIMERSLACK; Python has no binding for it).
    Elsewhere, or if refused, sleeps keep the default slack."""
    if getattr(_slack, "done", False):
        return
    _slack.done = True
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # 29 = PR_SET_TIMERSLACK
        except (OSError, AttributeError):
            pass


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1 << 20, "gib": 1 << 30}


def parse_storage(spec: str) -> tuple[str, float, float]:
    """'cold' | 'warm' | 'emulate:BANDWIDTH[,LATENCY]' (e.g. 'emulate:100MB/s,1ms')
    -> (mode, bytes per second, latency in seconds)."""
    spec = spec.strip().lower()
    if spec in ("cold", "warm"):
        return spec, 0.0, 0.0
    if not spec.startswith("emulate:"):
        raise StoreError(f"unknown storage {spec!r}: use cold, warm or emulate:BANDWIDTH[,LATENCY] "
                         "(e.g. emulate:100MB/s,1ms)")
    bw_text, _, lat_text = spec[len("emulate:"):].partition(",")
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9+-]+)?)\s*([kmg]i?b|b)(?:/s)?\s*", bw_text)
    lat = re.fullmatch(r"\s*([0-9.]+(?:e[0-9+-]+)?)\s*(ms|us|s)?\s*", lat_text or "0ms")
    try:
        bandwidth = float(m.group(1)) * _UNITS[m.group(2)]
        latency = float(lat.group(1)) * {"ms": 1e-3, "us": 1e-6, "s": 1.0, None: 1e-3}[lat.group(2)]
    except (AttributeError, ValueError):
        raise StoreError(f"cannot read the emulated storage {spec!r}: write it like emulate:100MB/s,1ms") from None
    if not (math.isfinite(bandwidth) and 1e3 <= bandwidth <= 1e12 and math.isfinite(latency) and latency <= 10):
        raise StoreError(f"emulated storage {spec!r} is out of range (1 kB/s..1 TB/s, latency <= 10 s)")
    return "emulate", bandwidth, latency


def open_reader(path: str | Path, storage: str = "warm"):
    """A reader for the store file: storage is 'cold', 'warm' or 'emulate:BANDWIDTH[,LATENCY]'."""
    mode, bandwidth, latency = parse_storage(storage)
    if mode == "warm":
        return WarmReader(path)
    if mode == "cold":
        return ColdReader(path)
    return EmulatedReader(path, bandwidth, latency)
