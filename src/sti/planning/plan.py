"""The plan: what a planner decided for one request shape, and what it predicts.

A `Plan` is a frozen, serialisable value in three groups: the `request` (what was asked:
target, budget, the profiles and store it was made with), the `choice` (the submodel, the
bitwidth of every shard, the preload buffer) and the `predicted` outcome (latency,
accuracy, memory, and the two-lane timeline with the time each shard should be ready).
The timeline follows the execution model of docs/PLANNER.md; `simulate` computes it.
Times are in ms, sizes in bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields

from ..encoder import Submodel
from ..errors import StiError
from ..profiles import DeviceProfile
from ..untrusted import Checks, short

PLAN_VERSION = 3  # 2: prune; 3: grouped fields, per-shard ready times
PLANNERS = ("joint", "paper")
TOL_MS = 1e-6            # float rounding allowance when checking stalls and latency
MAX_PLAN_JSON = 8 << 20
MAX_MS = 1e9
MAX_BYTES = 1 << 62


class PlanError(StiError):
    """No plan fits the request, the request is nonsense, or a plan file is malformed.
    For an infeasible request, `min_target_ms` / `min_memory_bytes` hold the smallest T for
    the given M and the smallest M for the given T (None when there is none)."""

    def __init__(self, message: str, min_target_ms: float | None = None,
                 min_memory_bytes: int | None = None):
        super().__init__(message)
        self.min_target_ms = min_target_ms
        self.min_memory_bytes = min_memory_bytes


CHECK = Checks(PlanError)


# --- the timeline -------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerTiming:
    """One executed layer on the two lanes (ms from the request's start)."""
    layer: int
    io_start: float
    io_end: float
    compute_start: float
    compute_end: float
    stall: float       # compute waiting for IO: max(0, io_end - due)
    io_ms: float       # IO lane time of this layer's streamed shards
    compute_ms: float
    slack: float       # due - io_end, where due = end of the previous layer (or of the embeddings)
    ready_ms: tuple[float, ...]  # per shard, in IO order: when the IO lane has it (read and decoded)


def simulate(layers, m: int, bits, preload, device: DeviceProfile,
             seq_len: int | None = None, embed_ms: float | None = None,
             setup_ms: float | None = None) -> tuple[LayerTiming, ...]:
    """The two-lane timeline of a plan. `bits[k][j]` is the bitwidth of shard j of the k-th
    executed layer; `preload` holds (layer, shard[, bits]) entries. `embed_ms` overrides the
    embedding read time (a padded request reads only its distinct tokens' rows). Both lanes
    start after the request's setup (`setup_ms`, by default the device's) and the embedding
    read. The first executed layer also costs the device's `first_layer_ms` (measured on the
    engine)."""
    held = {(entry[0], entry[1]) for entry in preload}
    io_clock = (device.setup_ms if setup_ms is None else setup_ms) + \
        (device.embed_read_ms(seq_len) if embed_ms is None else embed_ms)
    due = io_clock                      # layer 0 also needs the embeddings
    out = []
    for k, layer in enumerate(layers):
        io_start, ready = io_clock, []
        for j in range(m):
            if (layer, j) not in held:
                io_clock += device.io_ms(bits[k][j])
            ready.append(io_clock)
        start = max(due, io_clock)
        busy = device.layer_ms(m, seq_len, k)
        end = start + busy
        out.append(LayerTiming(layer, io_start, io_clock, start, end, max(0.0, io_clock - due),
                               io_clock - io_start, busy, due - io_clock, tuple(ready)))
        due = end
    return tuple(out)


# --- the plan -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PlanRequest:
    """What was asked, of which store and profiles."""
    planner: str
    store_id: str
    device_id: str
    importance_id: str
    target_ms: float
    memory_bytes: int
    seq_len: int
    fixed_bytes: int                       # always resident, charged to memory_bytes first
    model_layers: int                      # N
    model_shards: int                      # shards per layer in the model
    # may shards be left out (the model is elastic, or the user allowed it)? If not, the plan
    # runs every layer and shard, and the deadline guard only lowers bitwidths
    prune: bool = True


@dataclass(frozen=True)
class PlanChoice:
    """What the planner decided."""
    n: int
    m: int
    layers: tuple[int, ...]
    bits: tuple[tuple[int, ...], ...]      # [k][j]: bits of shard j of the k-th executed layer
    preload: tuple[tuple[int, int, int], ...]   # (layer, shard, bits), sorted


@dataclass(frozen=True)
class PlanPrediction:
    """What the planner predicts from the profiles."""
    latency_ms: float
    accuracy: float
    submodel_accuracy: float               # the (n, m) submodel at full precision
    full_accuracy: float                   # the whole model at full precision
    embed_ms: float                        # when the lanes start: the request's setup and the embedding read
    head_ms: float
    preload_bytes: float
    inflight_bytes: float
    working_bytes: float
    resident_bytes: float
    timeline: tuple[LayerTiming, ...]


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    choice: PlanChoice
    predicted: PlanPrediction

    @property
    def shards(self) -> tuple[tuple[int, ...], ...]:
        """Shard ids of each executed layer, in IO order."""
        return tuple(tuple(range(self.choice.m)) for _ in self.choice.layers)

    @property
    def submodel(self) -> Submodel:
        return Submodel(layers=self.choice.layers, shards=self.shards)

    @property
    def streamed(self) -> tuple[tuple[int, int, int], ...]:
        """(layer, shard, bits) read at request time, in IO order."""
        c = self.choice
        held = {(layer, shard) for layer, shard, _ in c.preload}
        return tuple((layer, j, row[j]) for layer, row in zip(c.layers, c.bits)
                     for j in range(c.m) if (layer, j) not in held)

    @property
    def stall_ms(self) -> float:
        return sum(t.stall for t in self.predicted.timeline)

    @property
    def is_stall_free(self) -> bool:
        """The paper's condition: no layer, not even the first, waits for IO."""
        return all(t.stall <= TOL_MS for t in self.predicted.timeline)

    @property
    def is_stall_free_after_first(self) -> bool:
        """The joint planner's condition: only the first layer may wait (in the latency)."""
        return all(t.stall <= TOL_MS for t in self.predicted.timeline[1:])

    @property
    def io_ms(self) -> float:
        return sum(t.io_ms for t in self.predicted.timeline)

    @property
    def spare_ms(self) -> float:
        return self.request.target_ms - self.predicted.latency_ms

    def to_dict(self) -> dict:
        p = self.predicted
        return {"kind": "plan", "version": PLAN_VERSION,
                "request": _plain(self.request),
                "choice": {"n": self.choice.n, "m": self.choice.m, "layers": list(self.choice.layers),
                           "bits": [list(r) for r in self.choice.bits],
                           "preload": [list(e) for e in self.choice.preload]},
                "predicted": {**_plain(p), "timeline": [{**_plain(t), "ready_ms": list(t.ready_ms)}
                                                        for t in p.timeline]}}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @staticmethod
    def from_json(text: str | bytes) -> "Plan":
        return Plan.from_dict(CHECK.parse(text, "plan", MAX_PLAN_JSON))

    @staticmethod
    def from_dict(d) -> "Plan":
        """Validate an untrusted plan (types, ranges, internal consistency)."""
        CHECK.obj(d, "plan")
        if d.get("kind") != "plan":
            raise PlanError(f"plan: not a plan (kind={short(d.get('kind'))})")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"plan: version {short(d.get('version'))}, this sti reads {PLAN_VERSION}: plan again")
        CHECK.exact_keys(d, ("kind", "version", "request", "choice", "predicted"), "plan")
        request = _read_request(d["request"])
        choice = _read_choice(d["choice"], request)
        plan = Plan(request, choice, _read_prediction(d["predicted"], choice))
        _check_consistent(plan)
        return plan


