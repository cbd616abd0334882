"""The joint planner (ours): submodel, bitwidths and preload buffer chosen together.

It is exact about feasibility (every plan it returns is checked against the timeline) and
heuristic about optimality. To be monotone in T and M it never searches "for this budget":
for each submodel (n, m) it builds families of plans that do not depend on T or M, and
returns the best combination that fits. One family per part of the submodel:

  - the first executed layer, whose IO is a stall paid from S0 = T - compute path: members
    whose accuracy only grows (and whose bytes only shrink) with S0 (`Layer0`);
  - the other layers, whose IO must fit the accumulated IO budgets (which depend on
    neither T nor M): a fixed set of plans, each with its preload bytes (`Rest`).

A plan of (n, m) is one member of each, their bytes adding up to at most M - fixed_bytes.

The members come from Lagrangian pricing (`Priced`): charge mu per preloaded byte, and each
shard is either held at the bitwidth that is best for its importance at that price, or
streamed (costing IO). For each mu of a fixed grid, every shard starts held, then shards
switch to streaming and are upgraded, best accuracy gained per ms of IO first, while every
AIB stays >= 0 (first fit). A high mu keeps only the least important shards in memory, at
2 bits, to free IO for the important ones (the paper's buffer does the opposite); a low mu
holds more, at higher precision. Each member is then extended by upgrading its held
shards, best accuracy per byte first, which fills the bytes between one price and the next.

`Families` owns all of it for one problem; problems that differ only in T or M share it.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from .bounds import grid_bounds, lp_bound
from .kernels import first_fit
from .problem import Problem

def price_grid(P: Problem) -> np.ndarray:
    """Byte prices mu of the members: a geometric grid around the price at which holding a
    median shard at the cheapest bitwidth is worth the IO it frees, plus 0 (bytes are free)
    and a price so high that only what the AIBs force stays held (it outweighs any accuracy
    difference). Depends on the profiles only; every price is finite."""
    path = P.stream_path
    kl = P.kl * P.kappa
    top = float(kl.max()) * max(P.err.values()) or 1.0                 # largest penalty of a shard
    ref_kl = float(np.median(kl)) or float(kl.mean()) or 1.0
    if len(path) > 1 and path[1][1] > 0:
        lam = ref_kl * path[1][2] / path[1][1]
    else:
        lam = ref_kl * (max(P.err.values()) or 1.0) / max(max(P.io.values()), 1e-9)
    positive = [b for b in P.nbytes.values() if b > 0]
    smallest = max(min(positive), 1e-6) if positive else 1.0
    mu = lam * max(P.io[P.b_io], 1e-9) / max(P.nbytes[P.b_mem], smallest)
    mu = min(max(mu, 1e-200), 1e200)
    grid = mu * 2.0 ** np.arange(-8.0, 8.5, 0.5)
    high = max(grid[-1] * 2.0, 1e6 * top / smallest)
    return np.concatenate([[0.0], grid, [high]])


class Priced:
    """For every shard of the model (global id = layer * M + shard) and every byte price of
    the grid: the bitwidth it is held at, its first switch to streaming (the stream path
    position with the best accuracy per ms over holding), its upgrades along the stream
    path, each move's efficiency and IO cost, and all moves sorted best first (ties: the
    more important shard first). Also the upgrades of held shards along their hold path,
    sorted by accuracy per byte. Built once per request, shared by every (n, m)."""

    def __init__(self, P: Problem):
        mus = price_grid(P)
        G = len(mus)
        kl = P.kl.ravel()
        NS = len(kl)
        kap = P.kappa * kl
        self.hb = hb = sorted(P.bits, key=lambda b: (P.nbytes[b], P.err[b], b))   # hold options, cheapest first
        by_b = np.array([P.nbytes[b] for b in hb])
        e_b = np.array([P.err[b] for b in hb])
        path = P.stream_path
        self.tb = [b for b, _, _ in path]
        self.io_t = io_t = np.array([P.io[b] for b in self.tb])
        e_t = np.array([P.err[b] for b in self.tb])
        self.n_path = NP = len(path)
        vh_all = -kap[None, :, None] * e_b[None, None, :] - mus[:, None, None] * by_b[None, None, :]
        self.h = h = np.argmax(vh_all, axis=2)                             # (G, NS)
        self.vhold = -kap[None, :] * e_b[h]                                # true value when held
        self.hbytes = by_b[h]
        vh = np.take_along_axis(vh_all, h[:, :, None], axis=2)[:, :, 0]
        self.v_t = v_t = -kap[:, None] * e_t[None, :]                      # (NS, NP)
        diff = v_t[None] - vh[:, :, None]                                  # (G, NS, NP)
        valid = diff > 0
        d_io = np.diff(io_t)
        up = kap[:, None] * -np.diff(e_t)[None, :]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            slope = np.where(io_t > 0, diff / np.where(io_t > 0, io_t, 1.0), np.inf)
            ueff = np.where(d_io > 0, up / np.where(d_io > 0, d_io, 1.0), np.inf)
        slope = np.where(valid, slope, -np.inf)
        ueff = np.where(up > 0, ueff, -np.inf)
        has = valid.any(axis=2)
        first = np.where(has, np.argmax(slope, axis=2), -1)
        self.fill_pos = np.where(has, np.argmax(valid, axis=2), -1).astype(np.int64)
        t = np.arange(NP)[None, None, :]
        f = first[:, :, None]
        up_eff = np.concatenate([np.full((NS, 1), -np.inf), ueff], axis=1)[None]
        sw_eff = np.take_along_axis(slope, np.maximum(first, 0)[:, :, None], axis=2)
        eff = np.where(t == f, sw_eff, np.where((t > f) & (f >= 0), up_eff, -np.inf))
        self.eff = eff.reshape(G, NS * NP)
        up_gain = np.concatenate([np.zeros((NS, 1)), up], axis=1)[None]               # (1, NS, NP)
        sw_gain = np.take_along_axis(diff, np.maximum(first, 0)[:, :, None], axis=2)
        self.gain = np.where(t == f, sw_gain, up_gain).reshape(G, NS * NP)              # priced accuracy gained
        self.mus = mus
        self.vpriced = vh                                                  # priced value when held
        step_io = np.concatenate([[0.0], d_io])
        self.cost = np.where(t == f, io_t[None, None, :], step_io[None, None, :]).reshape(G, NS * NP)
        self.frm = np.where(t == f, -1, t - 1).reshape(G, NS * NP).astype(np.int64)
        tie = np.lexsort((np.arange(NS * NP), np.repeat(-kl, NP)))          # ties: more important first
        self.order = tie[np.argsort(-self.eff[:, tie], axis=1, kind="stable")]
        self.order_shard = self.order // NP
        self.G, self.NS, self.kl = G, NS, kl
        # held shards' upgrades along the hold path of their bitwidth
        paths = [P.hold_paths[b][1:] for b in hb]
        H = self.H = max(1, max(len(p) for p in paths))
        tab_by, tab_de = np.zeros((len(hb), H)), np.zeros((len(hb), H))
        tab_b = np.zeros((len(hb), H), dtype=np.int64)
        for i, p in enumerate(paths):
            for j, (b, dby, de) in enumerate(p):
                tab_by[i, j], tab_de[i, j], tab_b[i, j] = dby, de, b
        dby = tab_by[h]                                                    # (G, NS, H)
        dv = kap[None, :, None] * tab_de[h]
        with np.errstate(divide="ignore", invalid="ignore"):
            key = np.where(dby > 0, dv / np.where(dby > 0, dby, 1.0), np.inf)
        key = np.minimum.accumulate(key, axis=2)                           # a shard's steps in order
        ok = np.logical_and.accumulate(dv > 0, axis=2)
        key = np.where(ok, key, -np.inf).reshape(G, NS * H)
        xo = np.argsort(-key, axis=1, kind="stable")
        self.x_shard = xo // H
        self.x_ok = np.take_along_axis(ok.reshape(G, NS * H), xo, axis=1)
        self.x_dby = np.take_along_axis(dby.reshape(G, NS * H), xo, axis=1)
        self.x_dv = np.take_along_axis(dv.reshape(G, NS * H), xo, axis=1)
        self.x_b = np.take_along_axis(tab_b[h].reshape(G, NS * H), xo, axis=1)

    def moves_of(self, ids: np.ndarray) -> np.ndarray:
        """The sorted moves of shards `ids` only, per member (G, len(ids) * NP)."""
        inside = np.zeros(self.NS, dtype=bool)
        inside[ids] = True
        return self.order[inside[self.order_shard]].reshape(self.G, -1)

    def held_bits(self, g: int, s: int) -> int:
        return self.hb[self.h[g, s]]


class Families:
    """The joint planner's families for one problem's profiles and shapes, built when first
    asked for and kept: the priced tables, the first-layer family of each (layer, m), the
    other layers' family of each (layers, m), and the first-layer configurations of each m."""

    def __init__(self, P: Problem):
        self.P = P
        self._priced: Priced | None = None
        self._layer0: dict = {}
        self._rest: dict = {}
        self._configs: dict = {}

    @property
    def priced(self) -> "Priced":
        if self._priced is None:
            self._priced = Priced(self.P)
        return self._priced

    def layer0(self, layer: int, m: int) -> "Layer0":
        if (layer, m) not in self._layer0:
            self._layer0[(layer, m)] = Layer0(self, layer, m)
        return self._layer0[(layer, m)]

    def rest(self, layers: tuple, m: int) -> "Rest":
        if (layers, m) not in self._rest:
            self._rest[(layers, m)] = Rest(self, layers, m)
        return self._rest[(layers, m)]

    def configs(self, m: int) -> tuple:
        """First-layer configurations (p, b1, q, b2) of width m as four arrays (bitwidths as
        indices into P.bits): the p most important shards held at b1, the next q at a cheaper
        and less precise b2. The first entry holds nothing (everything streamed)."""
        if m not in self._configs:
            P = self.P
            by = np.array([P.nbytes[b] for b in P.bits])
            er = np.array([P.err[b] for b in P.bits])
            nb = len(P.bits)
            p, i1, q, i2 = (x.ravel() for x in np.meshgrid(np.arange(1, m + 1), np.arange(nb), np.arange(m),
                                                           np.arange(nb), indexing="ij"))
            keep = (p + q <= m) & (((q == 0) & (i2 == i1)) | ((q > 0) & (er[i2] > er[i1]) & (by[i2] < by[i1])))
            io_i = P.bits.index(P.b_io)
            self._configs[m] = tuple(np.concatenate([[first], x[keep]])
                                     for first, x in ((0, p), (io_i, i1), (0, q), (io_i, i2)))
        return self._configs[m]


