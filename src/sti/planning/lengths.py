"""Length-aware plans: one preload buffer, and a streamed plan for each request length.

A layer's compute grows with the request's length, so a plan sized for a long request
leaves a short one's time unused (the median test request has 26 tokens, a plan for 48
finishes it in two thirds of T). A `PlanSet` holds one plan per length bucket (requests of
up to 8, 16, 24, ... tokens), each the best for its bucket's longest request under T, and
all sharing one preload buffer: the buffer is resident across requests, so it cannot change
with each request's length. The engine picks the plan from the tokenized length; nothing
is planned on the request path.

The buffer is chosen for a distribution of request lengths (by default the built-in dev
split's, see api.py): each bucket's own best plan proposes its buffer; around each
proposal every bucket is planned again (streamed.py, and each bucket plan that holds the
same buffer, checked at this length), and the proposal with the best expected accuracy over
the distribution wins. A bucket no plan fits (too long for T) runs the plan of the nearest
shorter bucket that has one, and the deadline guard cuts what does not fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from ..profiles import DeviceProfile, ImportanceProfile
from ..rowcache import RowCache
from ..untrusted import short
from .make import make_plan
from .plan import CHECK, MAX_PLAN_JSON, Plan, PlanError
from .problem import Problem, arg_float, assemble
from .streamed import around, fits, layer_io

PLAN_SET_VERSION = 2         # 2: the resident embedding rows (`rows`)
BUCKET_TOKENS = 8            # width of a length bucket
MAX_BUCKETS = 512


@dataclass(frozen=True)
class Bucket:
    """Requests of more than the previous bucket's `max_tokens`, up to this one's."""
    max_tokens: int
    weight: float            # share of the planned-for length distribution in this bucket
    plan: Plan | None        # None: no plan fits so long a request (the nearest shorter bucket's runs)


@dataclass(frozen=True)
class PlanSet:
    buckets: tuple[Bucket, ...]
    buffer: tuple[tuple[int, int, int], ...]   # (layer, shard, bits) every plan may use, sorted
    lengths: str = ""                          # where the length distribution came from
    rows: RowCache | None = None               # embedding rows held resident (rowcache.py), in fixed_bytes

    @staticmethod
    def single(plan: Plan) -> "PlanSet":
        """One plan for every length (the paper planner's, or a plan for one `seq_len`)."""
        return PlanSet((Bucket(plan.request.seq_len, 1.0, plan),), plan.choice.preload, "one plan for every length")

    def index_for(self, tokens: int) -> int:
        """The bucket whose plan serves a request of `tokens` tokens (the last one for longer
        requests; a bucket without a plan hands on to the nearest shorter one with a plan,
        else the nearest longer one)."""
        i = next((i for i, b in enumerate(self.buckets) if tokens <= b.max_tokens), len(self.buckets) - 1)
        shorter = [j for j in range(i, -1, -1) if self.buckets[j].plan is not None]
        return shorter[0] if shorter else next(j for j, b in enumerate(self.buckets) if b.plan is not None)

    def plan_for(self, tokens: int) -> Plan:
        return self.buckets[self.index_for(tokens)].plan

    @property
    def plans(self) -> tuple[Plan, ...]:
        return tuple(b.plan for b in self.buckets if b.plan is not None)

    @property
    def first(self) -> Plan:
        return self.plans[0]

    @property
    def expected_accuracy(self) -> float:
        """Predicted accuracy over the length distribution (a bucket without a plan counted
        at the plan that serves it, which the deadline guard will cut: optimistic there)."""
        total = sum(b.weight for b in self.buckets) or 1.0
        return sum(b.weight * self.plan_for(b.max_tokens).predicted.accuracy for b in self.buckets) / total

    @property
    def covered(self) -> float:
        """Share of the length distribution whose bucket has a plan of its own."""
        total = sum(b.weight for b in self.buckets) or 1.0
        return sum(b.weight for b in self.buckets if b.plan is not None) / total

    def to_dict(self) -> dict:
        return {"kind": "plan_set", "version": PLAN_SET_VERSION, "lengths": self.lengths,
                "buffer": [list(e) for e in self.buffer], "rows": None if self.rows is None else self.rows.to_dict(),
                "buckets": [{"max_tokens": b.max_tokens, "weight": b.weight,
                             "plan": None if b.plan is None else b.plan.to_dict()} for b in self.buckets]}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @staticmethod
    def from_json(text: str | bytes) -> "PlanSet":
        return PlanSet.from_dict(CHECK.parse(text, "plan set", MAX_PLAN_JSON))

    @staticmethod
    def from_dict(d) -> "PlanSet":
        """Validate an untrusted plan set: every plan valid, of one request, within the buffer."""
        w = "plan set"
        CHECK.obj(d, w)
        if d.get("kind") != "plan_set":
            raise PlanError(f"{w}: not a plan set (kind={short(d.get('kind'))})")
        if d.get("version") != PLAN_SET_VERSION:
            raise PlanError(f"{w}: version {short(d.get('version'))}, this sti reads {PLAN_SET_VERSION}: plan again")
        CHECK.exact_keys(d, ("kind", "version", "lengths", "buffer", "rows", "buckets"), w)
        buffer = tuple(_entry(e, f"{w}.buffer[{i}]") for i, e in enumerate(CHECK.list(d["buffer"], f"{w}.buffer")))
        if list(buffer) != sorted(set(buffer)) or len({(e[0], e[1]) for e in buffer}) != len(buffer):
            raise PlanError(f"{w}.buffer: entries must be sorted, distinct, one bitwidth per shard")
        buckets = []
        for i, b in enumerate(CHECK.list(d["buckets"], f"{w}.buckets", MAX_BUCKETS)):
            where = f"{w}.buckets[{i}]"
            CHECK.exact_keys(b, ("max_tokens", "weight", "plan"), where)
            plan = None if b["plan"] is None else Plan.from_dict(b["plan"])
            buckets.append(Bucket(CHECK.int(b["max_tokens"], f"{where}.max_tokens", 1, 1 << 16),
                                  CHECK.num(b["weight"], f"{where}.weight", 0.0, 1.0), plan))
        out = PlanSet(tuple(buckets), buffer, CHECK.text(d["lengths"], f"{w}.lengths", max_len=1024),
                      _rows(d["rows"], f"{w}.rows"))
        check_set(out)
        return out


def _rows(d, where: str) -> RowCache | None:
    if d is None:
        return None
    CHECK.exact_keys(d, ("words", "positions", "hidden"), where)
    words = CHECK.int_list(d["words"], f"{where}.words", 0, 1 << 22, max_len=1 << 16)
    if len(set(words)) != len(words):
        raise PlanError(f"{where}.words: token ids must be distinct")
    positions = CHECK.int(d["positions"], f"{where}.positions", 0, 1 << 16)
    hidden = CHECK.int(d["hidden"], f"{where}.hidden", 1 if words or positions else 0, 1 << 16)
    return RowCache(words, positions, hidden)


def _entry(e, where: str) -> tuple[int, int, int]:
    entry = CHECK.int_list(e, where, 0, 1 << 16)
    if len(entry) != 3:
        raise PlanError(f"{where}: expected [layer, shard, bits], got {short(e)}")
    return entry[0], entry[1], entry[2]


def check_set(s: PlanSet) -> None:
    """What every plan set satisfies: buckets in increasing length, at least one plan, all
    plans answering the same request (planner, store, profiles, T, M), each preloading only
    what the buffer holds, at the bitwidth it holds it."""
    if not s.buckets or not s.plans:
        raise PlanError("plan set: no plan in any bucket")
    bounds = [b.max_tokens for b in s.buckets]
    if bounds != sorted(set(bounds)):
        raise PlanError(f"plan set: bucket lengths must increase, got {bounds}")
    if sum(b.weight for b in s.buckets) > 1.0 + 1e-9:
        raise PlanError("plan set: bucket weights add up to more than 1")
    held = {(layer, shard): bits for layer, shard, bits in s.buffer}
    ref = s.first.request
    for b in s.buckets:
        if b.plan is None:
            continue
        r = b.plan.request
        same = (r.planner, r.store_id, r.device_id, r.importance_id, r.target_ms, r.memory_bytes, r.fixed_bytes,
                 r.prune, r.model_layers, r.model_shards)
        if same != (ref.planner, ref.store_id, ref.device_id, ref.importance_id, ref.target_ms, ref.memory_bytes,
                    ref.fixed_bytes, ref.prune, ref.model_layers, ref.model_shards):
            raise PlanError(f"plan set: the plan for {b.max_tokens} tokens answers another request than the first")
        if any(held.get((layer, shard)) != bits for layer, shard, bits in b.plan.choice.preload):
            raise PlanError(f"plan set: the plan for {b.max_tokens} tokens preloads a shard the buffer does not hold")
        if r.seq_len < b.max_tokens and len(s.buckets) > 1:
            raise PlanError(f"plan set: the plan for requests of up to {b.max_tokens} tokens was made for {r.seq_len}")
    if s.rows is not None and s.rows.nbytes > ref.fixed_bytes:
        raise PlanError(f"plan set: the resident rows take {s.rows.nbytes} bytes, more than the plans' fixed "
                        f"{ref.fixed_bytes}: their bytes must be counted in M")


def bucket_bounds(max_tokens: int, width: int = BUCKET_TOKENS) -> list[int]:
    """8, 16, ... up to max_tokens (the last bucket may be narrower)."""
    return list(range(width, max_tokens, width)) + [max_tokens]


def weights(lengths, bounds: list[int]) -> list[float]:
    """Share of `lengths` (token counts; longer ones are cut to the last bound) in each bucket."""
    counts = [0] * len(bounds)
    for n in lengths:
        counts[next((i for i, b in enumerate(bounds) if n <= b), len(bounds) - 1)] += 1
    total = sum(counts)
    if total == 0:
        raise PlanError("the length distribution to plan for is empty")
    return [c / total for c in counts]


def make_plan_set(device: DeviceProfile, importance: ImportanceProfile, store_id: str, target_ms: float,
                  memory_bytes: float, lengths, max_tokens: int, fixed_bytes: int = 0, headroom: float = 0.0,
                  prune: bool = True, hidden: float | None = None, bucket_tokens: int = BUCKET_TOKENS,
                  source: str = "", embed_ms=None) -> PlanSet:
    """Joint plans for every length bucket up to `max_tokens`, sharing the preload buffer
    that gives the best expected accuracy over `lengths` (the token counts of a sample of
    requests). T, M, headroom and prune mean what they mean for `make_plan`; `embed_ms`,
    if given, maps a bucket's longest length to its embedding read time (planning/rows.py)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 1 << 16:
        raise PlanError(f"max_tokens must be an integer in 1..65536, got {max_tokens!r}")
    if isinstance(bucket_tokens, bool) or not isinstance(bucket_tokens, int) or not 1 <= bucket_tokens:
        raise PlanError(f"bucket_tokens must be a positive integer, got {bucket_tokens!r}")
    bounds = bucket_bounds(max_tokens, max(bucket_tokens, -(-max_tokens // MAX_BUCKETS)))
    shares = weights(lengths, bounds)
    target = arg_float(target_ms, "target_ms")
    embed = embed_ms or (lambda L: None)

    def own(L: int):
        try:
            return make_plan(device, importance, store_id, target, memory_bytes, seq_len=L, fixed_bytes=fixed_bytes,
                             hidden=hidden, headroom=headroom, prune=prune, embed_ms=embed(L))
        except PlanError as exc:
            if exc.min_target_ms is None and exc.min_memory_bytes is None:
                raise                      # bad input, not a length too long for T
            return exc

    owns = [own(L) for L in bounds]
    if all(isinstance(p, PlanError) for p in owns):
        raise owns[0]                      # even the shortest requests cannot be planned
    problems = [Problem.of(device, importance, store_id, target * (1 - headroom), memory_bytes, L, fixed_bytes,
                           hidden, None, prune, embed(L)) for L in bounds]
    mine = [p for p in owns if isinstance(p, Plan)]
    best = None
    for buffer in dict.fromkeys(p.choice.preload for p in mine):
        decided = [_best_around(P, buffer, mine) for P in problems]
        score = (round(sum(w for w, d in zip(shares, decided) if d is not None), 9),
                 sum(w * d[0] for w, d in zip(shares, decided) if d is not None))
        if best is None or score > best[0]:
            best = (score, buffer, decided)
    _, buffer, decided = best
    buckets = []
    for L, w, P, d in zip(bounds, shares, problems, decided):
        plan = None
        if d is not None:
            plan = assemble(P, "joint", *d[1:])
            plan = replace(plan, request=replace(plan.request, target_ms=target))
        buckets.append(Bucket(L, w, plan))
    out = PlanSet(tuple(buckets), buffer, source)
    check_set(out)
    return out


def plan_set_around(kept: PlanSet, device: DeviceProfile, importance: ImportanceProfile, headroom: float = 0.0,
                    embed_ms=None, hidden: float | None = None) -> PlanSet:
    """`kept`'s buckets planned again for `device`, each streamed around `kept`'s preload
    buffer and resident rows, which stay (so nothing resident changes and the engine can
    swap the plans in between two requests): the quick replan of an engine whose device
    drifted from its profile. T, M and the rest are `kept`'s; `embed_ms` as for
    `make_plan_set`."""
    req = kept.first.request
    held = {(layer, shard): bits for layer, shard, bits in kept.buffer}
    embed = embed_ms or (lambda L: None)
    buckets = []
    for b in kept.buckets:
        P = Problem.of(device, importance, req.store_id, req.target_ms * (1 - headroom), req.memory_bytes,
                       b.max_tokens, req.fixed_bytes, hidden, None, req.prune, embed(b.max_tokens))
        d = around(P, held)
        plan = None
        if d is not None:
            plan = assemble(P, req.planner, *d[1:])
            plan = replace(plan, request=replace(plan.request, target_ms=req.target_ms))
        buckets.append(Bucket(b.max_tokens, b.weight, plan))
    if all(b.plan is None for b in buckets):
        raise PlanError(f"no plan around the preload buffer meets T = {req.target_ms:g} ms on this device any more",
                        min_target_ms=None, min_memory_bytes=None)
    out = PlanSet(tuple(buckets), kept.buffer, kept.lengths, kept.rows)
    check_set(out)
    return out


def _best_around(P: Problem, buffer, mine: list[Plan]):
    """(accuracy, n, m, rows, held used) of the best plan for P's length with `buffer`:
    streamed around it, or a bucket's own plan that holds exactly this buffer, if it also
    fits this length."""
    held = {(layer, shard): bits for layer, shard, bits in buffer}
    best = around(P, held)
    for plan in mine:
        c = plan.choice
        if c.preload != buffer or best is not None and plan.predicted.accuracy <= best[0]:
            continue
        if fits(layer_io(P, c.layers, c.bits, held), P.target_ms - P.base(c.n, c.m), P.compute[c.m], P.first_ms):
            best = (plan.predicted.accuracy, c.n, c.m, [list(r) for r in c.bits],
                    {(layer, shard): bits for layer, shard, bits in c.preload})
    return best


def explain_set(s: PlanSet, tokens: int | None = None) -> str:
    """One line per length bucket (its share of requests, submodel, bits, prediction), the
    shared buffer, then the full table of the plan for `tokens` (default: the bucket with
    the most requests)."""
    from .plan import _bits_summary, explain
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise PlanError(f"the request length to show must be a positive number of tokens, got {tokens!r}")
    r = s.first.request
    lines = [f"{r.planner} plans for store {r.store_id[:12]}, T = {r.target_ms:.2f} ms, M = {r.memory_bytes:,} B: "
             f"{len(s.buckets)} length buckets ({s.lengths or 'lengths not recorded'})",
             f"{'tokens':>9} {'share':>6}  {'submodel':>8}  {'streamed bits':<22} {'latency ms':>10} {'accuracy':>8}"]
    low = 1
    for b in s.buckets:
        p = s.plan_for(b.max_tokens)
        streamed = [bits for _, _, bits in p.streamed]
        note = "" if b.plan is not None else f"  (none fits: the {p.request.seq_len}-token plan, cut)"
        lines.append(f"{f'{low}-{b.max_tokens}':>9} {b.weight:>6.1%}  {f'{p.choice.n} x {p.choice.m}':>8}  "
                     f"{_bits_summary(streamed) or 'none':<22} {p.predicted.latency_ms:>10.2f} "
                     f"{p.predicted.accuracy:>8.4f}{note}")
        low = b.max_tokens + 1
    buffer_bytes = max(p.predicted.preload_bytes for p in s.plans)
    lines.append(f"buffer    {len(s.buffer)} shards held ({_bits_summary([b for _, _, b in s.buffer]) or 'none'}), "
                 f"shared by every length; the largest plan uses {buffer_bytes:,.0f} B of them")
    rows = s.rows
    lines.append("rows      every embedding row read per request" if rows is None else
                 f"rows      {len(rows.words)} frequent tokens' word rows and {rows.positions} position rows resident "
                 f"(int8, {rows.nbytes:,} B of M); the rest read per request")
    lines.append(f"expected  accuracy {s.expected_accuracy:.4f} over the length distribution "
                 f"({s.covered:.1%} of it in buckets with a plan of their own)")
    if tokens is None:
        tokens = max(s.buckets, key=lambda b: b.weight).max_tokens
    lines += ["", f"the plan for requests of {tokens} tokens:", explain(s.plan_for(tokens))]
    return "\n".join(lines)
