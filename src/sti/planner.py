"""Elastic pipeline planning: which submodel, which bitwidth per shard, what to preload.

Execution model the planner predicts (docs/PLANNER.md has the long form)
--------------------------------------------------------------------------
- The model has N layers and M shards per layer (shard j = head j + FFN slice j), each shard
  stored at every bitwidth of `device.bits` (e.g. 2, 3, 4, 5, 6 and 32).
- A submodel (n, m) runs the layers `depth_layers(N, n)`, each with its shards 0..m-1 (the
  model is rewired so the first shards are the most important). m is the same in every layer:
  the elastic model was trained that way, and `importance.submodel_acc(n, m)` is its accuracy.
  Only the (n, m) pairs in `importance.submodel_accuracy` are candidates.
- Always resident: the per-layer shared records, the head, the embedding odds and ends. The
  caller gives their size as `fixed_bytes`; it counts in resident memory and is charged
  against the preload budget M first.
- Preload buffer: (layer, shard) -> bits, held across requests; its bytes
  (device.shard_bytes[bits]) + fixed_bytes must be <= M. Preloaded shards need no IO.
- IO lane (one thread): reads the request's embedding rows (device.embed_read_ms(L)), then
  reads and decodes every streamed shard in plan order, layer by layer in execution order and
  in shard order within a layer; a shard costs device.io_ms(bits).
- Compute lane: layer k starts at max(end of layer k-1, end of its last streamed shard);
  layer 0 also waits for the embeddings. A layer takes device.compute_ms(m, L).
  Latency = end of the last layer + device.head_ms.
- Stall of layer k = how long compute waits for IO; slack of layer k = how early its shards
  were ready (negative slack is a stall). With E the embedding read and C the layer time,
  layer k is due at AIB(k) = E + k*C (the accumulated IO budget) and its shards are ready at
  E + sum of IO of layers 0..k, so a plan is stall-free iff that IO fits AIB(k) for every k;
  in particular every streamed shard of layer 0 is a stall.
- Memory (a prediction, only the preload budget is a constraint): preload + fixed + in flight
  (the packed bytes of two consecutive layers' streamed shards + one decoded fp32 shard) +
  working set (activations, 4 bytes * L * hidden * 8).
- Predicted accuracy = submodel_acc(n, m) - sum over kept shards of
  importance.shard_penalty(layer, shard, bits).

Two planners, one interface (`make_plan`)
-----------------------------------------
- `paper` follows STI: stage 1 takes the largest submodel whose compute fits T; stage 2
  preloads the first layer at 6 bits, streams the rest at the lowest bitwidth, and upgrades
  shards in order of importance (to 6 bits, then to 32) while every AIB stays >= 0.
- `joint` (ours) searches (n, m), bitwidths and preload contents together; it may stream
  part of the first layer (a stall counted in the latency) but is stall-free from layer 1 on.

Both are monotone (a larger T or M never lowers the predicted accuracy) by construction:
each result is the best member, among those that fit (T, M), of a set of plans that does not
depend on (T, M); see docs/PLANNER.md. Times are in ms, sizes in bytes.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import json
import math
from dataclasses import dataclass, fields, replace

import numba
import numpy as np

from .encoder import Submodel, depth_layers
from .errors import StiError
from .profiles import DeviceProfile, ImportanceProfile

PLAN_VERSION = 2  # 2: prune
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


_IDS: dict[int, tuple[object, str]] = {}


def profile_id(profile: DeviceProfile | ImportanceProfile) -> str:
    """First 16 hex digits of the sha256 of the profile's canonical JSON. Profiles are frozen,
    so the id of one object is remembered (holding the object, so its id() is not reused)."""
    hit = _IDS.get(id(profile))
    if hit is not None and hit[0] is profile:
        return hit[1]
    text = json.dumps(profile.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    if len(_IDS) >= 64:
        _IDS.clear()
    _IDS[id(profile)] = (profile, digest)
    return digest


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


def simulate(layers, m: int, bits, preload, device: DeviceProfile,
             seq_len: int | None = None, embed_ms: float | None = None) -> tuple[LayerTiming, ...]:
    """The two-lane timeline of a plan. `bits[k][j]` is the bitwidth of shard j of the k-th
    executed layer; `preload` holds (layer, shard[, bits]) entries. `embed_ms` overrides the
    embedding read time (a padded request reads only its distinct tokens' rows)."""
    held = {(entry[0], entry[1]) for entry in preload}
    comp = device.compute_ms(m, seq_len)
    io_clock = device.embed_read_ms(seq_len) if embed_ms is None else embed_ms
    due = io_clock                      # layer 0 also needs the embeddings
    out = []
    for k, layer in enumerate(layers):
        io = 0.0
        for j in range(m):
            if (layer, j) not in held:
                io += device.io_ms(bits[k][j])
        io_start, io_end = io_clock, io_clock + io
        io_clock = io_end
        start = max(due, io_end)
        end = start + comp
        out.append(LayerTiming(layer, io_start, io_end, start, end, max(0.0, io_end - due), io, comp,
                               due - io_end))
        due = end
    return tuple(out)


# --- the plan -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    planner: str
    store_id: str
    device_id: str
    importance_id: str
    target_ms: float
    memory_bytes: int
    seq_len: int
    model_layers: int                      # N
    model_shards: int                      # M shards per layer in the model
    n: int
    m: int
    layers: tuple[int, ...]
    bits: tuple[tuple[int, ...], ...]      # [k][j]: bits of shard j of the k-th executed layer
    preload: tuple[tuple[int, int, int], ...]   # (layer, shard, bits), sorted
    fixed_bytes: int
    embed_ms: float
    head_ms: float
    # predictions
    latency_ms: float
    accuracy: float
    submodel_accuracy: float               # the (n, m) submodel at full precision
    full_accuracy: float                   # the whole model at full precision
    preload_bytes: float
    inflight_bytes: float
    working_bytes: float
    resident_bytes: float
    timeline: tuple[LayerTiming, ...]
    # may shards be left out (the model is elastic, or the user allowed it)? If not, the plan
    # runs every layer and shard, and the deadline guard only lowers bitwidths
    prune: bool = True

    @property
    def shards(self) -> tuple[tuple[int, ...], ...]:
        """Shard ids of each executed layer, in IO order."""
        return tuple(tuple(range(self.m)) for _ in self.layers)

    @property
    def submodel(self) -> Submodel:
        return Submodel(layers=self.layers, shards=self.shards)

    @property
    def streamed(self) -> tuple[tuple[int, int, int], ...]:
        """(layer, shard, bits) read at request time, in IO order."""
        held = {(layer, shard) for layer, shard, _ in self.preload}
        return tuple((layer, j, row[j]) for layer, row in zip(self.layers, self.bits)
                     for j in range(self.m) if (layer, j) not in held)

    @property
    def stall_ms(self) -> float:
        return sum(t.stall for t in self.timeline)

    @property
    def is_stall_free(self) -> bool:
        """The paper's condition: no layer, not even the first, waits for IO."""
        return all(t.stall <= TOL_MS for t in self.timeline)

    @property
    def is_stall_free_after_first(self) -> bool:
        """The joint planner's condition: only the first layer may wait (in the latency)."""
        return all(t.stall <= TOL_MS for t in self.timeline[1:])

    @property
    def io_ms(self) -> float:
        return sum(t.io_ms for t in self.timeline)

    @property
    def spare_ms(self) -> float:
        return self.target_ms - self.latency_ms

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["layers"] = list(self.layers)
        d["bits"] = [list(row) for row in self.bits]
        d["preload"] = [list(p) for p in self.preload]
        d["timeline"] = [{f.name: getattr(t, f.name) for f in fields(LayerTiming)} for t in self.timeline]
        d["kind"] = "plan"
        d["version"] = PLAN_VERSION
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @staticmethod
    def from_json(text: str | bytes) -> "Plan":
        if len(text) > MAX_PLAN_JSON:
            raise PlanError(f"plan: larger than {MAX_PLAN_JSON >> 20} MiB, not a plan")
        try:
            d = json.loads(text, parse_constant=_reject_constant)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
            raise PlanError(f"plan: not valid JSON ({exc})") from None
        return Plan.from_dict(d)

    @staticmethod
    def from_dict(d) -> "Plan":
        """Validate an untrusted plan (types, ranges, internal consistency)."""
        w = "plan"
        if not isinstance(d, dict):
            raise PlanError(f"{w}: expected a JSON object")
        if d.get("kind") != "plan":
            raise PlanError(f"{w}: not a plan (kind={d.get('kind')!r})")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"{w}: version {d.get('version')!r}, this sti reads {PLAN_VERSION}: plan again")
        known = {f.name for f in fields(Plan)} | {"kind", "version"}
        missing = sorted({f.name for f in fields(Plan)} - set(d))
        if missing:
            raise PlanError(f"{w}: missing field(s) {', '.join(missing)}")
        extra = sorted(set(d) - known)
        if extra:
            raise PlanError(f"{w}: unknown field(s) {', '.join(extra[:5])}")
        planner = d["planner"]
        if planner not in PLANNERS:
            raise PlanError(f"{w}.planner: expected one of {PLANNERS}, got {planner!r}")
        store_id = _str(d["store_id"], f"{w}.store_id")
        device_id = _hex16(d["device_id"], f"{w}.device_id")
        importance_id = _hex16(d["importance_id"], f"{w}.importance_id")
        model_layers = _int(d["model_layers"], f"{w}.model_layers", 1, 4096)
        model_shards = _int(d["model_shards"], f"{w}.model_shards", 1, 4096)
        n = _int(d["n"], f"{w}.n", 1, model_layers)
        m = _int(d["m"], f"{w}.m", 1, model_shards)
        layers = _int_list(d["layers"], f"{w}.layers", 0, model_layers - 1)
        if len(layers) != n or list(layers) != sorted(set(layers)):
            raise PlanError(f"{w}.layers: expected {n} increasing distinct layer ids, got {list(layers)}")
        rows = d["bits"]
        if not isinstance(rows, list) or len(rows) != n:
            raise PlanError(f"{w}.bits: expected {n} rows")
        bits = tuple(_int_list(r, f"{w}.bits[{k}]", 1, 32) for k, r in enumerate(rows))
        if any(len(r) != m for r in bits):
            raise PlanError(f"{w}.bits: every row needs {m} bitwidths")
        raw = d["preload"]
        if not isinstance(raw, list) or len(raw) > n * m:
            raise PlanError(f"{w}.preload: expected at most {n * m} entries")
        pos = {layer: k for k, layer in enumerate(layers)}
        preload = []
        for i, e in enumerate(raw):
            entry = _int_list(e, f"{w}.preload[{i}]", 0, 1 << 16)
            if len(entry) != 3:
                raise PlanError(f"{w}.preload[{i}]: expected [layer, shard, bits], got {_short(e)}")
            layer, shard, b = entry
            if layer not in pos or shard >= m or bits[pos[layer]][shard] != b:
                raise PlanError(f"{w}.preload[{i}]: ({layer}, {shard}, {b}) is not a shard of the plan "
                                f"at its planned bitwidth")
            preload.append((layer, shard, b))
        if preload != sorted(set(preload)):
            raise PlanError(f"{w}.preload: entries must be sorted and distinct")
        timeline = d["timeline"]
        if not isinstance(timeline, list) or len(timeline) != n:
            raise PlanError(f"{w}.timeline: expected {n} layers")
        tl = tuple(_timing(t, layers[k], f"{w}.timeline[{k}]") for k, t in enumerate(timeline))
        if not isinstance(d["prune"], bool):
            raise PlanError(f"{w}.prune: expected true or false, got {_short(d['prune'])}")
        if not d["prune"] and (n, m) != (model_layers, model_shards):
            raise PlanError(f"{w}: prune is false but the plan runs {n} x {m} of {model_layers} x {model_shards}")
        plan = Plan(
            planner=planner, store_id=store_id, device_id=device_id, importance_id=importance_id,
            target_ms=_float(d["target_ms"], f"{w}.target_ms", 0.0, MAX_MS),
            memory_bytes=_int(d["memory_bytes"], f"{w}.memory_bytes", 0, MAX_BYTES),
            seq_len=_int(d["seq_len"], f"{w}.seq_len", 1, 1 << 16),
            model_layers=model_layers, model_shards=model_shards, n=n, m=m, layers=layers, bits=bits,
            preload=tuple(preload),
            fixed_bytes=_int(d["fixed_bytes"], f"{w}.fixed_bytes", 0, MAX_BYTES),
            embed_ms=_float(d["embed_ms"], f"{w}.embed_ms", 0.0, MAX_MS),
            head_ms=_float(d["head_ms"], f"{w}.head_ms", 0.0, MAX_MS),
            latency_ms=_float(d["latency_ms"], f"{w}.latency_ms", 0.0, MAX_MS),
            accuracy=_float(d["accuracy"], f"{w}.accuracy", -math.inf, 1.0),
            submodel_accuracy=_float(d["submodel_accuracy"], f"{w}.submodel_accuracy", 0.0, 1.0),
            full_accuracy=_float(d["full_accuracy"], f"{w}.full_accuracy", 0.0, 1.0),
            preload_bytes=_float(d["preload_bytes"], f"{w}.preload_bytes", 0.0, MAX_BYTES),
            inflight_bytes=_float(d["inflight_bytes"], f"{w}.inflight_bytes", 0.0, MAX_BYTES),
            working_bytes=_float(d["working_bytes"], f"{w}.working_bytes", 0.0, MAX_BYTES),
            resident_bytes=_float(d["resident_bytes"], f"{w}.resident_bytes", 0.0, MAX_BYTES),
            timeline=tl, prune=d["prune"])
        _check_consistent(plan)
        return plan


