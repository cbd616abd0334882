"""One planning request, validated once, with the tables both planners read; and the
assembly of a decision into a checked `Plan`.

Both planners see the execution model of docs/PLANNER.md through these numbers: a shard's IO
time and bytes at each bitwidth, a layer's compute time with m shards, the embedding read,
the head, and the accuracy model (the submodel's accuracy minus each kept shard's penalty
kl_to_acc * shard_kl * bits_error[bits]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from ..encoder import depth_layers, parse_grid_key
from ..profiles import DeviceProfile, ImportanceProfile, profile_id
from ..untrusted import short
from .plan import MAX_BYTES, MAX_MS, TOL_MS, Plan, PlanChoice, PlanError, PlanPrediction, PlanRequest, simulate


def arg_float(v, where: str) -> float:
    """A number given by a caller or read from a profile, refused unless finite."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise PlanError(f"{where}: expected a number, got {short(v)}")
    v = float(v)
    if not math.isfinite(v):
        raise PlanError(f"{where}: expected a finite number, got {v}")
    return v


@dataclass
class Problem:
    """The inputs of one planning request, checked. Made by `Problem.of`; a problem that
    differs only in its budget is `with_budget` (the planners' families depend on neither T
    nor M, so they may be shared between the two)."""
    device: DeviceProfile
    importance: ImportanceProfile
    target_ms: float                 # T
    memory_bytes: int                # M
    fixed_bytes: int                 # always resident, charged to M first
    seq_len: int
    prune: bool
    n_layers: int                    # N
    n_shards: int                    # shards per layer
    kl: np.ndarray                   # (N, S) shard importance
    kappa: float                     # accuracy lost per unit of kl * bits_error
    bits: tuple[int, ...]
    io: dict                         # bits -> IO ms of a shard (read + decode)
    nbytes: dict                     # bits -> bytes of a shard record
    err: dict                        # bits -> relative error
    embed_ms: float                  # when the lanes start: the request's setup and the embedding read
    head_ms: float
    first_ms: float                  # the first executed layer's extra cost (device.first_layer_ms)
    candidates: list                 # (n, m, accuracy at full precision), sorted
    compute: dict                    # m -> compute ms of a layer with m shards
    fp32_bytes: float
    hidden: float
    device_id: str
    importance_id: str
    b_io: int = 0                    # cheapest bitwidth to stream
    b_mem: int = 0                   # cheapest bitwidth to hold
    stream_path: list = field(default_factory=list)
    hold_paths: dict = field(default_factory=dict)

    @property
    def buffer_bytes(self) -> float:
        """What the preload buffer may use: M minus the fixed bytes (negative: infeasible)."""
        return float(self.memory_bytes - self.fixed_bytes)

    @cached_property
    def acc(self) -> dict:
        return {(n, m): a for n, m, a in self.candidates}

    def layers(self, n: int) -> tuple[int, ...]:
        return depth_layers(self.n_layers, n)

    def base(self, n: int, m: int) -> float:
        """Latency of (n, m) when nothing waits for IO."""
        return self.embed_ms + n * self.compute[m] + self.first_ms + self.head_ms

    def with_budget(self, target_ms: float | None = None, memory_bytes: int | None = None) -> "Problem":
        return replace(self, target_ms=self.target_ms if target_ms is None else target_ms,
                       memory_bytes=self.memory_bytes if memory_bytes is None else memory_bytes)

    @staticmethod
    def of(device, importance, store_id, target_ms, memory_bytes, seq_len, fixed_bytes, hidden,
           embed_tokens=None, prune: bool = True, embed_ms: float | None = None) -> "Problem":
        if not isinstance(device, DeviceProfile) or not isinstance(importance, ImportanceProfile):
            raise PlanError("make_plan needs a DeviceProfile and an ImportanceProfile")
        if not isinstance(store_id, str) or not store_id:
            raise PlanError("store_id must be a non-empty string")
        for name, p in (("device", device), ("importance", importance)):
            if p.store_id != store_id:
                raise PlanError(f"the {name} profile was measured for store {str(p.store_id)[:12]}, not "
                                f"{store_id[:12]}: profile this store with `sti profile`")
        target = arg_float(target_ms, "target_ms")
        if not 0 < target <= MAX_MS:
            raise PlanError(f"target_ms must be > 0 and at most {MAX_MS:g}, got {target_ms!r}")
        mem = arg_float(memory_bytes, "memory_bytes")
        if mem < 0 or mem > MAX_BYTES:
            raise PlanError(f"memory_bytes must be in 0..{MAX_BYTES}, got {memory_bytes!r}")
        if isinstance(fixed_bytes, bool) or not isinstance(fixed_bytes, int) or not 0 <= fixed_bytes <= MAX_BYTES:
            raise PlanError(f"fixed_bytes must be an integer in 0..{MAX_BYTES}, got {fixed_bytes!r}")
        seq_len = device.seq_len if seq_len is None else seq_len
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= 1 << 16:
            raise PlanError(f"seq_len must be an integer in 1..65536, got {seq_len!r}")
        if not isinstance(prune, bool):
            raise PlanError(f"prune must be true or false, got {short(prune)}")
        if embed_tokens is not None and (isinstance(embed_tokens, bool) or not isinstance(embed_tokens, int)
                                         or not 1 <= embed_tokens <= seq_len):
            raise PlanError(f"embed_tokens must be an integer in 1..seq_len ({seq_len}), got {embed_tokens!r}")
        kl, kappa = _importance_table(importance)
        bits, io, nbytes, err = _bit_tables(device, importance)
        # the embedding rows' read time: given (rows the resident cache holds are not read,
        # planning/rows.py), or `embed_tokens` distinct tokens' rows and their positions
        embed = arg_float(device.embed_read_ms(embed_tokens or seq_len) if embed_ms is None else embed_ms,
                          "embedding read time")
        setup = arg_float(device.setup_ms, "device setup_ms")
        head = arg_float(device.head_ms, "device head_ms")
        first = arg_float(device.first_layer_ms, "device first_layer_ms")
        if embed < 0 or head < 0 or first < 0 or setup < 0:
            raise PlanError("device profile: setup, embedding read, first-layer and head times must be >= 0")
        embed += setup   # the lanes start after both (`simulate`)
        cands = _candidates(importance, *kl.shape, prune)
        compute = {m: arg_float(device.compute_ms(m, seq_len), f"device compute_ms({m})")
                   for m in sorted({m for _, m, _ in cands})}
        fp32 = float(device.shard_bytes.get(32) or max(nbytes[b] * 32 / b for b in bits))
        if hidden is None:
            # a BERT shard holds 4*h*h/M attention and 8*h*h/M FFN weights: 48*h*h/M bytes in fp32
            hidden = max(1.0, math.sqrt(fp32 * kl.shape[1] / 48.0))
        hidden = arg_float(hidden, "hidden")
        if hidden <= 0:
            raise PlanError(f"hidden must be > 0, got {hidden!r}")
        try:
            ids = profile_id(device), profile_id(importance)
        except (TypeError, ValueError) as exc:
            raise PlanError(f"a profile cannot be written as JSON ({exc}): it was not loaded from a file") from None
        b_io = min(bits, key=lambda b: (io[b], err[b], b))
        b_mem = min(bits, key=lambda b: (nbytes[b], err[b], b))
        return Problem(
            device=device, importance=importance, target_ms=target, memory_bytes=int(mem), fixed_bytes=fixed_bytes,
            seq_len=seq_len, prune=prune, n_layers=kl.shape[0], n_shards=kl.shape[1], kl=kl, kappa=kappa,
            bits=bits, io=io, nbytes=nbytes, err=err, embed_ms=embed, head_ms=head, first_ms=first, candidates=cands,
            compute=compute, fp32_bytes=fp32, hidden=hidden, device_id=ids[0], importance_id=ids[1],
            b_io=b_io, b_mem=b_mem, stream_path=hull_path(bits, b_io, io, err),
            hold_paths={b: hull_path(bits, b, nbytes, err) for b in bits})


