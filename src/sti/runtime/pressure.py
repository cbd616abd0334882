"""Memory pressure: is the OS short of memory, so that the engine should give some back?

A phone's OS asks apps to shrink before it kills them; Linux says the same in two places:
  - pressure stall information (`/proc/pressure/memory`): the share of the last 10 s in
    which some task waited for memory (`some avg10`, in percent);
  - the cgroup v2 memory controller (`memory.events` of the process's cgroup): the `high`
    count grows each time the group went over `memory.high` and was throttled.
`MemoryPressure.pressed()` reads both (whichever exist) and answers True (pressed), False
(calm) or None (this system tells neither). The engine (`memory_pressure=...`) polls it
between requests, at most once a `poll_s`: under pressure it halves its preload budget (not
below the least that meets T), and after `calm_s` without pressure it doubles it again, up
to the budget it was opened with, each a replan and a swap like `Engine.resize`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

PSI = Path("/proc/pressure/memory")
SOME_AVG10 = 10.0     # percent of the last 10 s with a task stalled on memory: pressed


def cgroup_events() -> Path | None:
    """The memory.events file of this process's cgroup (v2), if there is one."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                path = Path("/sys/fs/cgroup") / line[3:].lstrip("/") / "memory.events"
                return path if path.is_file() else None
    except OSError:
        return None
    return None


class MemoryPressure:
    def __init__(self, psi: Path | None = PSI, events: Path | None = None, threshold: float = SOME_AVG10,
                 poll_s: float = 1.0, calm_s: float = 60.0, clock=time.monotonic):
        self.psi, self.events = psi, events if events is not None else cgroup_events()
        self.threshold, self.poll_s, self.calm_s, self.clock = threshold, poll_s, calm_s, clock
        self._high = self._high_count()
        self._polled = -float("inf")
        self.calm_since = clock()

    def pressed(self) -> bool | None:
        readings = [r for r in (self._psi(), self._throttled()) if r is not None]
        return any(readings) if readings else None

    def poll(self) -> str | None:
        """At most once a `poll_s`: "shrink" while pressed, "grow" after `calm_s` calm, else None."""
        now = self.clock()
        if now - self._polled < self.poll_s:
            return None
        self._polled = now
        pressed = self.pressed()
        if pressed:
            self.calm_since = now
            return "shrink"
        if pressed is False and now - self.calm_since >= self.calm_s:
            self.calm_since = now   # grow one step per calm period
            return "grow"
        return None

    def _psi(self) -> bool | None:
        avg10 = _number(self.psi, r"^some avg10=([0-9.]+)")
        return None if avg10 is None else avg10 >= self.threshold

    def _high_count(self) -> int | None:
        high = _number(self.events, r"^high (\d+)")
        return None if high is None else int(high)

    def _throttled(self) -> bool | None:
        high = self._high_count()
        if high is None:
            return None
        grew, self._high = self._high is not None and high > self._high, high
        return grew


def _number(path: Path | None, pattern: str) -> float | None:
    """The number `pattern`'s group matches in the file at `path` (None: no file, or no match)."""
    try:
        text = path.read_text() if path is not None else ""
    except OSError:
        return None
    m = re.search(pattern, text, re.M)
    return None if m is None else float(m.group(1))
