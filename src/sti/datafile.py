"""Your own data: one reader for TSV, CSV and JSONL files.

A file holds one example per row: a text, optionally a second text (a sentence pair, as in
GLUE's MRPC, QQP, MNLI, RTE) and, for measuring and training, a label.

- **TSV** (`.tsv`) and **CSV** (`.csv`): the first line names the columns. TSV fields are
  split on tabs and never quoted (GLUE's files hold texts with bare quotes); CSV follows
  RFC 4180 (quoted fields may hold commas, quotes and line breaks).
- **JSONL** (`.jsonl`, `.ndjson`): one JSON object per line.
- **Lines** (`.txt`, or standard input): one text per line, no labels; a first line that
  starts with `{` makes the whole stream JSONL instead.

Columns are given by name or found by their usual names: the text in `text` (or
`sentence`, `sentence1`, `question1`, `premise`, `text_a`), the second text in `text_pair`
(or `sentence2`, `question2`, `hypothesis`, `text_b`), the label in `label` (or `labels`,
`gold_label`, `target`). A label is the name of one of the model's labels (its `id2label`)
or that label's integer id. An empty second text means "no pair" (CSV cannot say null).
Files are UTF-8 (a byte-order mark is skipped) and read a line at a time, so a large file
is never held whole. Every problem is a `DataError` naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator

from .assets import sha256_file
from .data import Example
from .errors import DataError

TEXT_NAMES = ("text", "sentence", "sentence1", "question1", "premise", "text_a")
PAIR_NAMES = ("text_pair", "sentence2", "question2", "hypothesis", "text_b")
LABEL_NAMES = ("label", "labels", "gold_label", "target")
FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "lines"}
STDIN = "-"


@dataclass(frozen=True)
class Columns:
    """Column (or JSON field) names; None: found by the usual names."""
    text: str | None = None
    pair: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class Row:
    """One row as read: where it was, its text(s), its label as written (None: none)."""
    where: str          # "file:line"
    text: str
    pair: str | None
    label: object


@dataclass(frozen=True)
class DataSource:
    """Which file a measurement came from (recorded in profiles and results)."""
    path: str
    sha256: str
    size: int           # bytes
    examples: int
    columns: Columns = Columns()   # the column names given (None: found by the usual names)

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "size": self.size, "examples": self.examples,
                "columns": {"text": self.columns.text, "pair": self.columns.pair, "label": self.columns.label}}


def format_of(path: str | Path) -> str:
    """The format a file's name says (standard input: lines or JSONL, by its first line)."""
    if str(path) == STDIN:
        return "lines"
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown data format {Path(path).suffix or '(no extension)'!r}: name the file "
                        f".tsv, .csv or .jsonl (or .txt for one text per line)")
    return fmt


def rows(path: str | Path, columns: Columns = Columns(), stream: IO[bytes] | None = None) -> Iterator[Row]:
    """The rows of a data file (`-`: standard input), one at a time."""
    fmt = format_of(path)
    name = "<stdin>" if str(path) == STDIN else str(path)
    if stream is not None or str(path) == STDIN:  # a stream given, or standard input: not ours to close
        yield from _rows(fmt, name, _lines(stream or sys.stdin.buffer, name), columns)
        return
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror})") from None
    with f:
        yield from _rows(fmt, name, _lines(f, name), columns)


def _rows(fmt: str, name: str, lines: Iterator[tuple[int, str]], columns: Columns) -> Iterator[Row]:
    if fmt == "lines":  # the first line that is not blank says whether this is JSONL
        blank = []
        first = next(lines, None)
        while first is not None and not first[1].strip():
            blank.append(first)
            first = next(lines, None)
        if first is None:
            return
        lines = itertools.chain(blank, [first], lines)
        fmt = "jsonl" if first[1].lstrip().startswith("{") else "lines"
    if fmt == "lines":
        yield from _plain_rows(name, lines)
    elif fmt == "jsonl":
        yield from _json_rows(name, lines, columns)
    else:
        yield from _table_rows(name, lines, columns, fmt)