def _importance_table(importance: ImportanceProfile) -> tuple[np.ndarray, float]:
    kl = importance.shard_kl
    if not kl or not kl[0] or any(len(r) != len(kl[0]) for r in kl):
        raise PlanError("importance profile: shard_kl must be a non-empty rectangular table")
    table = np.array(kl, dtype=float)
    if not np.all(np.isfinite(table)) or np.any(table < 0):
        raise PlanError("importance profile: shard_kl must hold finite numbers >= 0")
    kappa = arg_float(importance.kl_to_acc, "importance.kl_to_acc")
    if kappa < 0:
        raise PlanError("importance profile: kl_to_acc must be >= 0")
    return table, kappa


def _bit_tables(device: DeviceProfile, importance: ImportanceProfile):
    """(bits, IO ms, bytes, error) per bitwidth, the profiles checked to agree."""
    bits = device.bits
    if not bits or set(device.shard_bytes) != set(bits) or set(device.shard_decode_ms) != set(bits):
        raise PlanError("device profile: shard_bytes, shard_read_ms and shard_decode_ms cover different bitwidths")
    missing = [b for b in bits if b not in importance.bits_error]
    if missing:
        raise PlanError(f"the importance profile has no error figure for {missing} bits that the device "
                        f"profile stores: the profiles are of different stores or shapes")
    io = {b: arg_float(device.io_ms(b), f"device io_ms({b})") for b in bits}
    nbytes = {b: arg_float(device.shard_bytes[b], f"device shard_bytes[{b}]") for b in bits}
    err = {b: arg_float(importance.bits_error[b], f"importance bits_error[{b}]") for b in bits}
    if min(io.values()) < 0 or min(nbytes.values()) < 0 or min(err.values()) < 0:
        raise PlanError("profiles: IO times, shard bytes and bit errors must be >= 0")
    return bits, io, nbytes, err


