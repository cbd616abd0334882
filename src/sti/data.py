"""The sentiment data: Hutto & Gilbert's (ICWSM 2014) human-rated snippets.

Four TSV files (id, mean rating in -4..+4, text; latin-1). A snippet is positive if its
rating is > 0 and negative if < 0; the few rated exactly 0 are dropped.

The Rotten Tomatoes movie snippets ("rt", the pool SST-2 was built from) are split into
train / dev / test, 80 / 10 / 10, stratified by label and deterministic: within each label
the snippets are ordered by sha256("sti-split-v1:" + id) and cut in that order. Dev is for
profiling and tuning; test is only for reporting. The tweets, Amazon and NYT snippets are
whole out-of-domain test sets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .assets import ensure_data
from .errors import DataError

FILES = {
    "rt": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
RT_SPLITS = {"train": (0.0, 0.8), "dev": (0.8, 0.9), "test": (0.9, 1.0)}
OOD_SETS = ("tweets", "amazon", "nyt")
SPLITS = tuple(RT_SPLITS) + OOD_SETS
LABELS = ("negative", "positive")


@dataclass(frozen=True)
class Example:
    id: str
    text: str
    label: int      # index into the model's labels (built-in data: 0 negative, 1 positive)
    rating: float | None = None   # the built-in data's mean human rating
    text_pair: str | None = None  # a sentence pair's second text


def parse_tsv(path: Path) -> list[Example]:
    """Read one ground-truth file, binarising the ratings and dropping zeros."""
    out = []
    raw = path.read_bytes().decode("latin-1")
    for lineno, line in enumerate(raw.splitlines(), 1):
        line = line.strip("\r\n")
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 3:
            raise DataError(f"{path.name}:{lineno}: expected id, rating, text separated by tabs")
        try:
            rating = float(cols[1])
        except ValueError:
            raise DataError(f"{path.name}:{lineno}: rating {cols[1]!r} is not a number") from None
        if rating == 0:
            continue
        out.append(Example(id=cols[0], text="\t".join(cols[2:]).strip(), label=int(rating > 0), rating=rating))
    return out


def _order_key(ex: Example) -> str:
    return hashlib.sha256(f"sti-split-v1:{ex.id}".encode()).hexdigest()


def split_rt(examples: list[Example]) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {name: [] for name in RT_SPLITS}
    for label in (0, 1):
        group = sorted((e for e in examples if e.label == label), key=_order_key)
        for name, (lo, hi) in RT_SPLITS.items():
            out[name] += group[round(lo * len(group)):round(hi * len(group))]
    for name in out:  # interleave labels deterministically
        out[name].sort(key=_order_key)
    return out


def load_split(name: str, root: Path | None = None) -> list[Example]:
    """One split: "train", "dev", "test" (Rotten Tomatoes) or "tweets", "amazon", "nyt"."""
    if name not in SPLITS:
        raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
    root = Path(root) if root is not None else ensure_data()
    if name in OOD_SETS:
        return parse_tsv(root / FILES[name])
    return split_rt(parse_tsv(root / FILES["rt"]))[name]


def summary(root: Path | None = None) -> list[dict]:
    """Size and label balance of every split."""
    rows = []
    for name in SPLITS:
        ex = load_split(name, root)
        pos = sum(e.label for e in ex)
        rows.append({"split": name, "size": len(ex), "positive": pos, "negative": len(ex) - pos,
                     "positive_share": pos / len(ex) if ex else 0.0})
    return rows