def _check_consistent(p: Plan) -> None:
    """What a well-formed plan satisfies whatever the device: the lanes add up, the latency
    is the timeline's, the preload fits the budget, the target is met."""
    def close(a: float, b: float) -> bool:
        return abs(a - b) <= TOL_MS * max(1.0, abs(a), abs(b))

    due = p.embed_ms
    io_clock = p.embed_ms
    for k, t in enumerate(p.timeline):
        ok = (close(t.io_start, io_clock) and close(t.io_end, t.io_start + t.io_ms)
              and close(t.compute_start, max(due, t.io_end)) and close(t.compute_end, t.compute_start + t.compute_ms)
              and close(t.stall, max(0.0, t.io_end - due)) and close(t.slack, due - t.io_end)
              and close(t.compute_ms, p.timeline[0].compute_ms))
        if not ok:
            raise PlanError(f"plan.timeline[{k}]: the lanes do not add up")
        io_clock, due = t.io_end, t.compute_end
    if not close(p.latency_ms, p.timeline[-1].compute_end + p.head_ms):
        raise PlanError("plan.latency_ms does not match its timeline")
    if p.latency_ms > p.target_ms + TOL_MS:
        raise PlanError(f"plan: latency {p.latency_ms:.3f} ms exceeds its target {p.target_ms:.3f} ms")
    if p.preload_bytes + p.fixed_bytes > p.memory_bytes * (1 + 1e-12) + 1e-6:
        raise PlanError("plan: preload + fixed bytes exceed its memory budget")
    if not p.is_stall_free_after_first:
        raise PlanError("plan: a layer after the first waits for IO")
    if not close(p.resident_bytes, p.preload_bytes + p.fixed_bytes + p.inflight_bytes + p.working_bytes):
        raise PlanError("plan.resident_bytes does not add up")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number")


