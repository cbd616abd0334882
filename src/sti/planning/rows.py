"""Splitting M between resident embedding rows and preloaded shards.

A byte of M can hold a preloaded shard's weights (less to stream, so more or better shards
by T) or a cached embedding row (less to read before the first layer, which leaves the IO
lane that time for shards). Which buys more accuracy depends on T, M, the storage and the
requests, so the planner measures both sides the same way: for each candidate cache (the
word rows of the tokens in the most requests of a frequency sample, e.g. the training split,
and the first positions), its bytes
are counted as fixed, each length bucket's embedding read time is what that cache leaves to
read, the length-aware plans are made (lengths.py), and the candidate whose plans have the
best expected accuracy wins (no cache on a tie).

A bucket's read time assumes the 90th percentile of the sample's miss ratio (distinct word
rows not cached, per token): a request with more misses runs late by their reads, and the
deadline guard absorbs it. The frequencies are counted on other requests than the ones the
miss ratio is measured on (training split vs dev split), so the ratio is not the in-sample
one of the very requests the cache was chosen for.
"""

from __future__ import annotations

import math

import numpy as np

from ..rowcache import RowCache, most_frequent, token_counts
from .lengths import PlanSet, check_set, make_plan_set, plan_set_around
from .plan import PlanError

WORD_STEPS = (0, 256, 512, 1024, 2048)   # candidate numbers of cached word rows
# expected accuracy a new preload buffer must add, over plans around the kept one, for an
# engine whose device drifted to rebuild its buffer (a swap that reads the records it lacks)
NEW_BUFFER_GAIN = 0.002
MISS_QUANTILE = 90                        # percentile of the sample's miss ratio a plan assumes


def candidates(counts, max_tokens: int, hidden: int, room: float) -> list[RowCache]:
    """The caches to try: each number of the most frequent words (by `counts`, requests per
    token), with and without the first `max_tokens` positions, that fits in `room` bytes."""
    ranked = most_frequent(counts, max(WORD_STEPS))
    out = []
    for n in WORD_STEPS:
        words = ranked[:n]
        for positions in (0, max_tokens):
            cache = RowCache(words, positions, hidden)
            if (words or positions) and cache.nbytes <= room and cache not in out:
                out.append(cache)
    return out


def embed_times(device, cache: RowCache | None, token_lists, rows_per_block: int):
    """bucket length L -> the embedding read time a plan for L assumes under `cache`."""
    if cache is None:
        return lambda L: device.embed_rows_ms(L, L, rows_per_block)
    ratios = [len(cache.misses(ids)) / max(1, len(ids)) for ids in token_lists] or [1.0]
    q = float(np.percentile(ratios, MISS_QUANTILE))

    def at(L: int) -> float:
        return device.embed_rows_ms(L, math.ceil(q * L - 1e-9), rows_per_block, positions=cache.positions < L)
    return at


def make_plan_set_with_rows(device, importance, store_id: str, target_ms: float, memory_bytes: float,
                            token_lists, max_tokens: int, hidden: int, rows_per_block: int, fixed_bytes: int = 0,
                            headroom: float = 0.0, prune: bool = True, source: str = "",
                            counts=None) -> PlanSet:
    """Length-aware plans (lengths.py) with the best split of M between resident embedding
    rows and the preload buffer, for requests like `token_lists` (token ids of a sample).
    `counts` (requests per token, `rowcache.token_counts`) ranks the tokens to hold; by
    default the sample's own."""
    counts = token_counts(token_lists) if counts is None else counts
    best, first_error = None, None
    # no rows resident (an empty cache) is costed as the candidates are (the sample's misses),
    # so that only holding rows, not the cost model, tells them apart
    for cache in [RowCache(hidden=hidden), *candidates(counts, max_tokens, hidden, memory_bytes - fixed_bytes)]:
        try:
            other = plans_with(cache, device, importance, store_id, target_ms, memory_bytes, token_lists, max_tokens,
                               rows_per_block, fixed_bytes, headroom, prune, source)
        except PlanError as exc:
            if exc.min_target_ms is None and exc.min_memory_bytes is None:
                raise            # bad input, not a cache that leaves too little of M
            first_error = first_error or exc
            continue
        if best is None or score(other) > score(best):
            best = other
    if best is None:
        raise first_error
    check_set(best)
    return best


