"""Measuring the device profile: how fast this machine reads, decodes and computes.

Everything is timed with the code the engine runs (the store's reader in the chosen storage
mode, the decoder filling shard groups in the compute dtype, the compute lane's group-by-group
layer), and each figure is a median of repeated measurements, because the machines we run on
are shared and noisy.
"""

from __future__ import annotations

import datetime
import itertools
import os
import platform
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from .encoder import attention_keep, head_logits
from .groups import ATTN, DTYPES, FFN, ShardGroup, group_sizes, layer_by_groups
from .errors import Cancelled, InputError
from .profiles import DeviceProfile
from .store import Store


Progress = Callable[[int, int], bool]
COMPUTE_LENGTHS = (8, 16, 32, 64, 128)


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def sample_shards(store: Store, count: int) -> list[tuple[int, int]]:
    """(layer, shard) pairs spread over the model, the same for every bitwidth."""
    c = store.config
    pairs = [(i, j) for i in range(c.num_layers) for j in range(c.num_shards)]
    step = max(1, len(pairs) // count)
    return pairs[::step][:count]


class Background:
    """Runs `work()` over and over in a thread for the span of a `with` block. Each lane is
    timed beside the other lane's work: in the engine they share the cores and the Python
    interpreter, and a read, a decode or a layer timed on an idle machine under-states what
    it costs there (measured: a layer 15-25% slower beside a busy IO lane)."""

    def __init__(self, work: Callable[[], object]):
        self._work, self._stop = work, threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sti-profile-load", daemon=True)
        self._error: BaseException | None = None

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stop.is_set():
                    self._work()
        except BaseException as exc:  # re-raised by __exit__: a load that died measured nothing
            self._error = exc

    def __enter__(self) -> "Background":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error


def compute_load(store: Store, seq_len: int, dtype: str) -> Background:
    """The compute lane's work: every layer in turn, group by group."""
    layers = layer_groups(store, range(store.config.num_layers), dtype)
    x = torch.randn(1, seq_len, store.config.hidden_size)
    keep = attention_keep(torch.ones(1, seq_len))
    turn = itertools.cycle(layers)

    def one() -> None:
        attn, ffn, shared = next(turn)
        layer_by_groups(x, keep, _whole(attn), _whole(ffn), shared, store.config)
    return Background(one)


def io_load(store: Store, dtype: str) -> Background:
    """The IO side's work: read shards in turn, verify them and decode them into a group."""
    c, bits = store.config, compute_bits(store)
    turn = itertools.cycle([store.shard_record(i, j, bits) for i in range(c.num_layers) for j in range(c.num_shards)])
    groups = _scratch_groups(c, dtype)

    def one() -> None:
        rec = next(turn)
        _fill_groups(store, rec, store.read(rec), groups)
    return Background(one)


def _scratch_groups(config, dtype: str) -> dict:
    return {phase: ShardGroup(phase, 1, config, DTYPES[dtype]) for phase in (ATTN, FFN)}


def _fill_groups(store: Store, rec, buf, groups: dict) -> None:
    """What the engine's decoder does with one shard: its head, then its FFN slice, each
    decoded into a group slot."""
    for phase in (ATTN, FFN):
        groups[phase].clear()
        groups[phase].fill(None, store, rec, buf)


def measure_io(store: Store, count: int, load: Background | None = None,
               dtype: str = "float32") -> tuple[dict, dict, dict]:
    """Per bitwidth: record bytes, median read time, and median time to decode the whole
    shard into groups in `dtype` (the decoder's work). With `load`, the timing runs beside it."""
    if load is not None:
        with load:
            return measure_io(store, count, dtype=dtype)
    groups = _scratch_groups(store.config, dtype)
    sizes, reads, decodes = {}, {}, {}
    pairs = sample_shards(store, count)
    for b in store.bits:
        recs = [store.shard_record(i, j, b) for i, j in pairs]
        if store.reader.mode == "warm":
            for r in recs:
                store.read(r)  # warm means: already in the page cache
        read_t, dec_t = [], []
        for r in recs:
            t0 = time.perf_counter()
            buf = store.read(r)
            t1 = time.perf_counter()
            _fill_groups(store, r, buf, groups)
            t2 = time.perf_counter()
            read_t.append((t1 - t0) * 1e3)
            dec_t.append((t2 - t1) * 1e3)
        sizes[b] = float(np.median([r.length for r in recs]))
        reads[b], decodes[b] = float(np.median(read_t)), float(np.median(dec_t))
    return sizes, reads, decodes


def compute_bits(store: Store) -> int:
    """The bitwidth of the shards the compute figures use: the middle of the packed bitwidths
    (the groups hold decoded weights, so compute does not depend on it)."""
    packed = [b for b in store.bits if b != 32]
    return packed[len(packed) // 2] if packed else 32


# Layers the compute measurements cycle through: a tight loop over one layer's weights runs
# from a warm cache and under-states the engine, which meets every layer's weights once.
COMPUTE_LAYERS = 4


def layer_groups(store: Store, layer_ids, dtype: str) -> list[tuple]:
    """(attention groups, FFN groups, shared) of the given layers at `compute_bits`, each
    group with the engine's group size, ready for `layer_by_groups` with any shard count."""
    bits, out, c = compute_bits(store), [], store.config
    sizes = dict(zip((ATTN, FFN), group_sizes(c, DTYPES[dtype])))
    for i in list(layer_ids)[:COMPUTE_LAYERS]:
        recs = [store.shard_record(i, j, bits) for j in range(c.num_shards)]
        groups = {ATTN: [], FFN: []}
        for j, r in enumerate(recs):
            buf = store.read(r)
            for phase in (ATTN, FFN):
                if j % sizes[phase] == 0:
                    groups[phase].append(ShardGroup(phase, sizes[phase], c, DTYPES[dtype]))
                groups[phase][-1].fill(j, store, r, buf)
        out.append((groups[ATTN], groups[FFN], store.layer_shared(i)))
    return out


def _whole(groups: list) -> list:
    return [(g, len(g.shards)) for g in groups]


def first_shards(groups: list, m: int, size: int) -> list:
    """(group, shards used) covering the first m shards."""
    return [(g, min(size, m - k * size)) for k, g in enumerate(groups) if k * size < m]


# bfloat16 is chosen only when it computes a layer clearly faster: it is not exact (on the
# real MiniLM model its logits are within 0.05 of float32's, no label changed; see
# docs/MEASUREMENTS.md), so a tie goes to float32
DTYPE_MARGIN = 0.9


def choose_dtype(store: Store, seq_len: int, repeat: int) -> tuple[str, dict[str, float]]:
    """The compute dtype the engine runs fastest in on this machine, and what each took: a
    whole layer (every shard), group by group as the compute lane runs it, at `seq_len`.
    The dtypes take turns, so that a drift of the machine's speed favours neither."""
    c = store.config
    x, keep = torch.randn(1, seq_len, c.hidden_size), attention_keep(torch.ones(1, seq_len))
    turns = {dtype: itertools.cycle(layer_groups(store, range(c.num_layers), dtype)) for dtype in DTYPES}
    times: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}

    def run(dtype: str) -> None:
        attn, ffn, shared = next(turns[dtype])
        layer_by_groups(x, keep, _whole(attn), _whole(ffn), shared, c)
    with torch.inference_mode():
        for dtype in DTYPES:
            run(dtype)  # warm-up
        for _ in range(max(repeat, 9)):
            for dtype in DTYPES:
                times[dtype].append(median_ms(lambda: run(dtype), 1))
    took = {dtype: float(np.median(t)) for dtype, t in times.items()}
    fast = "bfloat16" if took["bfloat16"] < DTYPE_MARGIN * took["float32"] else "float32"
    return fast, took


def measure_compute(store: Store, ms: list[int], lengths: tuple[int, ...], repeat: int,
                    tick, load: Background | None = None, dtype: str = "float32") -> list[tuple[int, int, float]]:
    """(m, L, median ms) of one layer with m shards at sequence length L, as the compute
    lane runs it (group by group from decoded groups), cycling through layers so the caches
    are as cold as in the engine. With `load`, beside it."""
    if load is not None:
        with load:
            return measure_compute(store, ms, lengths, repeat, tick, dtype=dtype)
    c = store.config
    size_a, size_f = group_sizes(c, DTYPES[dtype])
    layers = layer_groups(store, range(c.num_layers), dtype)
    out = []
    with torch.inference_mode():
        for length in lengths:
            x = torch.randn(1, length, c.hidden_size)
            keep = attention_keep(torch.ones(1, length))
            for m in ms:
                turn = itertools.cycle(layers)

                def run():
                    attn, ffn, shared = next(turn)
                    layer_by_groups(x, keep, first_shards(attn, m, size_a), first_shards(ffn, m, size_f), shared, c)
                run()  # warm-up
                out.append((m, length, median_ms(run, repeat)))
                tick()
    return out


def fit_compute(points: list[tuple[int, int, float]]) -> tuple[tuple[float, ...], float]:
    """Least squares t = c0 + c1*L + c2*m*L + c3*m*L^2 + c4*m, weighted to fit relative
    error; returns the coefficients and the median relative error of the fit."""
    a = np.array([[1.0, L, m * L, m * L * L, m] for m, L, _ in points])
    t = np.array([p[2] for p in points])
    w = 1.0 / np.maximum(t, 1e-3)
    coef, *_ = np.linalg.lstsq(a * w[:, None], t * w, rcond=None)
    err = np.abs(a @ coef - t) / t
    return tuple(float(x) for x in coef), float(np.median(err))


def measure_embed(store: Store, repeat: int) -> tuple[float, float]:
    """Reading the embedding rows of a request: fixed + per-token cost (ms)."""
    c = store.config
    rng = np.random.default_rng(0)
    pts = []
    for n in (4, 16, 64):
        n = min(n, c.max_tokens)
        times = []
        for _ in range(repeat):
            ids = rng.integers(0, c.vocab_size, n).tolist()
            t = time.perf_counter()
            store.table_rows("word", ids)
            store.table_rows("position", range(c.position_offset, c.position_offset + n))
            times.append((time.perf_counter() - t) * 1e3)
        pts.append((n, float(np.median(times))))
    slope, fixed = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)
    return max(0.0, float(fixed)), max(0.0, float(slope))


