"""`make_plan`: the one entry point to both planners, with the headroom kept back for the
deadline guard and, for a request no plan meets, the smallest T and M that would do."""

from __future__ import annotations

import math
from dataclasses import replace

from ..profiles import DeviceProfile, ImportanceProfile
from . import joint, paper
from .bounds import grid_bounds
from .plan import MAX_MS, PLANNERS, Plan, PlanError
from .problem import Problem, arg_float, assemble


def make_plan(device: DeviceProfile, importance: ImportanceProfile, store_id: str, target_ms: float,
              memory_bytes: float, seq_len: int | None = None, planner: str = "joint", fixed_bytes: int = 0,
              hidden: float | None = None, headroom: float = 0.0, embed_tokens: int | None = None,
              prune: bool = True, embed_ms: float | None = None) -> Plan:
    """Plan a request of `seq_len` tokens to finish within `target_ms` with a preload buffer
    of at most `memory_bytes` (fixed_bytes included). `hidden` (the model's hidden size) is
    only used for the working-set estimate; by default it is inferred from the fp32 shard size.
    `headroom` (a fraction of T) is kept back: the plan's predicted latency is at most
    (1 - headroom) * T, and the runtime's deadline guard may spend the rest when IO runs late.
    `embed_tokens` (default seq_len) is how many distinct tokens' embedding rows to plan to
    read: a request padded to seq_len reads only its own tokens' rows; `embed_ms`, if given,
    is the embedding read time itself (rows held resident are not read). With `prune` False
    (a model not trained elastic) the plan keeps every layer and shard and chooses
    bitwidths and the preload buffer only."""
    if planner not in PLANNERS:
        raise PlanError(f"unknown planner {planner!r}: choose one of {', '.join(PLANNERS)}")
    headroom = arg_float(headroom, "headroom")
    if not 0.0 <= headroom < 1.0:
        raise PlanError(f"headroom must be a fraction in [0, 1), got {headroom!r}")
    if headroom > 0.0:
        return _with_headroom(device, importance, store_id, arg_float(target_ms, "target_ms"), memory_bytes,
                              seq_len, planner, fixed_bytes, hidden, headroom, embed_tokens, prune, embed_ms)
    P = Problem.of(device, importance, store_id, target_ms, memory_bytes, seq_len, fixed_bytes, hidden,
                   embed_tokens, prune, embed_ms)
    fam = joint.Families(P)
    if planner == "paper":
        best = paper.search(P)
    else:
        # the families start from the paper's buffer and streaming, but not from its exact
        # upgrades: evaluate the paper plan too, so that joint is never worse than paper
        bounds = grid_bounds(P, [c for c in P.candidates if P.base(c[0], c[1]) <= P.target_ms])
        theirs = paper.search(P, bounds)
        best = joint.search(P, fam, theirs[0] if theirs is not None else None, bounds)
        if best is None or (theirs is not None and theirs[0] > best[0]):
            best = theirs
    if best is None:
        _infeasible(P, fam, planner)
    _, n, m, rows, held = best
    return assemble(P, planner, n, m, rows, held)


def _with_headroom(device, importance, store_id, target_ms, memory_bytes, seq_len, planner, fixed_bytes,
                   hidden, headroom: float, embed_tokens, prune: bool, embed_ms) -> Plan:
    """A plan for (1 - headroom) * T, carrying T as its target; an impossible request is
    reported in the caller's terms (T, and the smallest T once the headroom is added back)."""
    if not 0 < target_ms <= MAX_MS:
        raise PlanError(f"target_ms must be > 0 and at most {MAX_MS:g}, got {target_ms!r}")
    try:
        plan = make_plan(device, importance, store_id, target_ms * (1 - headroom), memory_bytes, seq_len,
                         planner, fixed_bytes, hidden, embed_tokens=embed_tokens, prune=prune, embed_ms=embed_ms)
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
    return replace(plan, request=replace(plan.request, target_ms=float(target_ms)))


def _infeasible(P: Problem, fam: joint.Families, planner: str):
    t, mem = paper.limits(P) if planner == "paper" else joint.limits(P, fam)
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
    fixed = f" ({P.fixed_bytes} of them fixed)" if P.fixed_bytes else ""
    parts = [f"no {planner} plan meets T = {P.target_ms:g} ms with M = {P.memory_bytes} bytes{fixed}"]
    if t_rep is not None:
        parts.append(f"the smallest feasible T for this M is {t_rep:.3f} ms")
    else:
        parts.append("no T is feasible with this M" + (" (the fixed bytes alone exceed it)" if P.buffer_bytes < 0 else ""))
    if mem_rep is not None:
        parts.append(f"the smallest feasible M for this T is {mem_rep} bytes")
    else:
        fastest = min(P.base(n, m) for n, m, _ in P.candidates)
        parts.append(f"no M is feasible for this T (the fastest submodel's compute alone takes {fastest:.3f} ms)")
    raise PlanError("; ".join(parts), min_target_ms=t_rep, min_memory_bytes=mem_rep)
