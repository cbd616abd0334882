"""Reading untrusted JSON: plans, profiles and store manifests come from files a user may
have edited, truncated or crafted. One set of checks serves all three; each check raises the
caller's error type with a message naming where in the document the problem is."""

from __future__ import annotations

import json
import math
from pathlib import Path


def short(v) -> str:
    """A value as it may appear in an error message (never a whole document)."""
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number")


class Checks:
    """Typed reads of untrusted values; every failure raises `error(message)`."""

    def __init__(self, error: type[Exception]):
        self.error = error

    def parse(self, text: str | bytes, where: str, limit: int):
        """JSON text, refused if larger than `limit` bytes, malformed, or holding NaN/Infinity."""
        if len(text) > limit:
            raise self.error(f"{where}: larger than {limit >> 20} MiB, refusing to parse it")
        try:
            return json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, absurd numbers, deep nesting
            raise self.error(f"{where} is not valid JSON: {str(exc)[:200]}") from None

    def read(self, path: Path, limit: int, missing: str):
        """A JSON file; `missing` is the message when there is no file."""
        if not path.is_file():
            raise self.error(missing)
        if path.stat().st_size > limit:
            raise self.error(f"{path}: larger than {limit >> 20} MiB, refusing to parse it")
        return self.parse(path.read_bytes(), str(path), limit)

    def obj(self, v, where: str) -> dict:
        if not isinstance(v, dict):
            raise self.error(f"{where}: expected a JSON object, got {short(v)}")
        return v

    def key(self, d, key: str, where: str):
        """d[key], refused when d is not an object or has no such key."""
        if key not in self.obj(d, where):
            raise self.error(f"{where}: missing field {key!r}")
        return d[key]

    def exact_keys(self, d, names, where: str) -> dict:
        """The object must hold exactly these fields."""
        have, want = set(self.obj(d, where)), set(names)
        if have - want:
            raise self.error(f"{where}: unknown field(s) {', '.join(sorted(have - want)[:5])}")
        if want - have:
            raise self.error(f"{where}: missing field(s) {', '.join(sorted(want - have))}")
        return d

    def typed(self, v, kind, where: str):
        """v of type `kind` (bool is not an int)."""
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise self.error(f"{where}: expected {getattr(kind, '__name__', kind)}, got {short(v)}")
        return v

    def int(self, v, where: str, lo: int, hi: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.error(f"{where}: expected an integer in {lo}..{hi}, got {short(v)}")
        return v

    def num(self, v, where: str, lo: float, hi: float) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise self.error(f"{where}: expected a finite number in {lo:g}..{hi:g}, got {short(v)}")
        return float(v)

    def flag(self, v, where: str) -> bool:
        if not isinstance(v, bool):
            raise self.error(f"{where}: expected true or false, got {short(v)}")
        return v

    def text(self, v, where: str, max_len: int = 256, min_len: int = 0) -> str:
        if not isinstance(v, str) or not min_len <= len(v) <= max_len:
            raise self.error(f"{where}: expected a string of {min_len}..{max_len} characters, got {short(v)}")
        return v

    def hex16(self, v, where: str) -> str:
        if not isinstance(v, str) or len(v) != 16 or any(c not in "0123456789abcdef" for c in v):
            raise self.error(f"{where}: expected 16 lowercase hex digits, got {short(v)}")
        return v

    def list(self, v, where: str, max_len: int = 4096) -> list:
        if not isinstance(v, list) or len(v) > max_len:
            raise self.error(f"{where}: expected a list of at most {max_len} items")
        return v

    def int_list(self, v, where: str, lo: int, hi: int, max_len: int = 4096) -> tuple[int, ...]:
        return tuple(self.int(x, where, lo, hi) for x in self.list(v, where, max_len))

    def num_list(self, v, where: str, lo: float, hi: float, max_len: int = 4096) -> tuple[float, ...]:
        return tuple(self.num(x, where, lo, hi) for x in self.list(v, where, max_len))
