"""Upper bounds on the accuracy of any plan of a submodel, by Lagrangian duality. The joint
planner evaluates submodels best bound first and stops when no bound beats the best plan
found, so valid bounds make its search exact over its families (docs/PLANNER.md)."""

from __future__ import annotations

import math

import numpy as np

from .kernels import lp_gain
from .problem import Problem


ROUNDING = 1e-12   # relative slack for the rounding of a sum of priced terms


def grid_bounds(P: Problem, cands) -> dict:
    """A valid upper bound on the accuracy of any plan of each (n, m) candidate, by weak
    duality. Relax the AIBs of layers 1..n-1 to their sum ((n-1)*C of IO), keep layer 0's
    stall budget S0 apart, price IO at lam0 / lam1 per ms and preload at mu per byte: every
    shard then picks its best option alone, and the bound is the least over a grid of prices."""
    if not cands:
        return {}
    bits = list(P.bits)
    io = np.array([P.io[b] for b in bits])
    by = np.array([P.nbytes[b] for b in bits])
    er = np.array([P.err[b] for b in bits])
    kl = P.kl * P.kappa
    mean_kl = float(kl.mean()) or 1.0
    span_e = float(er.max() - er.min()) or 1.0
    lam0 = mean_kl * span_e / max(float(io.max() - io.min()), 1e-9)
    mu0 = mean_kl * span_e / max(float(by.max() - by.min()), 1e-9)
    scales = np.concatenate([[0.0], 2.0 ** np.arange(-6.0, 6.5, 0.5)])
    lams, mus = lam0 * scales, mu0 * scales
    g = -kl[:, :, None] * er                                                   # (N, S, b)
    stream = (g[None] - lams[:, None, None, None] * io).max(axis=3)            # (L, N, S)
    hold = (g[None] - mus[:, None, None, None] * by).max(axis=3)               # (U, N, S)
    cum = np.cumsum(np.maximum(stream[:, None], hold[None]), axis=3)           # (L, U, N, S)
    ns = np.array([c[0] for c in cands])
    ms = np.array([c[1] for c in cands])
    layers = [P.layers(n) for n in ns]
    first_layer = np.array([ls[0] for ls in layers])
    member = np.zeros((len(cands), P.n_layers))
    for k, ls in enumerate(layers):
        member[k, list(ls[1:])] = 1.0
    comp = np.array([P.compute[m] for m in ms])
    S0 = np.maximum(P.target_ms - (P.embed_ms + ns * comp + P.first_ms + P.head_ms), 0.0)
    first = np.empty((len(lams), len(mus), len(cands)))
    rest = np.empty_like(first)
    for m in np.unique(ms):                                  # (L, U, N) at width m, then per candidate
        k = np.flatnonzero(ms == m)
        at_m = cum[:, :, :, m - 1]
        first[:, :, k] = at_m[:, :, first_layer[k]]
        rest[:, :, k] = at_m @ member[k].T
    first += lams[:, None, None] * S0
    rest += lams[:, None, None] * ((ns - 1) * comp)
    # rounding: each sum above is off by at most ~1e-13 of the sum of its terms' sizes (a few
    # thousand float64 terms at most); at large prices that is more than the bound's final
    # 1e-9 slack (3e-7 in a case hypothesis found), so each grid point gets its own
    term = np.abs(g).max() + lams[:, None, None] * np.abs(io).max() + mus[None, :, None] * np.abs(by).max()
    first += ROUNDING * (ms * term + lams[:, None, None] * S0 + mus[None, :, None] * max(P.buffer_bytes, 0.0))
    rest += ROUNDING * ((ns - 1) * ms * term + lams[:, None, None] * ((ns - 1) * comp))
    acc = np.array([c[2] for c in cands])
    bound = (acc + first.min(axis=0) + rest.min(axis=0) + mus[:, None] * max(P.buffer_bytes, 0.0)).min(axis=0)
    bound = np.where(np.isnan(bound), np.inf, bound + 1e-9 * (1.0 + np.abs(bound)))
    return {(int(n), int(m)): float(b) for n, m, b in zip(ns, ms, bound)}


def lp_bound(P: Problem, pr, first, n: int, m: int, acc: float) -> float:
    """A tighter upper bound on any plan of (n, m): for each byte price mu, the linear
    relaxation of the priced problem (layer 0 under S0, the other layers under their AIBs)
    plus mu * (M - fixed); the least over the prices (Lagrangian duality on memory).
    `pr` is the joint planner's priced tables and `first` its family of (n, m)'s first layer."""
    layers = P.layers(n)
    S0 = P.target_ms - P.base(n, m)
    if S0 < 0 or P.buffer_bytes < 0:
        return -math.inf
    value = first.lp(S0) + pr.mus * P.buffer_bytes
    K = n - 1
    if K:
        ids = np.array([layer * P.n_shards + j for layer in layers[1:] for j in range(m)], dtype=np.int64)
        loc_layer = np.full(pr.NS, -1, dtype=np.int64)
        loc_layer[ids] = np.repeat(np.arange(K), m)
        value = value + pr.vpriced[:, ids].sum(axis=1) + lp_gain(
            pr.moves_of(ids), pr.eff, pr.frm, pr.cost, pr.gain, pr.n_path, loc_layer, K, float(P.compute[m]))
    b = acc + float(value.min())
    return b + 1e-9 * (1.0 + abs(b)) if not math.isnan(b) else math.inf