def _int(v, where: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise PlanError(f"{where}: expected an integer in {lo}..{hi}, got {_short(v)}")
    return v


def _float(v, where: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise PlanError(f"{where}: expected a finite number in {lo:g}..{hi:g}, got {_short(v)}")
    return float(v)


def _str(v, where: str) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= 256:
        raise PlanError(f"{where}: expected a short string")
    return v


def _hex16(v, where: str) -> str:
    if not isinstance(v, str) or len(v) != 16 or any(c not in "0123456789abcdef" for c in v):
        raise PlanError(f"{where}: expected 16 lowercase hex digits")
    return v


def _int_list(v, where: str, lo: int, hi: int) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > 4096:
        raise PlanError(f"{where}: expected a list")
    return tuple(_int(x, where, lo, hi) for x in v)


def _timing(t, layer: int, where: str) -> LayerTiming:
    if not isinstance(t, dict) or set(t) != {f.name for f in fields(LayerTiming)}:
        raise PlanError(f"{where}: expected the fields {', '.join(f.name for f in fields(LayerTiming))}")
    if t["layer"] != layer or isinstance(t["layer"], bool):
        raise PlanError(f"{where}: layer {_short(t['layer'])} does not match the plan's layer {layer}")
    vals = {f.name: _float(t[f.name], f"{where}.{f.name}", -MAX_MS if f.name == "slack" else 0.0, MAX_MS)
            for f in fields(LayerTiming) if f.name != "layer"}
    return LayerTiming(layer=layer, **vals)


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


# --- the problem, validated once ----------------------------------------------------------

class _Problem:
    """The inputs of one planning request, checked, with the tables the planners use."""

    def __init__(self, device, importance, store_id, target_ms, memory_bytes, seq_len, fixed_bytes, hidden,
                 embed_tokens=None, prune: bool = True):
        if not isinstance(device, DeviceProfile) or not isinstance(importance, ImportanceProfile):
            raise PlanError("make_plan needs a DeviceProfile and an ImportanceProfile")
        if not isinstance(store_id, str) or not store_id:
            raise PlanError("store_id must be a non-empty string")
        for name, p in (("device", device), ("importance", importance)):
            if p.store_id != store_id:
                raise PlanError(f"the {name} profile was measured for store {str(p.store_id)[:12]}, not "
                                f"{store_id[:12]}: profile this store with `sti profile`")
        self.T = _arg_float(target_ms, "target_ms")
        if not 0 < self.T <= MAX_MS:
            raise PlanError(f"target_ms must be > 0 and at most {MAX_MS:g}, got {target_ms!r}")
        mem = _arg_float(memory_bytes, "memory_bytes")
        if mem < 0 or mem > MAX_BYTES:
            raise PlanError(f"memory_bytes must be in 0..{MAX_BYTES}, got {memory_bytes!r}")
        self.M = int(mem)
        if isinstance(fixed_bytes, bool) or not isinstance(fixed_bytes, int) or not 0 <= fixed_bytes <= MAX_BYTES:
            raise PlanError(f"fixed_bytes must be an integer in 0..{MAX_BYTES}, got {fixed_bytes!r}")
        self.fixed = fixed_bytes
        self.B = float(self.M - self.fixed)          # what the preload buffer may use
        if seq_len is None:
            seq_len = device.seq_len
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= 1 << 16:
            raise PlanError(f"seq_len must be an integer in 1..65536, got {seq_len!r}")
        self.L = seq_len
        self.device, self.importance = device, importance

        # shapes: the importance table is N x M, the device covers the bitwidths it names
        kl = importance.shard_kl
        if not kl or not kl[0] or any(len(r) != len(kl[0]) for r in kl):
            raise PlanError("importance profile: shard_kl must be a non-empty rectangular table")
        self.N, self.S = len(kl), len(kl[0])
        self.kl = np.array(kl, dtype=float)
        if not np.all(np.isfinite(self.kl)) or np.any(self.kl < 0):
            raise PlanError("importance profile: shard_kl must hold finite numbers >= 0")
        self.kappa = _arg_float(importance.kl_to_acc, "importance.kl_to_acc")
        if self.kappa < 0:
            raise PlanError("importance profile: kl_to_acc must be >= 0")
        self.bits = device.bits
        if not self.bits or set(device.shard_bytes) != set(self.bits) or set(device.shard_decode_ms) != set(self.bits):
            raise PlanError("device profile: shard_bytes, shard_read_ms and shard_decode_ms cover different bitwidths")
        missing = [b for b in self.bits if b not in importance.bits_error]
        if missing:
            raise PlanError(f"the importance profile has no error figure for {missing} bits that the device "
                            f"profile stores: the profiles are of different stores or shapes")
        self.io = {b: _arg_float(device.io_ms(b), f"device io_ms({b})") for b in self.bits}
        self.nbytes = {b: _arg_float(device.shard_bytes[b], f"device shard_bytes[{b}]") for b in self.bits}
        self.err = {b: _arg_float(importance.bits_error[b], f"importance bits_error[{b}]") for b in self.bits}
        if min(self.io.values()) < 0 or min(self.nbytes.values()) < 0 or min(self.err.values()) < 0:
            raise PlanError("profiles: IO times, shard bytes and bit errors must be >= 0")
        if embed_tokens is not None and (isinstance(embed_tokens, bool) or not isinstance(embed_tokens, int)
                                         or not 1 <= embed_tokens <= seq_len):
            raise PlanError(f"embed_tokens must be an integer in 1..seq_len ({seq_len}), got {embed_tokens!r}")
        self.E = _arg_float(device.embed_read_ms(embed_tokens or seq_len), "device embed_read_ms")
        self.head = _arg_float(device.head_ms, "device head_ms")
        if self.E < 0 or self.head < 0:
            raise PlanError("device profile: embedding read and head times must be >= 0")

        # candidates: the (n, m) pairs the elastic model was evaluated at
        self.cands = []
        for key, acc in importance.submodel_accuracy.items():
            try:
                n, m = (int(x) for x in str(key).split(","))
            except ValueError:
                raise PlanError(f"importance profile: submodel key {key!r} is not 'n,m'") from None
            if not (1 <= n <= self.N and 1 <= m <= self.S):
                raise PlanError(f"importance profile: submodel {key} does not fit the {self.N} x {self.S} "
                                f"shard table: the profiles are of different shapes")
            acc = _arg_float(acc, f"importance submodel_accuracy[{key}]")
            self.cands.append((n, m, acc))
        if not isinstance(prune, bool):
            raise PlanError(f"prune must be true or false, got {_short(prune)}")
        self.prune = prune
        if not prune:  # a plain model: only the whole model is a candidate
            self.cands = [c for c in self.cands if (c[0], c[1]) == (self.N, self.S)]
            if not self.cands:
                raise PlanError(f"importance profile: no accuracy for the whole model ({self.N},{self.S}), "
                                "which a plan that may not prune needs")
        self.cands.sort(key=lambda c: (c[0], c[1]))
        self.acc = {(n, m): acc for n, m, acc in self.cands}
        self._layers = {}
        if not self.cands:
            raise PlanError("importance profile: no submodel accuracies, nothing to plan from")
        self._comp = {}
        for _, m, _ in self.cands:
            if m not in self._comp:
                self._comp[m] = _arg_float(device.compute_ms(m, seq_len), f"device compute_ms({m})")

        # bitwidth roles
        self.b_io = min(self.bits, key=lambda b: (self.io[b], self.err[b], b))      # cheapest to stream
        self.b_mem = min(self.bits, key=lambda b: (self.nbytes[b], self.err[b], b))  # cheapest to hold
        self.stream_path = _hull_path(self.bits, self.b_io, self.io, self.err)
        self.hold_paths = {b: _hull_path(self.bits, b, self.nbytes, self.err) for b in self.bits}
        fp32 = device.shard_bytes.get(32) or max(self.nbytes[b] * 32 / b for b in self.bits)
        self.fp32_bytes = float(fp32)
        if hidden is None:
            # a BERT shard holds 4*h*h/M attention and 8*h*h/M FFN weights: 48*h*h/M bytes in fp32
            hidden = max(1.0, math.sqrt(self.fp32_bytes * self.S / 48.0))
        self.hidden = _arg_float(hidden, "hidden")
        if self.hidden <= 0:
            raise PlanError(f"hidden must be > 0, got {hidden!r}")
        try:
            self.device_id = profile_id(device)
            self.importance_id = profile_id(importance)
        except (TypeError, ValueError) as exc:
            raise PlanError(f"a profile cannot be written as JSON ({exc}): it was not loaded from a file") from None
        self._layer0, self._rest, self._priced, self._configs = {}, {}, None, {}

    def comp(self, m: int) -> float:
        return self._comp[m]

    def layers(self, n: int) -> tuple[int, ...]:
        if n not in self._layers:
            self._layers[n] = depth_layers(self.N, n)
        return self._layers[n]

    def base(self, n: int, m: int) -> float:
        """Latency of (n, m) when nothing waits for IO."""
        return self.E + n * self._comp[m] + self.head


def _arg_float(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise PlanError(f"{where}: expected a number, got {_short(v)}")
    v = float(v)
    if not math.isfinite(v):
        raise PlanError(f"{where}: expected a finite number, got {v}")
    return v


def _hull_path(bits, start, cost: dict, err: dict) -> list:
    """Bitwidths visited when improving a shard from `start` most cheaply: each next one
    gives the largest error drop per unit of cost (the lower convex hull of (cost, error)).
    Returns [(bits, d_cost, d_err), ...], the first entry being (start, 0, 0)."""
    path = [(start, 0.0, 0.0)]
    cur = start
    while True:
        best, best_eff = None, -1.0
        for b in bits:
            de = err[cur] - err[b]
            dc = cost[b] - cost[cur]
            if de <= 0 or dc < 0:
                continue
            eff = math.inf if dc == 0 else de / dc
            if eff > best_eff or (eff == best_eff and cost[b] < cost[best]):
                best, best_eff = b, eff
        if best is None:
            return path
        path.append((best, cost[best] - cost[cur], err[cur] - err[best]))
        cur = best


# --- plan assembly (shared by both planners) ----------------------------------------------

def _accuracy(P: _Problem, n: int, m: int, layers, bits) -> float:
    imp = P.importance
    penalty = 0.0
    for layer, row in zip(layers, bits):
        for j in range(m):
            penalty += imp.shard_penalty(layer, j, row[j])
    return imp.submodel_acc(n, m) - penalty


def _assemble(P: _Problem, planner: str, n: int, m: int, bits, held: dict) -> Plan:
    """Build the Plan of a decision: bits[k][j] per executed layer, held[(layer, shard)] = bits."""
    layers = P.layers(n)
    bits = tuple(tuple(int(b) for b in row) for row in bits)
    preload = tuple(sorted((layer, j, int(b)) for (layer, j), b in held.items()))
    timeline = simulate(layers, m, bits, preload, P.device, P.L, embed_ms=P.E)
    latency = timeline[-1].compute_end + P.head
    preload_bytes = float(sum(P.nbytes[b] for _, _, b in preload))
    streamed = [sum(P.nbytes[b] for j, b in enumerate(row) if (layer, j) not in held)
                for layer, row in zip(layers, bits)]
    pairs = [streamed[k] + streamed[k + 1] for k in range(len(streamed) - 1)] or streamed
    inflight = max(pairs) + P.fp32_bytes if any(streamed) else 0.0
    working = 4.0 * P.L * P.hidden * 8
    plan = Plan(
        planner=planner, store_id=P.device.store_id, device_id=P.device_id, importance_id=P.importance_id,
        target_ms=P.T, memory_bytes=P.M, seq_len=P.L, model_layers=P.N, model_shards=P.S, n=n, m=m,
        layers=layers, bits=bits, preload=preload, fixed_bytes=P.fixed, embed_ms=P.E, head_ms=P.head,
        latency_ms=latency, accuracy=_accuracy(P, n, m, layers, bits),
        submodel_accuracy=P.importance.submodel_acc(n, m), full_accuracy=P.importance.full_accuracy,
        preload_bytes=preload_bytes, inflight_bytes=float(inflight), working_bytes=working,
        resident_bytes=preload_bytes + P.fixed + float(inflight) + working, timeline=timeline, prune=P.prune)
    # the planners' bookkeeping and the timeline must agree; a mismatch is a bug, not bad input
    if latency > P.T + TOL_MS or preload_bytes > P.B + 1e-6 * max(1.0, P.B) or not plan.is_stall_free_after_first:
        raise PlanError(f"internal error: the {planner} planner produced a plan its own timeline rejects "
                        f"(latency {latency} ms, preload {preload_bytes} B); please report this")
    if planner == "paper" and not plan.is_stall_free:
        raise PlanError("internal error: the paper planner produced a plan that stalls; please report this")
    return plan


def _slack(K: int, C: float, layer_io) -> list[float]:
    """AIB slack of layers 1..K: k*C - IO of layers 1..k (layer 0's IO shifts both sides)."""
    out, io = [], 0.0
    for k in range(K):
        io += layer_io[k]
        out.append((k + 1) * C - io)
    return out


def _suffix_min(sl: list[float]) -> list[float]:
    out = sl[:]
    for k in range(len(out) - 2, -1, -1):
        if out[k + 1] < out[k]:
            out[k] = out[k + 1]
    return out


# --- the paper's planner ------------------------------------------------------------------

def _paper_bits(P: _Problem) -> tuple[int, int]:
    """Preload bitwidth (6, or the highest <= 6) and the lowest streamed bitwidth."""
    low = [b for b in P.bits if b <= 6]
    return (max(low) if low else min(P.bits)), min(P.bits)


def _paper_levels(P: _Problem) -> list[int]:
    """The bitwidths a streamed shard goes through: the lowest, 6 bits, 32 bits."""
    pb, low = _paper_bits(P)
    return [low] + [t for t in dict.fromkeys((pb, max(P.bits))) if t != low]


def _paper_lowest_ok(P: _Problem, n: int, m: int, low: int) -> bool:
    """Does the plan with every streamed shard at the lowest bitwidth stay stall-free?"""
    sl = _slack(n - 1, P.comp(m), [m * P.io[low]] * (n - 1))
    return all(s >= 0 for s in sl)


@numba.njit(cache=True, nogil=True)
def _paper_upgrades(order, layer_of, sl, level_bits, level_io, targets):
    """STI's upgrade passes: for each target level, the shards in `order` (importance order)
    are raised to it when that keeps every AIB slack >= 0. Returns each shard's level."""
    K = sl.shape[0]
    cur = np.zeros(order.shape[0], np.int64)
    smin = np.empty(K)
    for k in range(K - 1, -1, -1):
        smin[k] = sl[k] if k == K - 1 or sl[k] < smin[k + 1] else smin[k + 1]
    for t in targets:
        for s in order:
            if level_bits[t] <= level_bits[cur[s]]:
                continue
            d = level_io[t] - level_io[cur[s]]
            k = layer_of[s]
            if smin[k] >= d:
                cur[s] = t
                for j in range(k, K):
                    sl[j] -= d
                for j in range(K - 1, -1, -1):
                    smin[j] = sl[j] if j == K - 1 or sl[j] < smin[j + 1] else smin[j + 1]
    return cur


def _paper_stage2(P: _Problem, n: int, m: int, pb: int, levels: list[int]):
    """STI's stage 2 for (n, m): first layer preloaded at 6 bits (pb), the rest streamed at
    the lowest bitwidth, then shards upgraded in order of importance, to 6 bits and then to
    32 bits (`levels`), each only if every AIB stays >= 0. Independent of T and M.
    Returns (predicted accuracy, level index of each streamed shard)."""
    layers = P.layers(n)
    K = n - 1
    first = P.kappa * P.err[pb] * float(P.kl[layers[0], :m].sum())
    if K == 0:
        return P.acc[(n, m)] - first, np.zeros(0, dtype=np.int64)
    kl = P.kl[list(layers[1:]), :m].ravel()
    order = np.lexsort((np.arange(K * m), -kl))            # most important first, ties by position
    cur = _paper_upgrades(order.astype(np.int64), np.repeat(np.arange(K), m).astype(np.int64),
                          np.array(_slack(K, P.comp(m), [m * P.io[levels[0]]] * K)),
                          np.array(levels, dtype=np.int64), np.array([P.io[b] for b in levels]),
                          np.arange(1, len(levels), dtype=np.int64))
    rest = P.kappa * float(kl @ np.array([P.err[b] for b in levels])[cur])
    return P.acc[(n, m)] - first - rest, cur


def _paper_rows(P: _Problem, n: int, m: int, pb: int, levels: list[int], cur) -> tuple[list, dict]:
    layers = P.layers(n)
    rows = [[pb] * m] + [[levels[c] for c in cur[k * m:(k + 1) * m]] for k in range(n - 1)]
    return rows, {(layers[0], j): pb for j in range(m)}


def _paper_eligible(P: _Problem):
    """Stage 1's candidates in the paper's order, with what each needs: the most shards
    first (n*m), ties to the wider submodel (more heads per layer). Only submodels whose
    all-lowest plan is stall-free can be planned at all."""
    pb, low = _paper_bits(P)
    out = []
    for n, m, acc in sorted(P.cands, key=lambda c: (-c[0] * c[1], -c[1], -c[0])):
        if _paper_lowest_ok(P, n, m, low):
            out.append((n, m, acc, P.base(n, m), m * P.nbytes[pb]))   # buffer: the first layer at pb
    return out


def _paper_search(P: _Problem, ub=None):
    """The paper's pick for (T, M), made monotone: the faithful pick is the first eligible
    submodel in stage-1 order; a smaller budget (T', M') may pick another submodel c (the
    first one eligible under its own compute and preload need), and if that one predicts a
    higher accuracy it is kept instead, so a larger T or M never lowers the accuracy.
    Returns (accuracy, n, m, rows, held) or None."""
    elig = [c for c in _paper_eligible(P) if c[3] <= P.T and c[4] <= P.B]
    pb, _ = _paper_bits(P)
    levels = _paper_levels(P)
    bases = np.array([c[3] for c in elig])
    needs = np.array([c[4] for c in elig])
    best = None
    for i, (n, m, acc, base, need) in enumerate(elig):
        if best is not None:
            bound = acc if ub is None else min(acc, ub.get((n, m), acc))
            if bound <= best[0]:
                continue
        if np.any((bases[:i] <= base) & (needs[:i] <= need)):
            continue            # never the first pick at any budget
        value, cur = _paper_stage2(P, n, m, pb, levels)
        if best is None or value > best[0]:
            best = (value, n, m, cur)
    if best is None:
        return None
    value, n, m, cur = best
    return (value, n, m) + _paper_rows(P, n, m, pb, levels, cur)


def _paper_limits(P: _Problem):
    """Smallest T for this M and smallest M for this T, each with a check that a rounded
    value still fits (same arithmetic as the search), or None."""
    elig = _paper_eligible(P)
    t = [(base, (lambda x, b=base: b <= x)) for _, _, _, base, need in elig if need <= P.B]
    mm = [(need + P.fixed, (lambda x, nd=need: nd <= float(x - P.fixed))) for _, _, _, base, need in elig
          if base <= P.T]
    return min(t, key=lambda w: w[0], default=None), min(mm, key=lambda w: w[0], default=None)


# --- the joint planner --------------------------------------------------------------------
#
# The joint planner is exact about feasibility (every plan it returns is checked against the
# timeline) and heuristic about optimality. To be monotone in T and M it never searches "for
# this budget": for each submodel (n, m) it builds families of plans that do not depend on T
# or M, and returns the best combination that fits. One family per part of the submodel:
#
#   - the first executed layer, whose IO is a stall paid from S0 = T - compute path: members
#     whose accuracy only grows (and whose bytes only shrink) with S0;
#   - the other layers, whose IO must fit the AIBs (which depend on neither T nor M): a fixed
#     set of plans, each with its preload bytes.
#
# A plan of (n, m) is one member of each, their bytes adding up to at most M - fixed_bytes.
#
# The members come from Lagrangian pricing: charge mu per preloaded byte, and each shard is
# either held at the bitwidth that is best for its importance at that price, or streamed
# (costing IO). For each mu of a fixed grid, every shard starts held, then shards switch to
# streaming and are upgraded, best accuracy gained per ms of IO first, while every AIB stays
# >= 0 (first fit). A high mu keeps only the least important shards in memory, at 2 bits,
# to free IO for the important ones (the paper's buffer does the opposite); a low mu holds
# more, at higher precision. Each member is then extended by upgrading its held shards, best
# accuracy per byte first, which fills the bytes between one price and the next.

@numba.njit(cache=True, nogil=True)
def _first_fit(order, eff, frm, cost, T, loc_layer, K, C, fill_pos, fill_ids, switch_cost):
    """For each priced member g: every shard starts held (state -1); apply the moves in
    `order` (global move i = shard i // T to stream path position i % T) when they fit the
    AIB slack of their layer and of every later layer. Then shards still held try their
    cheapest improving switch to streaming. Returns the states (G, shards): -1 held, else
    the stream path position."""
    G, MV = order.shape
    NS = loc_layer.shape[0]
    state = np.full((G, NS), -1, np.int64)
    sl = np.empty(K)
    smin = np.empty(K)
    for g in range(G):
        for k in range(K):
            sl[k] = (k + 1) * C
        for k in range(K - 1, -1, -1):
            smin[k] = sl[k] if k == K - 1 or sl[k] < smin[k + 1] else smin[k + 1]
        for i in range(MV):
            idx = order[g, i]
            if eff[g, idx] == -np.inf:
                break
            s = idx // T
            if state[g, s] != frm[g, idx]:
                continue
            k = loc_layer[s]
            d = cost[g, idx]
            if smin[k] >= d:
                state[g, s] = idx % T
                for j in range(k, K):
                    sl[j] -= d
                for j in range(K - 1, -1, -1):
                    smin[j] = sl[j] if j == K - 1 or sl[j] < smin[j + 1] else smin[j + 1]
        for i in range(fill_ids.shape[0]):
            s = fill_ids[i]
            t = fill_pos[g, s]
            if state[g, s] != -1 or t < 0:
                continue
            k = loc_layer[s]
            d = switch_cost[t]
            if smin[k] >= d:
                state[g, s] = t
                for j in range(k, K):
                    sl[j] -= d
                for j in range(K - 1, -1, -1):
                    smin[j] = sl[j] if j == K - 1 or sl[j] < smin[j + 1] else smin[j + 1]
    return state


@numba.njit(cache=True, nogil=True)
def _lp_gain(order, eff, frm, cost, gain, T, loc_layer, K, C):
    """The linear relaxation of the same problem, member by member: the moves in the same
    order, the first one that does not fit taken in part (up to the AIB slack left), which
    is optimal for a separable concave objective over these nested constraints. Returns
    the priced accuracy gained over holding every shard (G,): an upper bound."""
    G, MV = order.shape
    NS = loc_layer.shape[0]
    out = np.zeros(G)
    state = np.empty(NS, np.int64)
    sl = np.empty(K)
    smin = np.empty(K)
    for g in range(G):
        state[:] = -1
        for k in range(K):
            sl[k] = (k + 1) * C
        for k in range(K - 1, -1, -1):
            smin[k] = sl[k] if k == K - 1 or sl[k] < smin[k + 1] else smin[k + 1]
        v = 0.0
        for i in range(MV):
            idx = order[g, i]
            if eff[g, idx] == -np.inf:
                break
            s = idx // T
            if state[s] != frm[g, idx]:
                continue
            k = loc_layer[s]
            d = cost[g, idx]
            take = d if smin[k] >= d else smin[k]
            if take <= 0.0 and d > 0.0:
                state[s] = -2                    # blocked: its constraint is full
                continue
            if take >= d:
                state[s] = idx % T
                v += gain[g, idx]
            else:
                state[s] = -2                    # taken in part: the shard stops here
                v += gain[g, idx] * (take / d)
            for j in range(k, K):
                sl[j] -= take
            for j in range(K - 1, -1, -1):
                smin[j] = sl[j] if j == K - 1 or sl[j] < smin[j + 1] else smin[j + 1]
        out[g] = v
    return out


def _price_grid(P: _Problem) -> np.ndarray:
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


class _Priced:
    """For every shard of the model (global id = layer * M + shard) and every byte price of
    the grid: the bitwidth it is held at, its first switch to streaming (the stream path
    position with the best accuracy per ms over holding), its upgrades along the stream
    path, each move's efficiency and IO cost, and all moves sorted best first (ties: the
    more important shard first). Also the upgrades of held shards along their hold path,
    sorted by accuracy per byte. Built once per request, shared by every (n, m)."""

    def __init__(self, P: _Problem):
        mus = _price_grid(P)
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
        self.T = T = len(path)
        vh_all = -kap[None, :, None] * e_b[None, None, :] - mus[:, None, None] * by_b[None, None, :]
        self.h = h = np.argmax(vh_all, axis=2)                             # (G, NS)
        self.vhold = -kap[None, :] * e_b[h]                                # true value when held
        self.hbytes = by_b[h]
        vh = np.take_along_axis(vh_all, h[:, :, None], axis=2)[:, :, 0]
        self.v_t = v_t = -kap[:, None] * e_t[None, :]                      # (NS, T)
        diff = v_t[None] - vh[:, :, None]                                  # (G, NS, T)
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
        t = np.arange(T)[None, None, :]
        f = first[:, :, None]
        up_eff = np.concatenate([np.full((NS, 1), -np.inf), ueff], axis=1)[None]
        sw_eff = np.take_along_axis(slope, np.maximum(first, 0)[:, :, None], axis=2)
        eff = np.where(t == f, sw_eff, np.where((t > f) & (f >= 0), up_eff, -np.inf))
        self.eff = eff.reshape(G, NS * T)
        up_gain = np.concatenate([np.zeros((NS, 1)), up], axis=1)[None]               # (1, NS, T)
        sw_gain = np.take_along_axis(diff, np.maximum(first, 0)[:, :, None], axis=2)
        self.gain = np.where(t == f, sw_gain, up_gain).reshape(G, NS * T)              # priced accuracy gained
        self.mus = mus
        self.vpriced = vh                                                  # priced value when held
        step_io = np.concatenate([[0.0], d_io])
        self.cost = np.where(t == f, io_t[None, None, :], step_io[None, None, :]).reshape(G, NS * T)
        self.frm = np.where(t == f, -1, t - 1).reshape(G, NS * T).astype(np.int64)
        tie = np.lexsort((np.arange(NS * T), np.repeat(-kl, T)))          # ties: more important first
        self.order = tie[np.argsort(-self.eff[:, tie], axis=1, kind="stable")]
        self.order_shard = self.order // T
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
        """The sorted moves of shards `ids` only, per member (G, len(ids) * T)."""
        inside = np.zeros(self.NS, dtype=bool)
        inside[ids] = True
        return self.order[inside[self.order_shard]].reshape(self.G, -1)

    def held_bits(self, g: int, s: int) -> int:
        return self.hb[self.h[g, s]]


def _priced(P: _Problem) -> _Priced:
    if P._priced is None:
        P._priced = _Priced(P)
    return P._priced


class _Layer0:
    """Plans of the first executed layer's m shards; each only gets better with a larger
    layer-0 stall budget S0, and none depends on T or M:
      - configurations: the p most important shards held at b1 and the next q at b2, the rest
        streamed at the cheapest bitwidth, then upgraded along a fixed path (best accuracy
        per ms first) as far as S0 allows;
      - priced members: for each byte price, every shard held at its best bitwidth for that
        price, then switched to streaming and upgraded along the member's sorted moves as
        far as S0 allows (switching frees bytes, so a larger S0 also needs less memory)."""

    def __init__(self, P: _Problem, layer: int, m: int):
        self.P, self.layer, self.m = P, layer, m
        self.cfg_p = None                    # the configurations are built when first needed
        # priced members: with no AIB to respect, every valid move applies, in order
        pr = self.pr = _priced(P)
        self.ids = ids = layer * P.S + np.arange(m)
        self.moves = mv = pr.moves_of(ids)
        G, T = pr.G, pr.T
        rows = np.arange(G)[:, None]
        ok = pr.eff[rows, mv] > -np.inf
        s_of, t_of = mv // T, mv % T
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

    def configs(self) -> "_Layer0":
        if self.cfg_p is not None:
            return self
        P, layer, m = self.P, self.layer, self.m
        kl = P.kl[layer, :m]
        self.order = order = np.lexsort((np.arange(m), -kl))             # shard id of each rank
        ks = kl[order]
        csum = np.concatenate([[0.0], np.cumsum(ks)])
        kappa = P.kappa
        bits = np.array(P.bits)
        by = np.array([P.nbytes[b] for b in P.bits])
        er = np.array([P.err[b] for b in P.bits])
        # configurations (p, b1, q, b2); the second tier is cheaper and less precise
        if m not in P._configs:
            p, i1, q, i2 = (x.ravel() for x in np.meshgrid(np.arange(1, m + 1), np.arange(len(bits)), np.arange(m),
                                                           np.arange(len(bits)), indexing="ij"))
            keep = (p + q <= m) & (((q == 0) & (i2 == i1)) | ((q > 0) & (er[i2] > er[i1]) & (by[i2] < by[i1])))
            io_i = P.bits.index(P.b_io)
            P._configs[m] = tuple(np.concatenate([[first], x[keep]]) for first, x in ((0, p), (io_i, i1), (0, q), (io_i, i2)))
        self.cfg_p, i1, self.cfg_q, i2 = P._configs[m]
        self.cfg_b1, self.cfg_b2 = bits[i1], bits[i2]
        self.ncfg = len(self.cfg_p)
        self.r = self.cfg_p + self.cfg_q
        self.bytes = self.cfg_p * by[i1] + self.cfg_q * by[i2]
        self.held_value = -kappa * (er[i1] * csum[self.cfg_p] + er[i2] * (csum[self.r] - csum[self.cfg_p]))
        # the streamed rest (ranks r..m-1) upgraded along the stream path, best per ms first
        path = P.stream_path
        T = len(path)
        rank, t = (x.ravel() for x in np.meshgrid(np.arange(m), np.arange(1, T), indexing="ij"))
        dio = np.array([path[i][1] for i in range(T)])[t]
        gain = kappa * ks[rank] * np.array([path[i][2] for i in range(T)])[t]
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

    def decide(self, P: _Problem, a: int, ref) -> tuple[list, dict]:
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
            state[int(idx) // pr.T - layer * P.S] = int(idx) % pr.T
        row = []
        for j in range(m):
            if state[j] < 0:
                held[(layer, j)] = pr.held_bits(g, layer * P.S + j)
                row.append(held[(layer, j)])
            else:
                row.append(pr.tb[state[j]])
        return row, held


def _layer0(P: _Problem, layer: int, m: int) -> _Layer0:
    key = (layer, m)
    if key not in P._layer0:
        P._layer0[key] = _Layer0(P, layer, m)
    return P._layer0[key]


class _Rest:
    """Plans of executed layers 1..n-1 (K layers of m shards), none depending on T or M: one
    priced member per byte price (first fit under the AIBs), each extended step by step by
    upgrading its held shards, best accuracy per byte first."""

    def __init__(self, P: _Problem, layers: tuple, m: int):
        self.layers, self.m, self.K = layers, m, len(layers)
        K = self.K
        if K == 0:
            self.empty, self.min_bytes = True, 0.0
            return
        self.empty = False
        pr = self.pr = _priced(P)
        G, T = pr.G, pr.T
        ids = self.ids = np.array([layer * P.S + j for layer in layers for j in range(m)], dtype=np.int64)
        loc_layer = np.full(pr.NS, -1, dtype=np.int64)
        loc_layer[ids] = np.repeat(np.arange(K), m)
        fill_ids = ids[np.lexsort((np.arange(len(ids)), -pr.kl[ids]))]
        state = _first_fit(pr.moves_of(ids), pr.eff, pr.frm, pr.cost, T, loc_layer, K, float(P.comp(m)),
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

    def decide(self, P: _Problem, el: int) -> tuple[list, dict]:
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


def _rest(P: _Problem, layers: tuple, m: int) -> _Rest:
    key = (layers, m)
    if key not in P._rest:
        P._rest[key] = _Rest(P, layers, m)
    return P._rest[key]


def _upper_bounds(P: _Problem, cands) -> dict:
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
    member = np.zeros((len(cands), P.N))
    for k, ls in enumerate(layers):
        member[k, list(ls[1:])] = 1.0
    comp = np.array([P.comp(m) for m in ms])
    S0 = np.maximum(P.T - (P.E + ns * comp + P.head), 0.0)
    first = np.empty((len(lams), len(mus), len(cands)))
    rest = np.empty_like(first)
    for m in np.unique(ms):                                  # (L, U, N) at width m, then per candidate
        k = np.flatnonzero(ms == m)
        at_m = cum[:, :, :, m - 1]
        first[:, :, k] = at_m[:, :, first_layer[k]]
        rest[:, :, k] = at_m @ member[k].T
    first += lams[:, None, None] * S0
    rest += lams[:, None, None] * ((ns - 1) * comp)
    acc = np.array([c[2] for c in cands])
    bound = (acc + first.min(axis=0) + rest.min(axis=0) + mus[:, None] * max(P.B, 0.0)).min(axis=0)
    bound = np.where(np.isnan(bound), np.inf, bound + 1e-9 * (1.0 + np.abs(bound)))
    return {(int(n), int(m)): float(b) for n, m, b in zip(ns, ms, bound)}


def _lp_bound(P: _Problem, n: int, m: int, acc: float) -> float:
    """A tighter upper bound on any plan of (n, m): for each byte price mu, the linear
    relaxation of the priced problem (layer 0 under S0, the other layers under their AIBs)
    plus mu * (M - fixed); the least over the prices (Lagrangian duality on memory)."""
    layers = P.layers(n)
    S0 = P.T - P.base(n, m)
    if S0 < 0 or P.B < 0:
        return -math.inf
    pr = _priced(P)
    value = _layer0(P, layers[0], m).lp(S0) + pr.mus * P.B
    K = n - 1
    if K:
        ids = np.array([layer * P.S + j for layer in layers[1:] for j in range(m)], dtype=np.int64)
        loc_layer = np.full(pr.NS, -1, dtype=np.int64)
        loc_layer[ids] = np.repeat(np.arange(K), m)
        value = value + pr.vpriced[:, ids].sum(axis=1) + _lp_gain(
            pr.moves_of(ids), pr.eff, pr.frm, pr.cost, pr.gain, pr.T, loc_layer, K, float(P.comp(m)))
    b = acc + float(value.min())
    return b + 1e-9 * (1.0 + abs(b)) if not math.isnan(b) else math.inf


def _joint_candidate(P: _Problem, n: int, m: int, acc: float):
    """Best plan of (n, m) within the families: (accuracy, rows, held) or None."""
    layers = P.layers(n)
    S0 = P.T - P.base(n, m)
    if S0 < 0 or P.B < 0:
        return None
    f0 = _layer0(P, layers[0], m)
    b0, v0, ok0, ref0 = f0.query(S0)
    if not ok0.any():
        return None
    found = _rest(P, layers[1:], m).elements(P.B - float(b0[ok0].min()))
    if found is None:
        return None
    by1, best1, el1 = found
    idx = np.searchsorted(by1, P.B - b0, side="right") - 1
    ok = ok0 & (idx >= 0)
    if not ok.any():
        return None
    safe = np.maximum(idx, 0)
    total = np.where(ok, v0 + best1[safe], -np.inf)
    a = int(np.argmax(total))
    row0, held = f0.decide(P, a, ref0)
    rows, held1 = _rest(P, layers[1:], m).decide(P, int(el1[safe[a]]))
    held.update(held1)
    return acc + float(total[a]), [row0] + rows, held


def _joint_search(P: _Problem, floor: float | None = None, ub: dict | None = None):
    """Best family plan over every (n, m) whose compute fits T: (accuracy, n, m, rows, held).
    Best-first: a candidate is evaluated when its bound (the linear relaxation's, or the
    cheaper grid bound while that one is not computed) is the highest left; the search stops
    when no bound is above the best plan found (or above `floor`, the paper plan's accuracy).
    The bounds are valid, so the result is the best over all candidates, whatever the order."""
    cands = [c for c in P.cands if P.base(c[0], c[1]) <= P.T]
    if not cands or P.B < 0:
        return None
    if ub is None:
        ub = _upper_bounds(P, cands)
    cands.sort(key=lambda c: (-ub[(c[0], c[1])], c[0], c[1]))
    best = None
    bar = -math.inf if floor is None else floor
    pending = []                                  # (-lp bound, n, m, acc), highest first
    i = 0
    while True:
        unseen = ub[(cands[i][0], cands[i][1])] if i < len(cands) else -math.inf
        top = -pending[0][0] if pending else -math.inf
        if max(top, unseen) <= bar:
            return best                           # no bound left above the best
        if top >= unseen:
            _, n, m, acc = heapq.heappop(pending)
            r = _joint_candidate(P, n, m, acc)
            if r is not None and (best is None or r[0] > best[0]):
                best = (r[0], n, m, r[1], r[2])
                bar = max(bar, r[0])
        else:
            n, m, acc = cands[i]
            i += 1
            lp = _lp_bound(P, n, m, acc)
            if lp > bar:
                heapq.heappush(pending, (-lp, n, m, acc))


def _with_budget(P: _Problem, T: float | None = None, M: int | None = None) -> _Problem:
    """The same request with another T or M (the families are shared: they depend on neither)."""
    Q = copy.copy(P)
    if T is not None:
        Q.T = T
    if M is not None:
        Q.M, Q.B = M, float(M - P.fixed)
    return Q


def _joint_limits(P: _Problem):
    """Smallest T for this M and smallest M for this T within the joint planner's families
    (feasible wherever a paper plan is), each with a check that a rounded value fits, or None.
    The extremes are reached by the configurations that hold the fewest shards at the
    cheapest bitwidth (least memory) or stream the fewest (least layer-0 stall), next to the
    other layers' cheapest member."""
    t_best = m_best = None
    for n, m, acc in P.cands:
        layers = P.layers(n)
        f0 = _layer0(P, layers[0], m).configs()
        need = _rest(P, layers[1:], m).min_bytes
        base = P.base(n, m)
        fits = need <= P.B - f0.bytes
        if fits.any():
            t = base + float(f0.base_io[f0.r[fits]].min())
            if t_best is None or t < t_best[0]:
                t_best = (t, n, m, acc)
        S0 = P.T - base
        okr = f0.base_io[f0.r] <= S0
        if S0 >= 0 and okr.any():
            mm = float(f0.bytes[okr].min()) + need + P.fixed
            if m_best is None or mm < m_best[0]:
                m_best = (mm, n, m, acc)
    t_out = m_out = None
    if t_best is not None:
        t, n, m, acc = t_best
        t_out = (t, lambda x, n=n, m=m, acc=acc: _joint_candidate(_with_budget(P, T=x), n, m, acc) is not None)
    if m_best is not None:
        mm, n, m, acc = m_best
        m_out = (mm, lambda x, n=n, m=m, acc=acc: _joint_candidate(_with_budget(P, M=x), n, m, acc) is not None)
    return t_out, m_out


# --- the interface ------------------------------------------------------------------------

def make_plan(device: DeviceProfile, importance: ImportanceProfile, store_id: str, target_ms: float,
              memory_bytes: float, seq_len: int | None = None, planner: str = "joint", fixed_bytes: int = 0,
              hidden: float | None = None, headroom: float = 0.0, embed_tokens: int | None = None,
              prune: bool = True) -> Plan:
    """Plan a request of `seq_len` tokens to finish within `target_ms` with a preload buffer
    of at most `memory_bytes` (fixed_bytes included). `hidden` (the model's hidden size) is
    only used for the working-set estimate; by default it is inferred from the fp32 shard size.
    `headroom` (a fraction of T) is kept back: the plan's predicted latency is at most
    (1 - headroom) * T, and the runtime's deadline guard may spend the rest when IO runs late.
    `embed_tokens` (default seq_len) is how many distinct tokens' embedding rows to plan to
    read: a request padded to seq_len reads only its own tokens' rows. With `prune` False
    (a model not trained elastic) the plan keeps every layer and shard and chooses
    bitwidths and the preload buffer only."""
    if planner not in PLANNERS:
        raise PlanError(f"unknown planner {planner!r}: choose one of {', '.join(PLANNERS)}")
    headroom = _arg_float(headroom, "headroom")
    if not 0.0 <= headroom < 1.0:
        raise PlanError(f"headroom must be a fraction in [0, 1), got {headroom!r}")
    if headroom > 0.0:
        return _with_headroom(device, importance, store_id, _arg_float(target_ms, "target_ms"), memory_bytes,
                              seq_len, planner, fixed_bytes, hidden, headroom, embed_tokens, prune)
    P = _Problem(device, importance, store_id, target_ms, memory_bytes, seq_len, fixed_bytes, hidden, embed_tokens,
                 prune)
    if planner == "paper":
        best = _paper_search(P) if P.B >= 0 else None
    else:
        # the families start from the paper's buffer and streaming, but not from its exact
        # upgrades: evaluate the paper plan too, so that joint is never worse than paper
        ub = _upper_bounds(P, [c for c in P.cands if P.base(c[0], c[1]) <= P.T])
        paper = _paper_search(P, ub) if P.B >= 0 else None
        best = _joint_search(P, paper[0] if paper is not None else None, ub)
        if best is None or (paper is not None and paper[0] > best[0]):
            best = paper
    if best is None:
        _infeasible(P, planner)
    _, n, m, rows, held = best
    return _assemble(P, planner, n, m, rows, held)


def _with_headroom(device, importance, store_id, target_ms, memory_bytes, seq_len, planner, fixed_bytes,
                   hidden, headroom: float, embed_tokens, prune: bool) -> Plan:
    """A plan for (1 - headroom) * T, carrying T as its target; an impossible request is
    reported in the caller's terms (T, and the smallest T once the headroom is added back)."""
    if not 0 < target_ms <= MAX_MS:
        raise PlanError(f"target_ms must be > 0 and at most {MAX_MS:g}, got {target_ms!r}")
    try:
        plan = make_plan(device, importance, store_id, target_ms * (1 - headroom), memory_bytes, seq_len,
                         planner, fixed_bytes, hidden, embed_tokens=embed_tokens, prune=prune)
    except PlanError as exc:
        if exc.min_target_ms is None and exc.min_memory_bytes is None:
            raise
        least = None if exc.min_target_ms is None else math.ceil(exc.min_target_ms / (1 - headroom) * 1000) / 1000
        parts = [f"no {planner} plan meets T = {target_ms:g} ms ({headroom:.0%} of it kept as headroom) "
                 f"with M = {int(memory_bytes)} bytes"]
        parts.append(f"the smallest feasible T for this M is {least:.3f} ms" if least is not None
                     else "no T is feasible with this M")
        if exc.min_memory_bytes is not None:
            parts.append(f"the smallest feasible M for this T is {exc.min_memory_bytes} bytes")
        raise PlanError("; ".join(parts), min_target_ms=least, min_memory_bytes=exc.min_memory_bytes) from None
    return replace(plan, target_ms=float(target_ms))


def _infeasible(P: _Problem, planner: str):
    t, mem = _paper_limits(P) if planner == "paper" else _joint_limits(P)
    t_rep = mem_rep = None
    if t is not None:                     # rounded up to a microsecond, and still fitting
        t_rep = math.ceil(t[0] * 1000) / 1000
        for _ in range(8):
            if t[1](t_rep):
                break
            t_rep = (math.ceil(t_rep * 1000) + 1) / 1000
        else:
            raise PlanError(f"internal error: the smallest T {t[0]} ms found for this M does not plan; please report this")
    if mem is not None:                   # rounded up to a byte, and still fitting
        mem_rep = math.ceil(mem[0])
        for _ in range(8):
            if mem[1](mem_rep):
                break
            mem_rep += 1
        else:
            raise PlanError(f"internal error: the smallest M {mem[0]} B found for this T does not plan; please report this")
    fixed = f" ({P.fixed} of them fixed)" if P.fixed else ""
    parts = [f"no {planner} plan meets T = {P.T:g} ms with M = {P.M} bytes{fixed}"]
    if t_rep is not None:
        parts.append(f"the smallest feasible T for this M is {t_rep:.3f} ms")
    else:
        parts.append("no T is feasible with this M" + (" (the fixed bytes alone exceed it)" if P.B < 0 else ""))
    if mem_rep is not None:
        parts.append(f"the smallest feasible M for this T is {mem_rep} bytes")
    else:
        fastest = min(P.base(n, m) for n, m, _ in P.cands)
        parts.append(f"no M is feasible for this T (the fastest submodel's compute alone takes {fastest:.3f} ms)")
    raise PlanError("; ".join(parts), min_target_ms=t_rep, min_memory_bytes=mem_rep)


# --- explain ------------------------------------------------------------------------------

def _bits_summary(row) -> str:
    counts = {}
    for b in row:
        counts[b] = counts.get(b, 0) + 1
    return " ".join(f"{c}x{b}" for b, c in sorted(counts.items(), reverse=True))


def explain(plan: Plan) -> str:
    """A readable table of the plan, one line per executed layer, then the totals."""
    held = {}
    for layer, _, _ in plan.preload:
        held[layer] = held.get(layer, 0) + 1
    lines = [f"{plan.planner} plan for store {plan.store_id[:12]}: {plan.n} of {plan.model_layers} layers x "
             f"{plan.m} of {plan.model_shards} shards, seq_len {plan.seq_len}"
             + ("" if plan.prune else " (not elastic: every shard runs, only bitwidths are chosen)"),
             f"{'layer':>5} {'shards':>6}  {'bits':<22} {'preload':>7} {'io ms':>9} {'compute ms':>10} "
             f"{'stall ms':>9} {'slack ms':>9}"]
    for layer, row, t in zip(plan.layers, plan.bits, plan.timeline):
        lines.append(f"{layer:>5} {plan.m:>6}  {_bits_summary(row):<22} {held.get(layer, 0):>7} {t.io_ms:>9.2f} "
                     f"{t.compute_ms:>10.2f} {t.stall:>9.2f} {t.slack:>9.2f}")
    spare = plan.target_ms - plan.latency_ms
    lines.append(f"latency   {plan.latency_ms:.2f} ms of target {plan.target_ms:.2f} ms ({spare:.2f} ms spare); "
                 f"embeddings {plan.embed_ms:.2f} ms, head {plan.head_ms:.2f} ms")
    if plan.is_stall_free:
        lines.append("stalls    none (every layer's shards arrive before it is due)")
    else:
        lines.append(f"stalls    {plan.stall_ms:.2f} ms, all at the first layer (counted in the latency)")
    lines.append(f"preload   {plan.preload_bytes:,.0f} B in {len(plan.preload)} shards + {plan.fixed_bytes:,} B fixed "
                 f"of budget {plan.memory_bytes:,} B")
    lines.append(f"resident  {plan.resident_bytes:,.0f} B predicted (in flight {plan.inflight_bytes:,.0f} B, "
                 f"working set {plan.working_bytes:,.0f} B)")
    lines.append(f"accuracy  {plan.accuracy:.4f} predicted; submodel at full precision {plan.submodel_accuracy:.4f}; "
                 f"full model {plan.full_accuracy:.4f}")
    return "\n".join(lines)