class Layer0:
    """Plans of the first executed layer's m shards; each only gets better with a larger
    layer-0 stall budget S0, and none depends on T or M:
      - configurations: the p most important shards held at b1 and the next q at b2, the rest
        streamed at the cheapest bitwidth, then upgraded along a fixed path (best accuracy
        per ms first) as far as S0 allows;
      - priced members: for each byte price, every shard held at its best bitwidth for that
        price, then switched to streaming and upgraded along the member's sorted moves as
        far as S0 allows (switching frees bytes, so a larger S0 also needs less memory)."""

    def __init__(self, fam: "Families", layer: int, m: int):
        P = fam.P
        self.fam, self.layer, self.m = fam, layer, m
        self.cfg_p = None                    # the configurations are built when first needed
        # priced members: with no AIB to respect, every valid move applies, in order
        pr = self.pr = fam.priced
        self.ids = ids = layer * P.n_shards + np.arange(m)
        self.moves = mv = pr.moves_of(ids)
        G, NP = pr.G, pr.n_path
        rows = np.arange(G)[:, None]
        ok = pr.eff[rows, mv] > -np.inf
        s_of, t_of = mv // NP, mv % NP
        switch = pr.frm[rows, mv] == -1
        dv = np.where(switch, pr.v_t[s_of, t_of] - pr.vhold[rows, s_of],
                      pr.v_t[s_of, t_of] - pr.v_t[s_of, np.maximum(t_of - 1, 0)])
        dby = np.where(switch, -pr.hbytes[rows, s_of], 0.0)
        zero = np.zeros((G, 1))
        self.p_io = np.concatenate([zero, np.cumsum(np.where(ok, pr.cost[rows, mv], np.inf), axis=1)], axis=1)
        self.p_bytes = pr.hbytes[:, ids].sum(axis=1)[:, None] + np.concatenate(
            [zero, np.cumsum(np.where(ok, dby, 0.0), axis=1)], axis=1)
        self.p_value = pr.vhold[:, ids].sum(axis=1)[:, None] + np.concatenate(
            [zero, np.cumsum(np.where(ok, dv, 0.0), axis=1)], axis=1)

    def configs(self) -> "Layer0":
        if self.cfg_p is not None:
            return self
        P, layer, m = self.fam.P, self.layer, self.m
        kl = P.kl[layer, :m]
        self.order = order = np.lexsort((np.arange(m), -kl))             # shard id of each rank
        ks = kl[order]
        csum = np.concatenate([[0.0], np.cumsum(ks)])
        kappa = P.kappa
        bits = np.array(P.bits)
        by = np.array([P.nbytes[b] for b in P.bits])
        er = np.array([P.err[b] for b in P.bits])
        self.cfg_p, i1, self.cfg_q, i2 = self.fam.configs(m)
        self.cfg_b1, self.cfg_b2 = bits[i1], bits[i2]
        self.ncfg = len(self.cfg_p)
        self.r = self.cfg_p + self.cfg_q
        self.bytes = self.cfg_p * by[i1] + self.cfg_q * by[i2]
        self.held_value = -kappa * (er[i1] * csum[self.cfg_p] + er[i2] * (csum[self.r] - csum[self.cfg_p]))
        # the streamed rest (ranks r..m-1) upgraded along the stream path, best per ms first
        path = P.stream_path
        NP = len(path)
        rank, t = (x.ravel() for x in np.meshgrid(np.arange(m), np.arange(1, NP), indexing="ij"))
        dio = np.array([path[i][1] for i in range(NP)])[t]
        gain = kappa * ks[rank] * np.array([path[i][2] for i in range(NP)])[t]
        with np.errstate(divide="ignore", invalid="ignore"):
            eff = np.where(dio > 0, gain / np.where(dio > 0, dio, 1.0), np.inf)
        ok = gain > 0
        srt = np.lexsort((t[ok], rank[ok], -eff[ok]))
        self.mv_rank, self.mv_t = rank[ok][srt], t[ok][srt]
        kept = self.mv_rank[None, :] >= np.arange(m + 1)[:, None]           # (m+1, moves)
        zero = np.zeros((m + 1, 1))
        self.cum_io = np.concatenate([zero, np.cumsum(np.where(kept, dio[ok][srt], 0.0), axis=1)], axis=1)
        self.cum_gain = np.concatenate([zero, np.cumsum(np.where(kept, gain[ok][srt], 0.0), axis=1)], axis=1)
        io0, e0 = P.io[P.b_io], P.err[P.b_io]
        self.base_io = (m - np.arange(m + 1)) * io0
        self.base_val = -kappa * e0 * (csum[m] - csum)
        return self

    def query(self, S0: float):
        """(bytes, value, feasible, reference) of every member for stall budget S0."""
        self.configs()
        room = S0 - self.base_io
        cnt = (self.cum_io <= room[:, None]).sum(axis=1) - 1            # -1: the rest does not fit
        val = np.where(cnt >= 0, self.base_val + self.cum_gain[np.arange(self.m + 1), np.maximum(cnt, 0)], -np.inf)
        ok = cnt[self.r] >= 0
        steps = (self.p_io <= S0).sum(axis=1) - 1                       # longest prefix that fits
        rows = np.arange(len(steps))
        pb = self.p_bytes[rows, np.maximum(steps, 0)]
        pv = self.p_value[rows, np.maximum(steps, 0)]
        by = np.concatenate([self.bytes, pb])
        value = np.concatenate([self.held_value + val[self.r], np.where(steps >= 0, pv, -np.inf)])
        return by, value, np.concatenate([ok, steps >= 0]), (cnt, steps)

    def lp(self, S0: float) -> np.ndarray:
        """Per price: the best priced value of the layer's linear relaxation under stall
        budget S0 (the members' paths, the first move that does not fit taken in part)."""
        pr = self.pr
        priced = self.p_value - pr.mus[:, None] * self.p_bytes
        steps = (self.p_io <= S0).sum(axis=1) - 1
        rows = np.arange(len(steps))
        at = np.maximum(steps, 0)
        nxt = np.minimum(at + 1, self.p_io.shape[1] - 1)
        span = self.p_io[rows, nxt] - self.p_io[rows, at]
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where((nxt > at) & np.isfinite(span) & (span > 0), (S0 - self.p_io[rows, at]) / span, 0.0)
        value = priced[rows, at] + np.clip(frac, 0.0, 1.0) * (priced[rows, nxt] - priced[rows, at])
        return np.where(steps >= 0, value, -np.inf)

    def decide(self, P: Problem, a: int, ref) -> tuple[list, dict]:
        cnt, steps = ref
        layer, m = self.layer, self.m
        held = {}
        if a < self.ncfg:
            p, q, b1, b2 = int(self.cfg_p[a]), int(self.cfg_q[a]), int(self.cfg_b1[a]), int(self.cfg_b2[a])
            r = p + q
            row = [P.b_io] * m
            for rank, j in enumerate(self.order):
                if rank < r:
                    row[j] = b1 if rank < p else b2
                    held[(layer, int(j))] = row[j]
            for rank, t in zip(self.mv_rank[:cnt[r]], self.mv_t[:cnt[r]]):
                if rank >= r:
                    row[self.order[rank]] = P.stream_path[t][0]
            return row, held
        g = a - self.ncfg
        pr = self.pr
        state = [-1] * m
        for idx in self.moves[g, :steps[g]]:
            state[int(idx) // pr.n_path - layer * P.n_shards] = int(idx) % pr.n_path
        row = []
        for j in range(m):
            if state[j] < 0:
                held[(layer, j)] = pr.held_bits(g, layer * P.n_shards + j)
                row.append(held[(layer, j)])
            else:
                row.append(pr.tb[state[j]])
        return row, held


class Rest:
    """Plans of executed layers 1..n-1 (K layers of m shards), none depending on T or M: one
    priced member per byte price (first fit under the AIBs), each extended step by step by
    upgrading its held shards, best accuracy per byte first."""

    def __init__(self, fam: "Families", layers: tuple, m: int):
        P = fam.P
        self.layers, self.m, self.K = layers, m, len(layers)
        K = self.K
        if K == 0:
            self.empty, self.min_bytes = True, 0.0
            return
        self.empty = False
        pr = self.pr = fam.priced
        G, NP = pr.G, pr.n_path
        ids = self.ids = np.array([layer * P.n_shards + j for layer in layers for j in range(m)], dtype=np.int64)
        loc_layer = np.full(pr.NS, -1, dtype=np.int64)
        loc_layer[ids] = np.repeat(np.arange(K), m)
        fill_ids = ids[np.lexsort((np.arange(len(ids)), -pr.kl[ids]))]
        state = first_fit(pr.moves_of(ids), pr.eff, pr.frm, pr.cost, NP, loc_layer, K, float(P.compute[m]),
                           pr.fill_pos, fill_ids, pr.io_t)
        self.state = st = state[:, ids]                                    # (G, K*m)
        held = st < 0
        vstream = pr.v_t[ids[None, :], np.maximum(st, 0)]
        value = np.where(held, pr.vhold[:, ids], vstream).sum(axis=1)
        nbytes = np.where(held, pr.hbytes[:, ids], 0.0).sum(axis=1)
        self.min_bytes = float(nbytes.min())
        # extensions: each member's held shards upgraded, in the precomputed order
        held_all = np.zeros((G, pr.NS), dtype=bool)
        held_all[:, ids] = held
        rows = np.arange(G)[:, None]
        self.x_use = use = pr.x_ok & held_all[rows, pr.x_shard]
        cum_b = nbytes[:, None] + np.cumsum(np.where(use, pr.x_dby, 0.0), axis=1)
        cum_v = value[:, None] + np.cumsum(np.where(use, pr.x_dv, 0.0), axis=1)
        g_x, j_x = np.nonzero(use)
        self.el_bytes = np.concatenate([nbytes, cum_b[g_x, j_x]])
        self.el_value = np.concatenate([value, cum_v[g_x, j_x]])
        self.el_g = np.concatenate([np.arange(G), g_x])
        self.el_j = np.concatenate([np.full(G, -1), j_x])

    def elements(self, cap: float):
        """Members and extensions within `cap` bytes, sorted by bytes, with the running best
        value: (bytes, best value so far, element of that best), or None."""
        if self.empty:
            return np.zeros(1), np.zeros(1), np.zeros(1, dtype=np.int64)
        pick = np.flatnonzero(self.el_bytes <= cap)
        if pick.size == 0:
            return None
        pick = pick[np.argsort(self.el_bytes[pick], kind="stable")]
        val = self.el_value[pick]
        best = np.maximum.accumulate(val)
        at = np.maximum.accumulate(np.where(val >= best, np.arange(len(val)), 0))
        return self.el_bytes[pick], best, pick[at]

    def decide(self, P: Problem, el: int) -> tuple[list, dict]:
        if self.empty:
            return [], {}
        pr, m = self.pr, self.m
        g, j = int(self.el_g[el]), int(self.el_j[el])
        upgraded = {}
        if j >= 0:
            use = np.flatnonzero(self.x_use[g, :j + 1])
            for i in use:                           # in order: a shard's later step wins
                upgraded[int(pr.x_shard[g, i])] = int(pr.x_b[g, i])
        rows, held = [], {}
        for k, layer in enumerate(self.layers):
            row = []
            for jj in range(m):
                s = int(self.ids[k * m + jj])
                st = int(self.state[g, k * m + jj])
                if st < 0:
                    b = upgraded.get(s, pr.held_bits(g, s))
                    held[(layer, jj)] = b
                else:
                    b = pr.tb[st]
                row.append(b)
            rows.append(row)
        return rows, held


def candidate(P: Problem, fam: Families, n: int, m: int, acc: float):
    """Best plan of (n, m) within the families: (accuracy, rows, held) or None."""
    layers = P.layers(n)
    S0 = P.target_ms - P.base(n, m)
    if S0 < 0 or P.buffer_bytes < 0:
        return None
    f0 = fam.layer0(layers[0], m)
    b0, v0, ok0, ref0 = f0.query(S0)
    if not ok0.any():
        return None
    found = fam.rest(layers[1:], m).elements(P.buffer_bytes - float(b0[ok0].min()))
    if found is None:
        return None
    by1, best1, el1 = found
    idx = np.searchsorted(by1, P.buffer_bytes - b0, side="right") - 1
    ok = ok0 & (idx >= 0)
    if not ok.any():
        return None
    safe = np.maximum(idx, 0)
    total = np.where(ok, v0 + best1[safe], -np.inf)
    a = int(np.argmax(total))
    row0, held = f0.decide(P, a, ref0)
    rows, held1 = fam.rest(layers[1:], m).decide(P, int(el1[safe[a]]))
    held.update(held1)
    return acc + float(total[a]), [row0] + rows, held


def search(P: Problem, fam: Families, floor: float | None = None, bounds: dict | None = None):
    """Best family plan over every (n, m) whose compute fits T: (accuracy, n, m, rows, held).
    Best-first: a candidate is evaluated when its bound (the linear relaxation's, or the
    cheaper grid bound while that one is not computed) is the highest left; the search stops
    when no bound is above the best plan found (or above `floor`, the paper plan's accuracy).
    The bounds are valid, so the result is the best over all candidates, whatever the order."""
    cands = [c for c in P.candidates if P.base(c[0], c[1]) <= P.target_ms]
    if not cands or P.buffer_bytes < 0:
        return None
    if bounds is None:
        bounds = grid_bounds(P, cands)
    cands.sort(key=lambda c: (-bounds[(c[0], c[1])], c[0], c[1]))
    best = None
    bar = -math.inf if floor is None else floor
    pending = []                                  # (-lp bound, n, m, acc), highest first
    i = 0
    while True:
        unseen = bounds[(cands[i][0], cands[i][1])] if i < len(cands) else -math.inf
        top = -pending[0][0] if pending else -math.inf
        if max(top, unseen) <= bar:
            return best                           # no bound left above the best
        if top >= unseen:
            _, n, m, acc = heapq.heappop(pending)
            r = candidate(P, fam, n, m, acc)
            if r is not None and (best is None or r[0] > best[0]):
                best = (r[0], n, m, r[1], r[2])
                bar = max(bar, r[0])
        else:
            n, m, acc = cands[i]
            i += 1
            lp = lp_bound(P, fam.priced, fam.layer0(P.layers(n)[0], m), n, m, acc)
            if lp > bar:
                heapq.heappush(pending, (-lp, n, m, acc))


def limits(P: Problem, fam: Families):
    """Smallest T for this M and smallest M for this T within the joint planner's families
    (feasible wherever a paper plan is), each with a check that a rounded value fits, or None.
    The extremes are reached by the configurations that hold the fewest shards at the
    cheapest bitwidth (least memory) or stream the fewest (least layer-0 stall), next to the
    other layers' cheapest member."""
    t_best = m_best = None
    for n, m, acc in P.candidates:
        layers = P.layers(n)
        f0 = fam.layer0(layers[0], m).configs()
        need = fam.rest(layers[1:], m).min_bytes
        base = P.base(n, m)
        fits = need <= P.buffer_bytes - f0.bytes
        if fits.any():
            t = base + float(f0.base_io[f0.r[fits]].min())
            if t_best is None or t < t_best[0]:
                t_best = (t, n, m, acc)
        S0 = P.target_ms - base
        okr = f0.base_io[f0.r] <= S0
        if S0 >= 0 and okr.any():
            mm = float(f0.bytes[okr].min()) + need + P.fixed_bytes
            if m_best is None or mm < m_best[0]:
                m_best = (mm, n, m, acc)
    t_out = m_out = None
    if t_best is not None:
        t, n, m, acc = t_best
        t_out = (t, lambda x, n=n, m=m, acc=acc: candidate(P.with_budget(target_ms=x), fam, n, m, acc) is not None)
    if m_best is not None:
        mm, n, m, acc = m_best
        m_out = (mm, lambda x, n=n, m=m, acc=acc: candidate(P.with_budget(memory_bytes=x), fam, n, m, acc)
                 is not None)
    return t_out, m_out
