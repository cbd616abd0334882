"""Writing a file so that readers see the old one or the whole new one, never half of it:
write a temporary file beside it, then rename it over (a rename within a directory is
atomic). Used by every file sti writes outside a store (profiles, results, traces, plots)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write(tmp)` to fill a temporary file beside `path`, then rename it to `path`;
    on any error (or Ctrl-C) the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def atomic_write_json(obj, path: str | Path, default: Callable | None = None) -> Path:
    """`obj` as indented JSON at `path`, atomically; `default` as in `json.dump`."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, default=default)
    return atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`text` (UTF-8) at `path`, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
