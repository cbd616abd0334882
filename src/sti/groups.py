"""Shard groups: the decoded weights of several shards of one layer, packed side by side so
that the compute lane runs them in a few large ops instead of a dozen small ones per shard.

A layer's attention output is a sum over its heads and its FFN output a sum over its
slices, so any set of shards can be computed together: stack the heads' q, k and v rows
into one projection, run one attention call over all of them, and multiply by their
output columns at once (likewise the FFN slices' in rows and out columns). Shards are
packed in arrival order, so a shard the deadline guard skipped before it was decoded leaves
no hole; one it dropped after is left out by computing the runs of slots around it.

The weights are held in `dtype`: float32, or bfloat16, which this CPU multiplies about
twice as fast (activations are cast for the multiplications only; residuals and
LayerNorms stay float32). Which one a store runs with is measured into its device profile.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import codec as codecs
from .config import ModelConfig

ATTN, FFN = "attn", "ffn"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _bits(t: torch.Tensor) -> np.ndarray:
    """The array the codec's kernels write: the tensor's own memory, float32 or, for
    bfloat16, its 16-bit patterns."""
    return t.numpy() if t.dtype == torch.float32 else t.view(torch.int16).numpy().view(np.uint16)


def phase_elements(phase: str, size: int, config: ModelConfig) -> int:
    """Weights (and biases) a group of `size` shards of a phase holds."""
    hd, fs, h = config.head_dim, config.ffn_slice, config.hidden_size
    return size * (4 * hd * h + 3 * hd) if phase == ATTN else size * (2 * fs * h + fs)


class ShardGroup:
    """Room for `size` shards' weights of one phase (attention or FFN), filled in order; in
    its own memory, or in a `slab` it shares with a group of the other phase (never both in
    use at once: see `runtime.memory.GroupPool`)."""

    def __init__(self, phase: str, size: int, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 slab: torch.Tensor | None = None, scratch: torch.Tensor | None = None):
        hd, fs, h = config.head_dim, config.ffn_slice, config.hidden_size
        self.phase, self.size, self.head_dim = phase, size, hd
        n = phase_elements(phase, size, config)
        self.slab = torch.empty(n, dtype=dtype) if slab is None else slab
        rows = (3, hd) if phase == ATTN else (fs,)
        self.cols = rows[-1]  # the output matrix's columns one shard owns
        # per head: q, k, v rows [3, hd, h] and biases; per FFN slice: FFN-in rows [fs, h]
        # and bias; the output projection (or FFN-out) of all slots as one matrix [h,
        # size * cols], slot g owning columns g*cols.. (a slot's part is written row by row
        # into its block, never transposed)
        shapes = [(size, *rows, h), (size, *rows), (h, size * self.cols)]
        views, at = [], 0
        for shape in shapes:
            count = math.prod(shape)
            views.append(self.slab[at:at + count].view(shape))
            at += count
        self.w, self.b, self.out = views
        # a slot's output columns decode here, then are copied into their block row by row
        # (`scratch`, if given, is shared: one decoder fills one group at a time)
        self.scratch = torch.empty(h * rows[-1], dtype=dtype) if scratch is None else scratch
        self.flat, self.flat_scratch = _bits(self.slab), _bits(self.scratch)
        self.shards: list = []   # what fills each slot, in order (the caller's records)
        self._targets: dict[int, dict] = {}
        self._batches: dict[tuple, list] = {}
        self._views: dict[tuple[int, int], tuple] = {}

    @property
    def full(self) -> bool:
        return len(self.shards) == self.size

    def columns(self, start: int, n: int) -> torch.Tensor:
        """The output matrix's columns of slots start..start+n-1: [h, n * cols] (a view)."""
        return self.out[:, start * self.cols:(start + n) * self.cols]

    def add(self, shard, parts: dict[str, torch.Tensor]) -> None:
        """Copy one shard's decoded tensors into the next slot (converting the dtype)."""
        g = len(self.shards)
        if self.phase == ATTN:
            for i, name in enumerate("qkv"):
                self.w[g, i].copy_(parts[f"{name}_w"])
                self.b[g, i].copy_(parts[f"{name}_b"])
            self.columns(g, 1).copy_(parts["o_w"])
        else:
            self.w[g].copy_(parts["i_w"])
            self.b[g].copy_(parts["i_b"])
            self.columns(g, 1).copy_(parts["f_w"])
        self.shards.append(shard)

    def fill(self, shard, store, rec, buf) -> None:
        """Decode one shard's record straight into the next slot, in the group's dtype, in
        one GIL-free call."""
        g = len(self.shards)
        store.decode_jobs(rec, buf, (self.phase, self.size, g), self._slot(g), self.flat, self.flat_scratch)
        self.shards.append(shard)

    def fill_many(self, items: list, store, arena: np.ndarray) -> None:
        """Decode several shards into the next slots, their records all held in `arena` (the
        engine's preload buffer; items: (shard, record, byte offset in arena)), in one
        GIL-free call per bitwidth: each call hands the GIL back and forth once, however many
        shards it decodes. The joined job tables are kept for the next request."""
        g0 = len(self.shards)
        key = (g0, tuple((rec.offset, at) for _, rec, at in items))  # `at`: a new buffer may move a record
        calls = self._batches.get(key)
        if calls is None:
            by_bits: dict[int, list] = {}
            for g, (_, rec, at) in enumerate(items, g0):
                jobs = store.jobs(rec, memoryview(arena)[at:at + rec.length], (self.phase, self.size, g), self._slot(g))
                by_bits.setdefault(rec.bits, []).append(codecs.shifted(jobs, at))
            calls = self._batches[key] = [(bits, np.concatenate(t)) for bits, t in by_bits.items()]
        for bits, jobs in calls:
            codecs.run_jobs(arena, jobs, bits, self.flat, self.flat_scratch)
        self.shards.extend(shard for shard, _, _ in items)

    def _slot(self, g: int) -> dict:
        """`targets(g)`, computed once."""
        if g not in self._targets:
            self._targets[g] = self.targets(g)
        return self._targets[g]

    def targets(self, g: int) -> dict:
        """Where slot g's parts go in the slab: part name -> (element offset, row stride;
        None for a contiguous part)."""
        at = lambda t: (t.data_ptr() - self.slab.data_ptr()) // self.slab.element_size()  # noqa: E731
        block = (at(self.columns(g, 1)), self.out.shape[1])
        if self.phase == ATTN:
            out = {f"{n}_{k}": (at(t[g, i]), None) for i, n in enumerate("qkv") for k, t in (("w", self.w), ("b", self.b))}
            return {**out, "o_w": block}
        return {"i_w": (at(self.w[g]), None), "i_b": (at(self.b[g]), None), "f_w": block}

    def clear(self) -> None:
        self.shards = []

    def accumulate(self, acc: torch.Tensor, x: torch.Tensor, keep: torch.Tensor | None, n: int,
                   start: int = 0) -> None:
        """Add the contribution of slots start..start+n-1 to `acc` [tokens, h] (float32, in
        place; `x` is [batch, seq, h])."""
        w, b, out = self._views.get((start, n)) or self._slots(start, n)
        if self.phase == ATTN:
            add_heads(acc, x, keep, w, b, out, self.head_dim)
        else:
            add_ffn_slices(acc, x, w, b, out)

    def _slots(self, start: int, n: int) -> tuple:
        """The weights of slots start..start+n-1 as the multiplications take them: the rows
        [n * rows, h], their biases, the output matrix's columns [h, n * cols]. Views made once
        and kept (a group serves for the engine's life): making them took a tenth of the
        compute lane's Python time, about 50 groups a request."""
        w, b = self.w[start:start + n], self.b[start:start + n]
        got = self._views[(start, n)] = (w.view(-1, w.shape[-1]), b.view(-1), self.columns(start, n))
        return got

    def runs(self, used) -> list[tuple[int, int]]:
        """(start, count) of each run of consecutive slots whose shard satisfies `used`: one
        run when the left-out shards are the last to arrive, as the deadline guard's are."""
        out, start = [], None
        for i, shard in enumerate(self.shards + [None]):
            if shard is not None and used(shard):
                start = i if start is None else start
            elif start is not None:
                out.append((start, i - start))
                start = None
        return out


