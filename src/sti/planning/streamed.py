"""The best streaming around a preload buffer that is already chosen.

Length-aware plans (lengths.py) share one preload buffer between the plans of every request
length, so a length's plan does not choose what to hold: a shard in the buffer is used at
the bitwidth it is held at, every other shard of the submodel is streamed. What is left to
choose is the submodel and the streamed bitwidths, under the execution model of
docs/PLANNER.md. With a fixed buffer the latency is the simulated timeline's,
max over k of (E + IO of executed layers 0..k + (n - k) * C) + head, so the plan meets T iff
for every k the IO of layers 0..k is at most S0 + k * C, where S0 = T - compute path (plus,
from layer 1 on, the first layer's extra cost in the engine, `first_layer_ms`). Unlike
the joint planner's own plans, these may wait for IO at any layer, not only the first: a
short request's layers compute too fast for IO to keep up, and it meets T by reading ahead
before (and while) it computes, which is what its spare time is for.
For each submodel every streamed shard starts at the cheapest bitwidth to stream and is
upgraded along the stream path, best accuracy per ms of IO first, an upgrade being taken
if the budgets still hold (first fit, as the joint planner fills its other layers).
"""

from __future__ import annotations

import math

from .problem import Problem


def around(P: Problem, held: dict) -> tuple | None:
    """The best (accuracy, n, m, rows, held used) with the buffer `held` ({(layer, shard):
    bits}), or None if no submodel fits T. Submodels are tried by their accuracy at full
    precision, which bounds any plan of theirs: the search stops below the best found."""
    best = None
    for n, m, acc in sorted(P.candidates, key=lambda c: (-c[2], c[0], c[1])):
        if best is not None and acc <= best[0]:
            break
        found = submodel(P, held, n, m, acc)
        if found is not None and (best is None or found[0] > best[0]):
            best = (found[0], n, m, found[1], found[2])
    return best


def submodel(P: Problem, held: dict, n: int, m: int, acc: float) -> tuple | None:
    """(accuracy, rows, held used) of the submodel (n, m) around `held`, or None."""
    S0 = P.target_ms - P.base(n, m)
    if S0 < 0:
        return None
    layers, path = P.layers(n), P.stream_path
    rows = [[path[0][0]] * m for _ in layers]
    io, used, moves = [0.0] * n, {}, []
    for k, layer in enumerate(layers):
        for j in range(m):
            if (layer, j) in held:
                rows[k][j] = used[(layer, j)] = held[(layer, j)]
                continue
            io[k] += P.io[path[0][0]]
            weight = P.kappa * float(P.kl[layer, j])
            for t in range(1, len(path)):
                gain, cost = weight * path[t][2], path[t][1]
                if gain > 0:
                    eff = math.inf if cost <= 0 else gain / cost
                    moves.append((-eff, -weight, k, j, t, cost))
    C = P.compute[m]
    if not fits(io, S0, C, P.first_ms):
        return None
    at = {}                                        # (k, j) -> position on the stream path
    for _, _, k, j, t, cost in sorted(moves):
        if at.get((k, j), 0) != t - 1:
            continue                               # an earlier step of this shard did not fit
        io[k] += cost
        if fits(io, S0, C, P.first_ms):
            at[(k, j)] = t
            rows[k][j] = path[t][0]
        else:
            io[k] -= cost
    penalty = sum(P.importance.shard_penalty(layer, j, row[j]) for layer, row in zip(layers, rows)
                  for j in range(m))
    return acc - penalty, rows, used


def fits(io: list[float], S0: float, C: float, first: float = 0.0) -> bool:
    """Does the timeline meet T: the IO of layers 0..k within S0 + k * C for every k (the
    first layer's extra cost `first`, in S0 already, gives the later layers' IO that long)?"""
    total = 0.0
    for k, x in enumerate(io):
        total += x
        if total > S0 + k * C + (first if k else 0.0):
            return False
    return True


def layer_io(P: Problem, layers, rows, held: dict) -> list[float]:
    """Streamed IO ms of each executed layer of a decision."""
    return [sum(P.io[b] for j, b in enumerate(row) if (layer, j) not in held) for layer, row in zip(layers, rows)]