def _plain(obj) -> dict:
    """The scalar fields of a dataclass (its nested tuples are written by the caller)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if not isinstance(getattr(obj, f.name), tuple)}


def _read_request(d) -> PlanRequest:
    w = "plan.request"
    CHECK.exact_keys(d, [f.name for f in fields(PlanRequest)], w)
    if d["planner"] not in PLANNERS:
        raise PlanError(f"{w}.planner: expected one of {PLANNERS}, got {short(d['planner'])}")
    r = PlanRequest(
        planner=d["planner"], store_id=CHECK.text(d["store_id"], f"{w}.store_id", min_len=1),
        device_id=CHECK.hex16(d["device_id"], f"{w}.device_id"),
        importance_id=CHECK.hex16(d["importance_id"], f"{w}.importance_id"),
        target_ms=CHECK.num(d["target_ms"], f"{w}.target_ms", 0.0, MAX_MS),
        memory_bytes=CHECK.int(d["memory_bytes"], f"{w}.memory_bytes", 0, MAX_BYTES),
        seq_len=CHECK.int(d["seq_len"], f"{w}.seq_len", 1, 1 << 16),
        fixed_bytes=CHECK.int(d["fixed_bytes"], f"{w}.fixed_bytes", 0, MAX_BYTES),
        model_layers=CHECK.int(d["model_layers"], f"{w}.model_layers", 1, 4096),
        model_shards=CHECK.int(d["model_shards"], f"{w}.model_shards", 1, 4096),
        prune=CHECK.flag(d["prune"], f"{w}.prune"))
    return r


def _read_choice(d, r: PlanRequest) -> PlanChoice:
    w = "plan.choice"
    CHECK.exact_keys(d, [f.name for f in fields(PlanChoice)], w)
    n = CHECK.int(d["n"], f"{w}.n", 1, r.model_layers)
    m = CHECK.int(d["m"], f"{w}.m", 1, r.model_shards)
    if not r.prune and (n, m) != (r.model_layers, r.model_shards):
        raise PlanError(f"plan: prune is false but the plan runs {n} x {m} of {r.model_layers} x {r.model_shards}")
    layers = CHECK.int_list(d["layers"], f"{w}.layers", 0, r.model_layers - 1)
    if len(layers) != n or list(layers) != sorted(set(layers)):
        raise PlanError(f"{w}.layers: expected {n} increasing distinct layer ids, got {list(layers)}")
    rows = CHECK.list(d["bits"], f"{w}.bits")
    if len(rows) != n:
        raise PlanError(f"{w}.bits: expected {n} rows")
    bits = tuple(CHECK.int_list(row, f"{w}.bits[{k}]", 1, 32) for k, row in enumerate(rows))
    if any(len(row) != m for row in bits):
        raise PlanError(f"{w}.bits: every row needs {m} bitwidths")
    raw = CHECK.list(d["preload"], f"{w}.preload", n * m)
    pos = {layer: k for k, layer in enumerate(layers)}
    preload = []
    for i, e in enumerate(raw):
        entry = CHECK.int_list(e, f"{w}.preload[{i}]", 0, 1 << 16)
        if len(entry) != 3:
            raise PlanError(f"{w}.preload[{i}]: expected [layer, shard, bits], got {short(e)}")
        layer, shard, b = entry
        if layer not in pos or shard >= m or bits[pos[layer]][shard] != b:
            raise PlanError(f"{w}.preload[{i}]: ({layer}, {shard}, {b}) is not a shard of the plan "
                            f"at its planned bitwidth")
        preload.append((layer, shard, b))
    if preload != sorted(set(preload)):
        raise PlanError(f"{w}.preload: entries must be sorted and distinct")
    return PlanChoice(n=n, m=m, layers=layers, bits=bits, preload=tuple(preload))


def _read_prediction(d, c: PlanChoice) -> PlanPrediction:
    w = "plan.predicted"
    CHECK.exact_keys(d, [f.name for f in fields(PlanPrediction)], w)
    timeline = CHECK.list(d["timeline"], f"{w}.timeline")
    if len(timeline) != c.n:
        raise PlanError(f"{w}.timeline: expected {c.n} layers")
    num = {f.name: CHECK.num(d[f.name], f"{w}.{f.name}", *_RANGES.get(f.name, (0.0, MAX_BYTES)))
           for f in fields(PlanPrediction) if f.name != "timeline"}
    return PlanPrediction(**num, timeline=tuple(_read_timing(t, c, k, f"{w}.timeline[{k}]")
                                                for k, t in enumerate(timeline)))


_RANGES = {"latency_ms": (0.0, MAX_MS), "embed_ms": (0.0, MAX_MS), "head_ms": (0.0, MAX_MS),
           "accuracy": (-math.inf, 1.0), "submodel_accuracy": (0.0, 1.0), "full_accuracy": (0.0, 1.0)}


def _read_timing(t, c: PlanChoice, k: int, where: str) -> LayerTiming:
    CHECK.exact_keys(t, [f.name for f in fields(LayerTiming)], where)
    layer = c.layers[k]
    if t["layer"] != layer or isinstance(t["layer"], bool):
        raise PlanError(f"{where}: layer {short(t['layer'])} does not match the plan's layer {layer}")
    vals = {f.name: CHECK.num(t[f.name], f"{where}.{f.name}", -MAX_MS if f.name == "slack" else 0.0, MAX_MS)
            for f in fields(LayerTiming) if f.name not in ("layer", "ready_ms")}
    ready = CHECK.num_list(t["ready_ms"], f"{where}.ready_ms", 0.0, MAX_MS)
    if len(ready) != c.m:
        raise PlanError(f"{where}.ready_ms: expected {c.m} times, one per shard")
    return LayerTiming(layer=layer, **vals, ready_ms=ready)


def _check_consistent(p: Plan) -> None:
    """What a well-formed plan satisfies whatever the device: the lanes add up, the latency
    is the timeline's, the preload fits the budget, the target is met."""
    def close(a: float, b: float) -> bool:
        return abs(a - b) <= TOL_MS * max(1.0, abs(a), abs(b))

    r, c, pr = p.request, p.choice, p.predicted
    held = {(layer, shard) for layer, shard, _ in c.preload}
    due = io_clock = pr.embed_ms
    for k, t in enumerate(pr.timeline):
        ok = (_ready_ok(t, held, close) and close(t.io_start, io_clock) and close(t.io_end, t.io_start + t.io_ms)
              and close(t.compute_start, max(due, t.io_end)) and close(t.compute_end, t.compute_start + t.compute_ms)
              and close(t.stall, max(0.0, t.io_end - due)) and close(t.slack, due - t.io_end)
              and (k == 0 or close(t.compute_ms, pr.timeline[-1].compute_ms)))  # layer 0 may cost more
        if not ok:
            raise PlanError(f"plan.predicted.timeline[{k}]: the lanes do not add up")
        io_clock, due = t.io_end, t.compute_end
    if not close(pr.latency_ms, pr.timeline[-1].compute_end + pr.head_ms):
        raise PlanError("plan.predicted.latency_ms does not match its timeline")
    if pr.latency_ms > r.target_ms + TOL_MS:
        raise PlanError(f"plan: latency {pr.latency_ms:.3f} ms exceeds its target {r.target_ms:.3f} ms")
    if pr.preload_bytes + r.fixed_bytes > r.memory_bytes * (1 + 1e-12) + 1e-6:
        raise PlanError("plan: preload + fixed bytes exceed its memory budget")
    if not close(pr.resident_bytes, pr.preload_bytes + r.fixed_bytes + pr.inflight_bytes + pr.working_bytes):
        raise PlanError("plan.predicted.resident_bytes does not add up")


