"""The paper's planner (STI), made monotone.

Stage 1 takes the largest submodel whose compute fits T (most shards n*m first, ties to the
wider one). Stage 2 preloads its first layer at 6 bits, streams the rest at the lowest
bitwidth, and upgrades shards in order of importance (to 6 bits, then to 32) while every
accumulated IO budget stays >= 0, so the plan never stalls. Stage 2 depends on neither T nor
M, which is what makes the monotone pick below possible.
"""

from __future__ import annotations

import numpy as np

from .kernels import paper_upgrades
from .problem import Problem, aib_slack


def _bits(P: Problem) -> tuple[int, int]:
    """Preload bitwidth (6, or the highest <= 6) and the lowest streamed bitwidth."""
    low = [b for b in P.bits if b <= 6]
    return (max(low) if low else min(P.bits)), min(P.bits)


def _levels(P: Problem) -> list[int]:
    """The bitwidths a streamed shard goes through: the lowest, 6 bits, 32 bits."""
    pb, low = _bits(P)
    return [low] + [t for t in dict.fromkeys((pb, max(P.bits))) if t != low]


def _lowest_ok(P: Problem, n: int, m: int, low: int) -> bool:
    """Does the plan with every streamed shard at the lowest bitwidth stay stall-free?"""
    return all(s >= 0 for s in aib_slack(n - 1, P.compute[m], [m * P.io[low]] * (n - 1)))


def _stage2(P: Problem, n: int, m: int, pb: int, levels: list[int]):
    """STI's stage 2 for (n, m): first layer preloaded at pb, the rest streamed at the
    lowest bitwidth, then upgraded through `levels` in order of importance while every AIB
    stays >= 0. Returns (predicted accuracy, level index of each streamed shard)."""
    layers = P.layers(n)
    K = n - 1
    first = P.kappa * P.err[pb] * float(P.kl[layers[0], :m].sum())
    if K == 0:
        return P.acc[(n, m)] - first, np.zeros(0, dtype=np.int64)
    kl = P.kl[list(layers[1:]), :m].ravel()
    order = np.lexsort((np.arange(K * m), -kl))            # most important first, ties by position
    cur = paper_upgrades(order.astype(np.int64), np.repeat(np.arange(K), m).astype(np.int64),
                         np.array(aib_slack(K, P.compute[m], [m * P.io[levels[0]]] * K)),
                         np.array(levels, dtype=np.int64), np.array([P.io[b] for b in levels]),
                         np.arange(1, len(levels), dtype=np.int64))
    rest = P.kappa * float(kl @ np.array([P.err[b] for b in levels])[cur])
    return P.acc[(n, m)] - first - rest, cur


def _rows(P: Problem, n: int, m: int, pb: int, levels: list[int], cur) -> tuple[list, dict]:
    layers = P.layers(n)
    rows = [[pb] * m] + [[levels[c] for c in cur[k * m:(k + 1) * m]] for k in range(n - 1)]
    return rows, {(layers[0], j): pb for j in range(m)}


def eligible(P: Problem) -> list:
    """Stage 1's candidates in the paper's order, with what each needs: (n, m, accuracy,
    compute path ms, preload bytes). Only submodels whose all-lowest plan is stall-free can
    be planned at all."""
    pb, low = _bits(P)
    out = []
    for n, m, acc in sorted(P.candidates, key=lambda c: (-c[0] * c[1], -c[1], -c[0])):
        if _lowest_ok(P, n, m, low):
            out.append((n, m, acc, P.base(n, m), m * P.nbytes[pb]))   # buffer: the first layer at pb
    return out


def search(P: Problem, bounds: dict | None = None):
    """The paper's pick for (T, M), made monotone: the faithful pick is the first eligible
    submodel in stage-1 order; a smaller budget (T', M') may pick another submodel c (the
    first one eligible under its own compute and preload need), and if that one predicts a
    higher accuracy it is kept instead, so a larger T or M never lowers the accuracy.
    `bounds` (upper bounds on each (n, m)'s accuracy) only skips work.
    Returns (accuracy, n, m, rows, held) or None."""
    if P.buffer_bytes < 0:
        return None
    elig = [c for c in eligible(P) if c[3] <= P.target_ms and c[4] <= P.buffer_bytes]
    pb, _ = _bits(P)
    levels = _levels(P)
    bases = np.array([c[3] for c in elig])
    needs = np.array([c[4] for c in elig])
    best = None
    for i, (n, m, acc, base, need) in enumerate(elig):
        if best is not None and min(acc, (bounds or {}).get((n, m), acc)) <= best[0]:
            continue
        if np.any((bases[:i] <= base) & (needs[:i] <= need)):
            continue            # never the first pick at any budget
        value, cur = _stage2(P, n, m, pb, levels)
        if best is None or value > best[0]:
            best = (value, n, m, cur)
    if best is None:
        return None
    value, n, m, cur = best
    return (value, n, m) + _rows(P, n, m, pb, levels, cur)


def limits(P: Problem):
    """Smallest T for this M and smallest M for this T, each with a check that a rounded
    value still fits (same arithmetic as the search), or None."""
    elig = eligible(P)
    fixed = P.fixed_bytes
    t = [(base, (lambda x, b=base: b <= x)) for _, _, _, base, need in elig if need <= P.buffer_bytes]
    mm = [(need + fixed, (lambda x, nd=need: nd <= float(x - fixed))) for _, _, _, base, need in elig
          if base <= P.target_ms]
    return min(t, key=lambda w: w[0], default=None), min(mm, key=lambda w: w[0], default=None)
