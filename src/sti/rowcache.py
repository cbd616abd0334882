"""The resident cache of embedding rows: the frequent tokens' word rows, and the first
position rows, held in memory so that a request reads only the rows it misses.

Before its first layer can start, a request needs one word row per distinct token and one
position row per token. The store keeps the tables in 4 KiB pages (two fp32 rows of MiniLM
a page), so a 26-token request reads about 36 pages, and at 100 MB/s that is time taken
from the shards. Token frequencies are very skewed ([CLS], [SEP], "the", ",", "a", ... are
in nearly every request) and every request uses the same first positions, so a small
resident cache removes most of those reads.

Rows are held compact: int8 with one float32 scale per row (the row's largest magnitude /
127), so a MiniLM row takes 388 bytes instead of 1536, and a cache holds 4x the tokens for
its bytes. A cached row is within scale / 2 of the fp32 row in every element
(`ROW_BOUND`); a missed row is read from the store at fp32. Which rows to hold and how many
bytes of M they take is the planner's choice (planning/rows.py); this module counts
tokens, holds the rows and looks them up.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass

import torch

from .errors import InputError

SCALE_BYTES = 4     # one float32 scale per cached row
ROW_BOUND = 0.5     # |cached - fp32| <= ROW_BOUND * the row's scale, element by element


@dataclass(frozen=True)
class RowCache:
    """Which embedding rows are resident: word rows of `words` (most frequent first) and
    position rows 0..positions-1 (offset by the model's position offset)."""
    words: tuple[int, ...] = ()
    positions: int = 0
    hidden: int = 0

    @property
    def nbytes(self) -> int:
        return (len(self.words) + self.positions) * (self.hidden + SCALE_BYTES)

    def misses(self, ids) -> list[int]:
        """The distinct token ids of a request whose word rows are not resident, in order."""
        return [i for i in dict.fromkeys(int(x) for x in ids) if i not in self.held]

    @functools.cached_property
    def held(self) -> frozenset:
        return frozenset(self.words)

    def to_dict(self) -> dict:
        return {"words": list(self.words), "positions": self.positions, "hidden": self.hidden}


def token_counts(token_lists) -> collections.Counter:
    """How many requests hold each token (a token counts once per request: a request reads
    its row once)."""
    counts: collections.Counter = collections.Counter()
    for ids in token_lists:
        counts.update(set(int(i) for i in ids))
    return counts


def most_frequent(counts: collections.Counter, n: int) -> tuple[int, ...]:
    """The n tokens in the most requests (ties by token id, so the choice is reproducible)."""
    return tuple(t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n])


def compact(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rows [k, h] as int8 codes and one scale per row (largest magnitude / 127)."""
    scale = rows.abs().amax(1).clamp(min=1e-30) / 127.0
    codes = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale.float()


def expand(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale[:, None]


class ResidentRows:
    """A `RowCache`'s rows, read from the store once and held compact. `words(ids)` gives a
    request's word rows, reading only the misses from the store."""

    def __init__(self, store, cache: RowCache):
        c = store.config
        if (cache.words or cache.positions) and cache.hidden != c.hidden_size:
            raise InputError(f"the row cache was planned for hidden size {cache.hidden}, the store's is "
                             f"{c.hidden_size}: plan again for this store")
        if any(not 0 <= t < c.vocab_size for t in cache.words) or not 0 <= cache.positions <= c.max_tokens:
            raise InputError("the row cache names rows outside the store's tables: plan again for this store")
        self.cache, self.store = cache, store
        self.slot = {t: k for k, t in enumerate(cache.words)}  # token id -> row of the codes
        empty = torch.empty(0, c.hidden_size)
        words = store.table_rows("word", cache.words) if cache.words else empty
        off = c.position_offset
        positions = store.table_rows("position", range(off, off + cache.positions)) if cache.positions else empty
        self.word_codes, self.word_scale = compact(words)
        self.pos_codes, self.pos_scale = compact(positions)
        self.nbytes = cache.nbytes

    def words(self, ids: list[int]) -> tuple[torch.Tensor, int, list[int]]:
        """The word rows of `ids` [len(ids), h], the number of distinct hits, and the
        distinct misses (read from the store here)."""
        distinct = list(dict.fromkeys(ids))
        at = {t: k for k, t in enumerate(distinct)}
        rows = torch.empty(len(distinct), self.store.config.hidden_size)
        hits = [t for t in distinct if t in self.slot]
        misses = self.cache.misses(distinct)
        if hits:
            slots = torch.tensor([self.slot[t] for t in hits])
            rows[[at[t] for t in hits]] = expand(self.word_codes[slots], self.word_scale[slots])
        if misses:
            rows[[at[t] for t in misses]] = self.store.table_rows("word", misses)
        return rows[torch.tensor([at[t] for t in ids])], len(hits), misses

    def positions(self, width: int) -> torch.Tensor | None:
        """Position rows 0..width-1 if they are resident, else None (read them)."""
        if width > self.cache.positions:
            return None
        return expand(self.pos_codes[:width], self.pos_scale[:width])