def _candidates(importance: ImportanceProfile, n_layers: int, n_shards: int, prune: bool) -> list:
    """The (n, m, accuracy) the elastic model was evaluated at; only the whole model when
    the plan may not prune."""
    cands = []
    for key, acc in importance.submodel_accuracy.items():
        try:
            n, m = parse_grid_key(key)
        except ValueError:
            raise PlanError(f"importance profile: submodel key {key!r} is not 'n,m'") from None
        if not (1 <= n <= n_layers and 1 <= m <= n_shards):
            raise PlanError(f"importance profile: submodel {key} does not fit the {n_layers} x {n_shards} "
                            f"shard table: the profiles are of different shapes")
        cands.append((n, m, arg_float(acc, f"importance submodel_accuracy[{key}]")))
    if not prune:
        cands = [c for c in cands if (c[0], c[1]) == (n_layers, n_shards)]
        if not cands:
            raise PlanError(f"importance profile: no accuracy for the whole model ({n_layers},{n_shards}), "
                            "which a plan that may not prune needs")
    if not cands:
        raise PlanError("importance profile: no submodel accuracies, nothing to plan from")
    return sorted(cands, key=lambda c: (c[0], c[1]))


def hull_path(bits, start, cost: dict, err: dict) -> list:
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


def aib_slack(K: int, C: float, layer_io) -> list[float]:
    """Accumulated-IO-budget slack of executed layers 1..K: k*C - IO of layers 1..k (layer
    0's IO shifts both sides)."""
    out, io = [], 0.0
    for k in range(K):
        io += layer_io[k]
        out.append((k + 1) * C - io)
    return out


def predicted_memory(streamed: list[float], fp32_shard: float, n_shards: int, seq_len: int,
                     hidden: float) -> tuple[float, float]:
    """(in flight, working set) bytes of a plan that streams `streamed[k]` packed bytes in
    its k-th layer. In flight: two consecutive layers' streamed bytes (one read while the
    other is computed) and one fp32 shard of slack. Working set: the activations, and the
    engine's shard groups, a quarter of an fp32 layer's weights in either compute dtype (in
    bfloat16 they hold twice the shards), allocated when it opens (groups.group_sizes)."""
    pairs = [streamed[k] + streamed[k + 1] for k in range(len(streamed) - 1)] or streamed
    inflight = float(max(pairs) + fp32_shard if any(streamed) else 0.0)
    groups = fp32_shard * n_shards / 4
    return inflight, 4.0 * seq_len * hidden * 8 + groups


def accuracy(P: Problem, n: int, m: int, layers, bits) -> float:
    imp = P.importance
    penalty = 0.0
    for layer, row in zip(layers, bits):
        for j in range(m):
            penalty += imp.shard_penalty(layer, j, row[j])
    return imp.submodel_acc(n, m) - penalty


def assemble(P: Problem, planner: str, n: int, m: int, bits, held: dict) -> Plan:
    """Build the Plan of a decision: bits[k][j] per executed layer, held[(layer, shard)] = bits."""
    layers = P.layers(n)
    bits = tuple(tuple(int(b) for b in row) for row in bits)
    preload = tuple(sorted((layer, j, int(b)) for (layer, j), b in held.items()))
    timeline = simulate(layers, m, bits, preload, P.device, P.seq_len, embed_ms=P.embed_ms, setup_ms=0.0)
    latency = timeline[-1].compute_end + P.head_ms
    preload_bytes = float(sum(P.nbytes[b] for _, _, b in preload))
    streamed = [sum(P.nbytes[b] for j, b in enumerate(row) if (layer, j) not in held)
                for layer, row in zip(layers, bits)]
    inflight, working = predicted_memory(streamed, P.fp32_bytes, P.n_shards, P.seq_len, P.hidden)
    plan = Plan(
        PlanRequest(planner=planner, store_id=P.device.store_id, device_id=P.device_id,
                    importance_id=P.importance_id, target_ms=P.target_ms, memory_bytes=P.memory_bytes,
                    seq_len=P.seq_len, fixed_bytes=P.fixed_bytes, model_layers=P.n_layers, model_shards=P.n_shards,
                    prune=P.prune),
        PlanChoice(n=n, m=m, layers=layers, bits=bits, preload=preload),
        PlanPrediction(latency_ms=latency, accuracy=accuracy(P, n, m, layers, bits),
                       submodel_accuracy=P.importance.submodel_acc(n, m), full_accuracy=P.importance.full_accuracy,
                       embed_ms=P.embed_ms, head_ms=P.head_ms, preload_bytes=preload_bytes, inflight_bytes=inflight,
                       working_bytes=working, resident_bytes=preload_bytes + P.fixed_bytes + inflight + working,
                       timeline=timeline))
    # the planners' bookkeeping and the timeline must agree; a mismatch is a bug, not bad input
    budget = P.buffer_bytes
    if latency > P.target_ms + TOL_MS or preload_bytes > budget + 1e-6 * max(1.0, budget):
        raise PlanError(f"internal error: the {planner} planner produced a plan its own timeline rejects "
                        f"(latency {latency} ms, preload {preload_bytes} B); please report this")
    if planner == "paper" and not plan.is_stall_free:
        raise PlanError("internal error: the paper planner produced a plan that stalls; please report this")
    return plan