def _lines(stream: IO[bytes], name: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded as UTF-8 one line at a time."""
    for number, raw in enumerate(stream, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{name}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line): "
                            "save the file as UTF-8") from None
        if number == 1:
            line = line.removeprefix("\ufeff")
        yield number, line


def _plain_rows(name: str, lines) -> Iterator[Row]:
    for number, line in lines:
        text = line.rstrip("\r\n")
        if text.strip():  # blank lines are skipped: there is nothing to classify
            yield Row(f"{name}:{number}", text, None, None)


def _json_rows(name: str, lines, columns: Columns) -> Iterator[Row]:
    for number, line in lines:
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}): write one object per "
                            "line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with a text field, got {type(obj).__name__}")
        text_key = _pick(columns.text, TEXT_NAMES, obj, where, "text", required=True)
        pair_key = _pick(columns.pair, PAIR_NAMES, obj, where, "second text")
        label_key = _pick(columns.label, LABEL_NAMES, obj, where, "label")
        text = _text(obj[text_key], where, text_key)
        pair = _pair(obj.get(pair_key) if pair_key else None, where, pair_key)
        label = obj.get(label_key) if label_key else None
        yield Row(where, text, pair, label)


def _table_rows(name: str, lines, columns: Columns, fmt: str) -> Iterator[Row]:
    last = [0]  # the line number the csv reader has read up to (a record may span lines)

    def tracked():
        for number, line in lines:
            last[0] = number
            yield line

    kw = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
    reader = csv.reader(tracked(), **kw)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{name}: the file is empty: its first line names the columns (text, label)")
        header = [h.strip() for h in header]
        where = f"{name}:1"
        fields = dict.fromkeys(header)
        text_col = _pick(columns.text, TEXT_NAMES, fields, where, "text", required=True, header=True)
        pair_col = _pick(columns.pair, PAIR_NAMES, fields, where, "second text", header=True)
        label_col = _pick(columns.label, LABEL_NAMES, fields, where, "label", header=True)
        index = {h: i for i, h in enumerate(header)}
        for cells in reader:
            where = f"{name}:{last[0]}"
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                sep = "tabs" if fmt == "tsv" else "commas"
                raise DataError(f"{where}: {len(cells)} fields, but the header names {len(header)} (separated by "
                                f"{sep}){': quote fields that hold commas' if fmt == 'csv' else ''}")
            text = _text(cells[index[text_col]], where, text_col)
            pair = _pair(cells[index[pair_col]] if pair_col else None, where, pair_col)
            label = cells[index[label_col]].strip() if label_col else None
            yield Row(where, text, pair, label)
    except csv.Error as exc:
        raise DataError(f"{name}:{last[0] or 1}: malformed {fmt.upper()} ({exc})") from None


def _pick(given: str | None, usual: tuple[str, ...], fields: dict, where: str, what: str,
          required: bool = False, header: bool = False) -> str | None:
    """The name of the column (or field) holding `what`: the given one, which must be there,
    or the first of the usual names that is."""
    found = ", ".join(repr(f) for f in list(fields)[:12]) or "none"
    if given is not None:
        if given not in fields:
            raise DataError(f"{where}: no {'column' if header else 'field'} {given!r} (the {what}); "
                            f"{'the header names' if header else 'the object has'} {found}")
        return given
    hit = next((n for n in usual if n in fields), None)
    if hit is None and required:
        raise DataError(f"{where}: no {what} {'column' if header else 'field'}: expected one named "
                        f"{', '.join(usual[:3])}, ... ({'the header names' if header else 'the object has'} "
                        f"{found}); name it with --text-column")
    return hit


def _text(value, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {column!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: the text ({column!r}) is empty: every row needs some words to classify")
    return value


def _pair(value, where: str, column: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: {column!r} must be a string or null, got {type(value).__name__}")
    return value if value.strip() else None


# --- labels ----------------------------------------------------------------------------------
def label_id(raw, labels: tuple[str, ...], where: str) -> int:
    """The index of a label written as one of `labels` or as an integer id."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise DataError(f"{where}: no label (no label column, or an empty one): every row of a file to "
                        f"measure or train on needs one of {', '.join(labels)}")
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise DataError(f"{where}: label {raw!r} must be a name or an integer id")
    if isinstance(raw, str):
        raw = raw.strip()
        if raw in labels:
            return labels.index(raw)
        folded = [name.casefold() for name in labels]
        if raw.casefold() in folded and folded.count(raw.casefold()) == 1:
            return folded.index(raw.casefold())
        try:
            raw = int(raw)
        except ValueError:
            raise DataError(f"{where}: unknown label {raw!r}: the model's labels are {', '.join(labels)} "
                            f"(or their ids 0..{len(labels) - 1})") from None
    if not 0 <= raw < len(labels):
        raise DataError(f"{where}: label id {raw} is outside 0..{len(labels) - 1} (the model's labels: "
                        f"{', '.join(labels)})")
    return raw


def label_names(raw_labels: Iterable) -> tuple[str, ...]:
    """Label names for a task known only from its data: integer ids in order (named by the
    integers) or the distinct names sorted."""
    seen = {str(r).strip() for r in raw_labels if r is not None and str(r).strip()}
    if len(seen) < 2:
        raise DataError(f"the training data holds {len(seen)} distinct label(s) ({', '.join(sorted(seen))}): a "
                        "classifier needs at least two")
    if all(s.lstrip("-").isdigit() for s in seen):
        ids = sorted(int(s) for s in seen)
        if ids != list(range(len(ids))):
            raise DataError(f"integer labels must be 0..{len(ids) - 1}, got {ids[:10]}: name them with --labels")
        return tuple(str(i) for i in ids)
    return tuple(sorted(seen))


# --- whole files -----------------------------------------------------------------------------
def read_examples(path: str | Path, labels: tuple[str, ...], columns: Columns = Columns(),
                  limit: int | None = None) -> list[Example]:
    """The labelled examples of a data file, labels mapped onto `labels` (the model's)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer, got {limit!r}")
    out = []
    for row in rows(path, columns):
        out.append(Example(id=row.where, text=row.text, label=label_id(row.label, labels, row.where),
                           text_pair=row.pair))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no examples (only a header or blank lines)")
    return out


def source_of(path: str | Path, examples: int, columns: Columns = Columns()) -> DataSource:
    if str(path) == STDIN:
        raise DataError("this needs a data file, not standard input: the file's sha256 is recorded with what is "
                        "measured on it")
    p = Path(path)
    return DataSource(path=str(p.resolve()), sha256=sha256_file(p), size=p.stat().st_size, examples=examples,
                      columns=columns)


def text_stream(text: str) -> IO[bytes]:
    """A string as the byte stream `rows` reads (for tests and the API)."""
    return io.BytesIO(text.encode("utf-8"))
