"""Who holds which bytes: the model bytes alive (our accounting, checked against what is
allocated), the process's peak RSS, and the windows that bound how far the IO side may run
ahead of the compute lane."""

from __future__ import annotations

import queue
import threading

import psutil
import torch

from ..groups import ATTN, FFN, ShardGroup, phase_elements


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


class GroupPool:
    """The engine's shard groups, handed from the decoder to the compute lane and back. A
    few slabs are allocated once; each serves as an attention group or an FFN group,
    whichever the decoder fills next (it fills them in the order the compute lane takes
    them), so what it decodes ahead is bounded by the slabs.

    The free slabs are a `queue.SimpleQueue` (C code, no Python-level lock): the compute
    lane gives a slab back after every group, about 50 times a request, and with a
    `threading.Condition` that hand-back was a quarter of the lane's Python time."""

    def __init__(self, slabs: int, sizes: tuple[int, int], config, dtype):
        self.sizes, self.dtype = tuple(sizes), dtype
        n = max(phase_elements(ATTN, sizes[0], config), phase_elements(FFN, sizes[1], config))
        self.slabs = [torch.empty(n, dtype=dtype) for _ in range(slabs)]
        scratch = torch.empty(config.hidden_size * max(config.head_dim, config.ffn_slice), dtype=dtype)
        self.views = [{phase: ShardGroup(phase, size, config, dtype, slab, scratch)
                       for phase, size in zip((ATTN, FFN), sizes)} for slab in self.slabs]
        self.slab_of = {id(g): i for i, views in enumerate(self.views) for g in views.values()}
        self.nbytes = sum(t.numel() * t.element_size() for t in [*self.slabs, scratch])
        self.cancelled = False
        self._fill()

    def _fill(self) -> None:
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(len(self.slabs)):
            self.free.put(i)

    def acquire(self, phase: str):
        """An empty group of `phase` on a free slab; None once the request is cancelled (the
        cancel stays: any later acquire gets None too, and a slab taken back is kept free)."""
        i = self.free.get()
        if i is None or self.cancelled:
            self.free.put(i)
            return None
        return self.views[i][phase]

    def release(self, group) -> None:
        group.clear()
        self.free.put(self.slab_of[id(group)])

    @property
    def in_use(self) -> int:
        """Slabs out of the pool (being filled, filled, or computed)."""
        return len(self.slabs) - (self.free.qsize() - self.cancelled)  # (a cancel leaves one None in)

    @property
    def all_free(self) -> bool:
        return self.in_use == 0

    def reset(self) -> None:
        """Every slab free and empty again (between requests: no lane is using the pool)."""
        for views in self.views:
            for g in views.values():
                g.clear()
        self.cancelled = False
        self._fill()

    def cancel(self) -> None:
        """Wake a decoder waiting for a slab: it gets None (and so does every later acquire,
        until `reset`)."""
        if not self.cancelled:
            self.cancelled = True
            self.free.put(None)
