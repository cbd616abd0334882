"""What the engine tells about each request: the answer, and how it was reached."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass
class LayerReport:
    layer: int
    shards: int = 0
    shard_ids: list[int] = field(default_factory=list)  # the shards actually used (after the guard)
    bits: list[int] = field(default_factory=list)
    io_ms: float = 0.0        # IO lane: reading this layer's streamed shards
    decode_ms: float = 0.0    # IO lane: decoding the heads of its shards (streamed and preloaded)
    decode_end_ms: float = 0.0  # when its last shard (head or FFN slice) was decoded
    group_wait_ms: float = 0.0  # IO lane: the decoder waiting for the compute lane to free a group
    compute_ms: float = 0.0
    stall_ms: float = 0.0     # compute lane waiting for the IO lane
    start_ms: float = 0.0
    end_ms: float = 0.0

    @property
    def busy_ms(self) -> float:
        """Its span on the compute lane less its waits for IO."""
        return self.end_ms - self.start_ms - self.stall_ms


@dataclass
class Report:
    latency_ms: float = 0.0        # from the call (tokenizing included) to the answer
    setup_ms: float = 0.0          # from the call until the lanes start: tokenizing, the report, the lanes
    planned_ms: float = 0.0        # the plan's prediction at its sequence length (plan.request.seq_len)
    plan_tokens: int = 0           # that length: the plan of this request's length bucket was made for it
    predicted_ms: float = 0.0      # the same plan's prediction at this request's length
    target_ms: float = 0.0
    tokens: int = 0
    width: int = 0                 # tokens computed on: `tokens`, or the padded length the engine pads to
    truncated: bool = False
    embed_ms: float = 0.0          # compute lane: from its start until the embeddings are done
    embed_read_ms: float = 0.0     # IO lane: getting the embedding rows (resident ones, and reads)
    embed_hits: int = 0            # distinct tokens whose word rows were resident (rowcache.py)
    embed_misses: int = 0          # distinct tokens whose word rows were read from the store
    head_ms: float = 0.0
    read_ms: float = 0.0           # IO lane: reading the streamed shards, all layers
    read_profiled_ms: float = 0.0  # the device profile's time for those reads
    replanned: dict | None = None  # the first request served after new plans: the engine's history entry
    layers: list[LayerReport] = field(default_factory=list)
    guard_changes: list[tuple] = field(default_factory=list)  # (layer, shard, planned bits, bits or None)
    peak_model_bytes: int = 0      # our accounting: preload + resident parts + shards in flight
    preload_bytes: int = 0
    rss_growth_bytes: int = 0      # process peak RSS during the request minus RSS before
    spans: list[tuple] = field(default_factory=list)  # (lane, name, start_ms, end_ms) for traces

    @property
    def stall_ms(self) -> float:
        return sum(r.stall_ms for r in self.layers)

    @property
    def met_deadline(self) -> bool:
        return self.latency_ms <= self.target_ms

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(stall_ms=self.stall_ms, met_deadline=self.met_deadline)
        return d


@dataclass
class Result:
    label: str
    probs: list[float]
    logits: torch.Tensor
    report: Report