def add_heads(acc: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
              out: torch.Tensor, hd: int) -> None:
    """Add the attention output of some heads of width hd at once to acc [bsz * s, h]: w [g *
    3 * hd, h] (each head's q, k, v rows), b [g * 3 * hd], out [h, g * hd] (the output
    projection's columns of these heads)."""
    bsz, s, h = x.shape
    g = out.shape[1] // hd
    y = F.linear(_as(x, w.dtype), w, b).view(bsz, s, g, 3, hd)
    q, k, v = y.permute(3, 0, 2, 1, 4).unbind(0)                        # [bsz, g, s, hd] each
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=1.0 / math.sqrt(hd))
    _add_product(acc, ctx.transpose(1, 2).reshape(bsz * s, g * hd), out)


def add_ffn_slices(acc: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """Add the FFN output of some slices at once to acc [bsz * s, h]: w [slices * fs, h]
    (in rows), b [slices * fs], out [h, slices * fs]."""
    hidden = F.gelu(F.linear(_as(x, w.dtype).reshape(-1, x.shape[-1]), w, b))
    _add_product(acc, hidden, out)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _add_product(acc: torch.Tensor, a: torch.Tensor, out: torch.Tensor) -> None:
    """acc += a @ out.T. In float32 one fused multiply-add into the accumulator (no
    temporary, no separate sum: at short lengths the per-op cost is a large part of a small
    group's time); bfloat16 groups multiply in bfloat16 and add in float32."""
    if out.dtype == acc.dtype:
        acc.addmm_(a, out.t())
    else:
        acc += F.linear(a, out).float()


def accumulator(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """What `ShardGroup.accumulate` adds into for input `x` [bsz, s, h]: `bias` on every
    token, [bsz * s, h] (`.view(x.shape)` gives the phase's output). A broadcast copy into
    new memory: `repeat` took 12.6 us at 26 tokens against 3.2, twice a layer."""
    return torch.empty(x.shape[0] * x.shape[1], bias.shape[-1], dtype=bias.dtype).copy_(bias)


def phase_sum(x: torch.Tensor, keep: torch.Tensor | None, groups: list[tuple["ShardGroup", int]],
              bias: torch.Tensor) -> torch.Tensor:
    """`bias` plus the contributions of (group, slots used) in order, [bsz, s, h]."""
    acc = accumulator(x, bias)
    for grp, n in groups:
        if n:
            grp.accumulate(acc, x, keep, n)
    return acc.view(x.shape)


def layer_by_groups(x: torch.Tensor, keep: torch.Tensor, attn: list[tuple[ShardGroup, int]],
                    ffn: list[tuple[ShardGroup, int]], shared, config: ModelConfig) -> torch.Tensor:
    """A layer computed group by group, as the engine does: `attn` and `ffn` hold (group,
    shards used) in order. Equal to `encoder.layer_forward` on the same shards up to float
    rounding (and bfloat16's, for bfloat16 groups)."""
    h, eps = config.hidden_size, config.layer_norm_eps
    x = F.layer_norm(x + phase_sum(x, keep, attn, shared.o_b), (h,), shared.ln1_w, shared.ln1_b, eps)
    return F.layer_norm(x + phase_sum(x, None, ffn, shared.f_b), (h,), shared.ln2_w, shared.ln2_b, eps)


def group_sizes(config: ModelConfig, dtype: torch.dtype, slabs: int = 2) -> tuple[int, int]:
    """(heads per attention group, slices per FFN group) when `slabs` slabs, each holding
    one group of either phase, fit a quarter of one float32 layer's weights (the decoded
    working set the engine allows itself): as many FFN slices as fit (at least one), and
    as many heads as take the same room."""
    quarter = config.layer_params          # bytes: a quarter of the layer's 4 bytes a weight
    width = torch.finfo(dtype).bits // 8
    ffn = max(1, min(config.num_shards, quarter // (slabs * width * phase_elements(FFN, 1, config))))
    attn = max(1, min(config.num_shards, round(phase_elements(FFN, ffn, config) / phase_elements(ATTN, 1, config))))
    return attn, ffn
