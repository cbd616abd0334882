"""The runtime: execute a plan on real storage and answer by the deadline.

    engine.py    the Engine: resident parts, the three lanes of a request
    request.py   one request in flight: clock, hand-off between lanes, report
    guards.py    the deadline guards as pure functions of (schedule, clock, pace)
    schedule.py  a plan as the engine walks it (steps in IO order, due times)
    memory.py    model-bytes accounting, peak RSS, the read-ahead windows
    report.py    what a request returns: the answer and how it was reached
    follow.py    following the device: each lane's drift from the profile, the rescaled profile
    pressure.py  memory pressure (Linux PSI, cgroup events): when to shrink the preload buffer
"""

from .engine import Engine
from .report import LayerReport, Report, Result
from .schedule import Schedule, Step, schedule

__all__ = ["Engine", "LayerReport", "Report", "Result", "Schedule", "Step", "schedule"]