def plans_with(cache: RowCache | None, device, importance, store_id: str, target_ms: float, memory_bytes: float,
               token_lists, max_tokens: int, rows_per_block: int, fixed_bytes: int = 0, headroom: float = 0.0,
               prune: bool = True, source: str = "") -> PlanSet:
    """Length-aware plans around one row cache (None: no rows resident, every token's row
    read; an empty cache: the same, costed by the sample's distinct tokens): its bytes fixed,
    each bucket's embedding read what it leaves to read."""
    extra = cache.nbytes if cache is not None else 0
    out = make_plan_set(device, importance, store_id, target_ms, memory_bytes, [len(ids) for ids in token_lists],
                        max_tokens, fixed_bytes=fixed_bytes + extra, headroom=headroom, prune=prune, source=source,
                        embed_ms=embed_times(device, cache, token_lists, rows_per_block))
    return PlanSet(out.buckets, out.buffer, out.lengths, cache if extra else None)


def score(s: PlanSet) -> tuple[float, float]:
    return round(s.covered, 9), s.expected_accuracy


def replan_drifted(kept: PlanSet, device, importance, token_lists, rows_per_block: int, hidden: int,
                   headroom: float = 0.0, gain: float = NEW_BUFFER_GAIN) -> PlanSet:
    """Plans for an engine whose device drifted from its profile: each bucket streamed
    around `kept`'s preload buffer and rows (`plan_set_around`: nothing resident changes),
    or, when that loses more than `gain` of expected accuracy to plans that choose the
    buffer afresh around the same rows, those. The kept buffer was chosen for the old
    device: when the storage slows, a buffer holding more of what is now slow to stream
    buys accuracy back (the full-preset store, T = 1.5x, M = 2 MB, the storage 2x
    slower: 0.817-0.831 predicted around the kept buffer, 0.864-0.868 with a new one,
    benchmarks/bench_drift.py). `token_lists` are the sample's token ids the plans were
    costed on, `hidden` the model's width."""
    req = kept.first.request
    cache = kept.rows or RowCache(hidden=hidden)   # no rows held: costed as the plans were, by distinct tokens
    near = plan_set_around(kept, device, importance, headroom, embed_times(device, cache, token_lists, rows_per_block))
    rows_bytes = kept.rows.nbytes if kept.rows else 0
    try:
        fresh = plans_with(cache, device, importance, req.store_id, req.target_ms, req.memory_bytes, token_lists,
                           kept.buckets[-1].max_tokens, rows_per_block, req.fixed_bytes - rows_bytes, headroom,
                           req.prune, kept.lengths)
    except PlanError:
        return near
    return fresh if score(fresh) > (near.covered, near.expected_accuracy + gain) else near


def replan_around(kept: PlanSet, device, importance, token_lists, rows_per_block: int, hidden: int,
                  headroom: float = 0.0, new_buffer: bool = False) -> PlanSet:
    """How an engine whose device drifted plans again (`Engine.replan` with `kept`): each
    bucket streamed around the kept preload buffer and rows (`plan_set_around`, a few ms),
    unless `new_buffer` (the engine asks when the shard reads drifted) and `token_lists`
    (the sample the plans were costed on; None when they hold no rows) let
    `replan_drifted` choose the buffer afresh around the same rows (about 0.1 s more)."""
    if token_lists is None or not new_buffer:
        return plan_set_around(kept, device, importance, headroom)
    return replan_drifted(kept, device, importance, token_lists, rows_per_block, hidden, headroom)
