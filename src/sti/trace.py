"""Traces of one request: a Chrome trace (open it in Perfetto) and a timeline picture.

Both are drawn from the spans the engine records in its report: (lane, name, start_ms, end_ms)
with lane "io" (embedding rows, shard reads), "decode" (shard heads) or "compute" (layers,
waits).
"""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import atomic_write

LANES = {"io": 1, "decode": 2, "compute": 3}
ROWS = {"compute": 0, "decode": 1, "io": 2}  # rows of the timeline picture, bottom up
COLOURS = {"read": "#4c72b0", "decode": "#8172b2", "embedding": "#64b5cd",
           "layer": "#55a868", "wait": "#c44e52"}


def chrome_trace(report) -> dict:
    events = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": f"{lane} lane"}}
              for lane, tid in LANES.items()]
    for lane, name, start, end in report.spans:
        events.append({"name": name, "cat": lane, "ph": "X", "pid": 1, "tid": LANES.get(lane, 3),
                       "ts": round(start * 1e3, 1), "dur": round(max(0.0, end - start) * 1e3, 1)})
    events.append({"name": "deadline", "ph": "i", "s": "g", "pid": 1, "tid": LANES["compute"],
                   "ts": round(report.target_ms * 1e3, 1)})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"latency_ms": report.latency_ms, "target_ms": report.target_ms,
                          "planned_ms": report.planned_ms}}


def write_trace(report, path: str | Path) -> Path:
    """Write the request's Chrome trace JSON (atomically)."""
    data = json.dumps(chrome_trace(report))
    return atomic_write(path, lambda tmp: Path(tmp).write_text(data))


def _colour(name: str) -> str:
    for key, colour in COLOURS.items():
        if name.startswith(key):
            return colour
    return "#999999"


def draw_timeline(report, path: str | Path, title: str = "") -> Path:
    """Draw the IO (read), decode and compute lanes of one request as a PNG (atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(11, 3.2))
    for lane, name, start, end in report.spans:
        y = ROWS.get(lane, len(ROWS))
        ax.broken_barh([(start, max(end - start, 0.01))], (y - 0.35, 0.7), color=_colour(name),
                       edgecolor="white", linewidth=0.3)
    ax.axvline(report.target_ms, color="black", linestyle="--", linewidth=1)
    ax.text(report.target_ms, len(ROWS) - 0.45, f" T = {report.target_ms:.1f} ms", fontsize=8, va="center")
    ax.set_yticks(list(ROWS.values()), ["compute", "decode", "IO (read)"])
    ax.set_ylim(-0.6, len(ROWS) - 0.2)
    ax.set_xlabel("ms since the request arrived")
    ax.set_title(title or f"one request: {report.latency_ms:.1f} ms (planned {report.planned_ms:.1f} ms), "
                 f"stall {report.stall_ms:.1f} ms, {report.tokens} tokens", fontsize=9)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLOURS.items()], loc="upper left",
              fontsize=7, ncol=5, frameon=False, bbox_to_anchor=(0, -0.35))
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    plt.close(fig)
    return out
