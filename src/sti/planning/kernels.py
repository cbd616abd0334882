"""The planners' inner loops, compiled with numba: each walks thousands of candidate moves
per submodel and updates the accumulated-IO-budget (AIB) slack of the layers after each one,
which in Python would dominate planning time.

Shared vocabulary: `sl[k]` is the AIB slack of executed layer k+1 (its IO budget k*C minus
the IO planned up to it); a move that adds `d` ms of IO to layer k fits when the smallest
slack from layer k on (`smin[k]`) is at least d, and then lowers every slack from k on.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _suffix_min(sl, smin):
    """smin[k] = min(sl[k:]), in place."""
    K = sl.shape[0]
    for k in range(K - 1, -1, -1):
        smin[k] = sl[k] if k == K - 1 or sl[k] < smin[k + 1] else smin[k + 1]


@numba.njit(cache=True, nogil=True)
def _spend(sl, smin, k, d):
    """Charge d ms of IO to layer k (and so to the AIB of every later layer)."""
    for j in range(k, sl.shape[0]):
        sl[j] -= d
    _suffix_min(sl, smin)


@numba.njit(cache=True, nogil=True)
def _fresh(sl, smin, C):
    """The slack of a plan with nothing streamed: layer k+1 may read (k+1)*C ms."""
    for k in range(sl.shape[0]):
        sl[k] = (k + 1) * C
    _suffix_min(sl, smin)


@numba.njit(cache=True, nogil=True)
def paper_upgrades(order, layer_of, sl, level_bits, level_io, targets):
    """STI's upgrade passes: for each target level, the shards in `order` (importance order)
    are raised to it when that keeps every AIB slack >= 0. Returns each shard's level."""
    cur = np.zeros(order.shape[0], np.int64)
    smin = np.empty(sl.shape[0])
    _suffix_min(sl, smin)
    for t in targets:
        for s in order:
            if level_bits[t] <= level_bits[cur[s]]:
                continue
            d = level_io[t] - level_io[cur[s]]
            k = layer_of[s]
            if smin[k] >= d:
                cur[s] = t
                _spend(sl, smin, k, d)
    return cur


@numba.njit(cache=True, nogil=True)
def first_fit(order, eff, frm, cost, n_path, loc_layer, K, C, fill_pos, fill_ids, switch_cost):
    """For each priced member g: every shard starts held (state -1); apply the moves in
    `order` (global move i = shard i // n_path to stream path position i % n_path) when they
    fit the AIB slack of their layer and of every later layer. Then shards still held try
    their cheapest improving switch to streaming. Returns the states (G, shards): -1 held,
    else the stream path position."""
    G, MV = order.shape
    state = np.full((G, loc_layer.shape[0]), -1, np.int64)
    sl, smin = np.empty(K), np.empty(K)
    for g in range(G):
        _fresh(sl, smin, C)
        for i in range(MV):
            idx = order[g, i]
            if eff[g, idx] == -np.inf:
                break
            s = idx // n_path
            if state[g, s] != frm[g, idx]:
                continue
            k = loc_layer[s]
            if smin[k] >= cost[g, idx]:
                state[g, s] = idx % n_path
                _spend(sl, smin, k, cost[g, idx])
        for i in range(fill_ids.shape[0]):
            s = fill_ids[i]
            t = fill_pos[g, s]
            if state[g, s] != -1 or t < 0:
                continue
            k = loc_layer[s]
            if smin[k] >= switch_cost[t]:
                state[g, s] = t
                _spend(sl, smin, k, switch_cost[t])
    return state


@numba.njit(cache=True, nogil=True)
def lp_gain(order, eff, frm, cost, gain, n_path, loc_layer, K, C):
    """The linear relaxation of the same problem, member by member: the moves in the same
    order, the first one that does not fit taken in part (up to the AIB slack left), which
    is optimal for a separable concave objective over these nested constraints. Returns
    the priced accuracy gained over holding every shard (G,): an upper bound."""
    G, MV = order.shape
    out = np.zeros(G)
    state = np.empty(loc_layer.shape[0], np.int64)
    sl, smin = np.empty(K), np.empty(K)
    for g in range(G):
        state[:] = -1
        _fresh(sl, smin, C)
        v = 0.0
        for i in range(MV):
            idx = order[g, i]
            if eff[g, idx] == -np.inf:
                break
            s = idx // n_path
            if state[s] != frm[g, idx]:
                continue
            k = loc_layer[s]
            d = cost[g, idx]
            take = d if smin[k] >= d else smin[k]
            if take <= 0.0 and d > 0.0:
                state[s] = -2                    # blocked: its constraint is full
                continue
            if take >= d:
                state[s] = idx % n_path
                v += gain[g, idx]
            else:
                state[s] = -2                    # taken in part: the shard stops here
                v += gain[g, idx] * (take / d)
            _spend(sl, smin, k, take)
        out[g] = v
    return out