def measure_head(store: Store, seq_len: int, repeat: int) -> float:
    """Embedding LayerNorm + the model's head (pooling, dense layer, classifier) at seq_len."""
    c, head, misc = store.config, store.head(), store.embed_misc()
    x = torch.randn(1, seq_len, c.hidden_size)
    mask = torch.ones(1, seq_len)

    def run():
        y = F.layer_norm(x, (c.hidden_size,), misc["ln_w"], misc["ln_b"], c.layer_norm_eps)
        head_logits(head, y, mask)
    with torch.inference_mode():
        return median_ms(run, repeat)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__}


def measure_device(store_dir: str | Path, storage: str = "cold", seq_len: int = 64,
                   threads: int | None = None, samples: int = 24, repeat: int = 7,
                   progress: Progress | None = None, compute_from: DeviceProfile | None = None,
                   under_load: bool = True, compute_dtype: str = "auto") -> DeviceProfile:
    """Measure this machine for the store at `store_dir` with the given storage mode.
    `compute_from`, a profile of the same store and threads, lends its compute figures, so
    profiling another storage only times the IO (with `under_load`, those figures were taken
    beside the lending profile's storage, not this one's).
    `under_load` times each lane beside the other's work, as the engine runs them.
    `compute_dtype` is what the engine will decode into and multiply in: float32, bfloat16,
    or "auto", the faster of the two here (`choose_dtype`; with `compute_from`, its choice)."""
    if compute_dtype not in (*DTYPES, "auto"):
        raise InputError(f"compute dtype must be auto or one of {', '.join(DTYPES)}, got {compute_dtype!r}")
    if not isinstance(seq_len, int) or not 1 <= seq_len <= 4096:
        raise InputError(f"seq_len must be an integer in 1..4096, got {seq_len!r}")
    threads = threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    with Store(store_dir, storage) as store:
        c = store.config
        ms = sorted({1, max(1, c.num_shards // 4), c.num_shards // 2, 3 * c.num_shards // 4, c.num_shards})
        lengths = tuple(sorted({*COMPUTE_LENGTHS, seq_len}))
        total, done = 3 + len(ms) * len(lengths), 0

        def tick(n: int = 1) -> None:
            nonlocal done
            done += n
            if progress is not None and progress(done, total) is False:
                raise Cancelled("device profiling cancelled; nothing was saved")

        lends = compute_from is not None and compute_from.store_id == store.store_id and compute_from.threads == threads
        dtype_ms = {}
        if compute_dtype == "auto" and lends:
            compute_dtype, dtype_ms = compute_from.compute_dtype, compute_from.dtype_layer_ms
        elif compute_dtype == "auto":
            compute_dtype, dtype_ms = choose_dtype(store, seq_len, repeat)
        sizes, reads, decodes = measure_io(store, samples, compute_load(store, seq_len, compute_dtype)
                                           if under_load else None, compute_dtype)
        layer_recs = [store.layers[i] for i in sorted(store.layers)]
        layer_ms = float(np.median([median_ms(lambda r=r: store.read(r), 3) for r in layer_recs]))
        tick()
        embed_ms = measure_embed(store, repeat)
        tick()
        if lends and compute_from.compute_dtype == compute_dtype:
            coef, fit_err, head_ms = compute_from.compute_coef, compute_from.compute_fit_error, compute_from.head_ms
            tick(total - done)
        else:
            points = measure_compute(store, ms, lengths, repeat, tick, io_load(store, compute_dtype) if under_load else None,
                                     compute_dtype)
            coef, fit_err = fit_compute(points)
            head_ms = measure_head(store, seq_len, repeat)
            tick()
        return DeviceProfile(
            store_id=store.store_id, storage=store.reader.mode, threads=threads, seq_len=seq_len,
            shard_bytes=sizes, shard_read_ms=reads, shard_decode_ms=decodes, layer_read_ms=layer_ms,
            compute_coef=coef, compute_fit_error=fit_err, embed_ms=embed_ms, head_ms=head_ms,
            io_under_load=under_load, compute_dtype=compute_dtype, dtype_layer_ms=dtype_ms, machine=machine(), created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
