"""Reading byte ranges of a store file: warm (page cache), cold (O_DIRECT).

Each read returns a new writable buffer that the caller owns (numpy and torch can wrap it
without copying). Cold reads use O_DIRECT with page-aligned offsets, lengths and buffers, so
they measure the storage device and not the page cache; where a filesystem refuses O_DIRECT
(tmpfs, some overlays) the reader falls back to evicting the file's pages before each read
(posix_fadvise DONTNEED), which is the next best way to read cold.
"""

from __future__ import annotations

import mmap
import os
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


def open_reader(path: str | Path, mode: str = "warm"):
    if mode == "warm":
        return WarmReader(path)
    if mode == "cold":
        return ColdReader(path)
    raise StoreError(f"unknown storage mode {mode!r}: use 'warm' or 'cold'")
