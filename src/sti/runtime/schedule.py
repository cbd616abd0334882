"""A plan as the engine walks it: its shards per layer in IO order, with the times the plan
expects them ready and each layer due (both from the plan's own timeline). An engine with
length-aware plans holds one schedule per plan and walks the one of each request's length."""

from __future__ import annotations

from dataclasses import dataclass

from ..planning import Plan


@dataclass(frozen=True)
class Step:
    """One shard of the plan, in IO order."""
    pos: int               # index of its layer in the plan
    layer: int
    shard: int
    bits: int
    preloaded: bool
    ready_ms: float        # when the plan expects the IO lane to have it
    rank: int              # 0 = the most important shard of its layer

    @property
    def shard_key(self) -> tuple[int, int]:
        return (self.layer, self.shard)


@dataclass(frozen=True)
class Schedule:
    plan: Plan
    steps: list[list[Step]]    # per executed layer, in IO order
    due: list[float]           # per executed layer, its planned start

    @property
    def io_prior_ms(self) -> float:
        """One layer's worth of planned IO (the IO pace starts as if it had run on time)."""
        return self.plan.io_ms / max(1, len(self.steps))

    @property
    def spare_ms(self) -> float:
        """T - planned latency (never negative)."""
        return max(0.0, self.plan.spare_ms)


def schedule(plan: Plan) -> Schedule:
    """The plan's steps per executed layer, and each layer's due time (its planned start)."""
    preload = {(layer, shard) for layer, shard, _ in plan.choice.preload}
    layers = []
    for pos, (layer, shards, bits, t) in enumerate(zip(plan.choice.layers, plan.shards, plan.choice.bits,
                                                         plan.predicted.timeline)):
        layers.append([Step(pos, layer, shard, b, (layer, shard) in preload, ready, rank)
                       for rank, (shard, b, ready) in enumerate(zip(shards, bits, t.ready_ms))])
    return Schedule(plan, layers, [t.compute_start for t in plan.predicted.timeline])