def _ready_ok(t: LayerTiming, held: set, close) -> bool:
    """Ready times rise through the layer's IO, a preloaded shard being ready at once."""
    prev = t.io_start
    for j, ready in enumerate(t.ready_ms):
        if ready < prev - TOL_MS or ((t.layer, j) in held and not close(ready, prev)):
            return False
        prev = ready
    return close(prev, t.io_end)


# --- explain ------------------------------------------------------------------------------

def _bits_summary(row) -> str:
    counts = {}
    for b in row:
        counts[b] = counts.get(b, 0) + 1
    return " ".join(f"{c}x{b}" for b, c in sorted(counts.items(), reverse=True))


def explain(plan: Plan) -> str:
    """A readable table of the plan, one line per executed layer, then the totals."""
    r, c, p = plan.request, plan.choice, plan.predicted
    held = {}
    for layer, _, _ in c.preload:
        held[layer] = held.get(layer, 0) + 1
    lines = [f"{r.planner} plan for store {r.store_id[:12]}: {c.n} of {r.model_layers} layers x "
             f"{c.m} of {r.model_shards} shards, seq_len {r.seq_len}"
             + ("" if r.prune else " (not elastic: every shard runs, only bitwidths are chosen)"),
             f"{'layer':>5} {'shards':>6}  {'bits':<22} {'preload':>7} {'io ms':>9} {'compute ms':>10} "
             f"{'stall ms':>9} {'slack ms':>9}"]
    for layer, row, t in zip(c.layers, c.bits, p.timeline):
        lines.append(f"{layer:>5} {c.m:>6}  {_bits_summary(row):<22} {held.get(layer, 0):>7} {t.io_ms:>9.2f} "
                     f"{t.compute_ms:>10.2f} {t.stall:>9.2f} {t.slack:>9.2f}")
    lines.append(f"latency   {p.latency_ms:.2f} ms of target {r.target_ms:.2f} ms ({plan.spare_ms:.2f} ms spare); "
                 f"setup and embeddings {p.embed_ms:.2f} ms, head {p.head_ms:.2f} ms")
    if plan.is_stall_free:
        lines.append("stalls    none (every layer's shards arrive before it is due)")
    elif plan.is_stall_free_after_first:
        lines.append(f"stalls    {plan.stall_ms:.2f} ms, all at the first layer (counted in the latency)")
    else:
        waits = [str(t.layer) for t in p.timeline if t.stall > TOL_MS]
        lines.append(f"stalls    {plan.stall_ms:.2f} ms, at layers {', '.join(waits)} (reading ahead; "
                     "counted in the latency)")
    lines.append(f"preload   {p.preload_bytes:,.0f} B in {len(c.preload)} shards + {r.fixed_bytes:,} B fixed "
                 f"of budget {r.memory_bytes:,} B")
    lines.append(f"resident  {p.resident_bytes:,.0f} B predicted (in flight {p.inflight_bytes:,.0f} B, "
                 f"working set {p.working_bytes:,.0f} B)")
    lines.append(f"accuracy  {p.accuracy:.4f} predicted; submodel at full precision {p.submodel_accuracy:.4f}; "
                 f"full model {p.full_accuracy:.4f}")
    return "\n".join(lines)
