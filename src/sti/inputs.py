"""Requests for `sti run`: texts from the command line, a file or standard input, read one
at a time (an answer is printed before the next line is read), and the summary of the
answers given."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Iterator, NamedTuple

from .datafile import Columns, format_of, label_id, rows
from .errors import InputError
from .evaluate import percentile


class Request(NamedTuple):
    text: str
    pair: str | None = None
    label: object = None     # as written in the input (None: not labelled)
    where: str = ""          # "file:line", or "argument N"

    def fields(self) -> dict:
        """The request as it is echoed in JSON output."""
        return {"text": self.text, **({"text_pair": self.pair} if self.pair is not None else {})}


def requests(texts: list[str], pairs: list[str], input_file: Path | str | None,
             columns: Columns = Columns()) -> Iterator[Request]:
    """The texts given as arguments (with their `pairs`, one per text if any), then those of
    `input_file` ("-": standard input). Checked now; read lazily."""
    if not texts and input_file is None:
        raise InputError("give texts to classify, or --input FILE (- for standard input)")
    if pairs and len(pairs) != len(texts):
        raise InputError(f"{len(texts)} texts but {len(pairs)} --pair options: give one --pair per text")
    if input_file is not None and str(input_file) != "-" and not Path(input_file).is_file():
        raise InputError(f"--input {input_file}: no such file")
    if input_file is not None:
        format_of(input_file)  # an unknown format is refused now, not after the engine opens
    return _requests(texts, pairs, input_file, columns)


def _requests(texts, pairs, input_file, columns) -> Iterator[Request]:
    for i, text in enumerate(texts):
        yield Request(text, pairs[i] if pairs else None, None, f"argument {i + 1}")
    if input_file is not None:
        for row in rows(input_file, columns):
            yield Request(row.text, row.pair, row.label, row.where)


class Tally:
    """What the answers of a run add up to: latency, deadline hits, guard actions and, for
    requests that came with a label, accuracy."""

    def __init__(self, labels: tuple[str, ...]):
        self.labels = labels
        self.latencies: list[float] = []
        self.met = self.guarded = self.scored = self.correct = 0

    def add(self, req: Request, result) -> None:
        r = result.report
        self.latencies.append(r.latency_ms)
        self.met += r.met_deadline
        self.guarded += bool(r.guard_changes)
        if req.label is not None:
            self.scored += 1
            self.correct += self.labels[label_id(req.label, self.labels, req.where)] == result.label

    def summary(self) -> str:
        n = len(self.latencies)
        if not n:
            return "no answers"
        lat = self.latencies
        text = (f"{n} answers: latency median {statistics.median(lat):.1f} ms, p95 {percentile(lat, 95):.1f} ms; "
                f"{self.met / n:.1%} within T; deadline guard acted on {self.guarded / n:.1%}")
        if self.scored:
            text += f"; accuracy {self.correct / self.scored:.4f} over the {self.scored} labelled"
        return text
