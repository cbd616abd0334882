"""The runtime: execute a plan on real storage and answer by the deadline.

Per request, two lanes run side by side (STI.md, key idea 6):
  - the IO lane (two threads owned by the engine) reads the request's embedding rows, then
    every streamed shard in plan order (read the record, verify its CRC), and decodes the
    attention head of every shard, streamed or preloaded, in plan order;
  - the compute lane (the caller's thread) embeds, then runs each layer shard by shard as
    soon as the shard it needs is ready: first every shard's attention head, then, after the
    layer's first LayerNorm, every shard's FFN_PARTS slice (decoded just before use). A
    shard's tensors are dropped as soon as they have been used, so the model bytes resident
    are the preload buffer plus the shards in flight, never a whole fp32 layer.
The preload buffer holds packed, CRC-verified shard records across requests.

Deadline guard (beyond the paper), on both lanes, against the layer's planned start plus a
share of the plan's spare time (T - planned latency; plans keep headroom for it):
  - before each read, the IO lane predicts when the rest of the current layer will be in (at
    the pace IO has actually run in this request); if that is too late it lowers their
    bitwidth (least important first), then skips the least important ones;
  - before each layer, the compute lane checks its own clock (a busy CPU, a slow start); if
    it is late it leaves out enough of the layer's least important shards to win the time
    back over the layers still to run.
Neither ever drops a layer's most important shard, and the report lists every change.
"""

from __future__ import annotations

import collections
import math
import queue
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from .encoder import attention_keep, embed, ffn_slice, head_logits, head_output
from .errors import InputError
from .planner import Plan, simulate
from .profiles import DeviceProfile
from .store import Record, Store
from .tokenizer import Tokenizer
from .weights import ATTN_PARTS, FFN_PARTS, Embeddings

GUARD_TOLERANCE_MS = 0.2   # how late the IO lane may run before the guard acts
GUARD_SHARE = 2 / 3        # share of the plan's spare time (T - planned latency) IO may use
PACE_MEMORY = 5            # recent requests whose compute pace seeds the next one's guard
HEADS_AHEAD = 4            # decoded heads the decoder may hold ahead of the compute lane


# --- the schedule: a plan as the engine walks it ---------------------------------------------
@dataclass(frozen=True)
class Step:
    """One shard of the plan, in IO order."""
    pos: int               # index of its layer in the plan
    layer: int
    shard: int
    bits: int
    preloaded: bool
    planned_end_ms: float  # when the plan expects it read and decoded (streamed steps)
    rank: int              # 0 = the most important shard of its layer

    @property
    def shard_key(self) -> tuple[int, int]:
        return (self.layer, self.shard)


def schedule(plan: Plan, device: DeviceProfile) -> tuple[list[list[Step]], list[float]]:
    """The plan's shards per layer, in IO order, with the time each should be ready, and
    each layer's due time (its planned compute start)."""
    preload = {(layer, shard) for layer, shard, _ in plan.preload}
    clock = plan.embed_ms
    layers, due = [], []
    for pos, (layer, shards, bits) in enumerate(zip(plan.layers, plan.shards, plan.bits)):
        steps = []
        for rank, (shard, b) in enumerate(zip(shards, bits)):
            held = (layer, shard) in preload
            if not held:
                clock += device.io_ms(b)
            steps.append(Step(pos, layer, shard, b, held, clock, rank))
        layers.append(steps)
        due.append(plan.timeline[pos].compute_start)
    return layers, due


# --- the report ---------------------------------------------------------------------------
@dataclass
class LayerReport:
    layer: int
    shards: int = 0
    shard_ids: list[int] = field(default_factory=list)  # the shards actually used (after the guard)
    bits: list[int] = field(default_factory=list)
    io_ms: float = 0.0        # IO lane: reading this layer's streamed shards
    decode_ms: float = 0.0    # IO lane: decoding the heads of its shards (streamed and preloaded)
    compute_ms: float = 0.0
    stall_ms: float = 0.0     # compute lane waiting for the IO lane
    start_ms: float = 0.0
    end_ms: float = 0.0


@dataclass
class Report:
    latency_ms: float = 0.0
    planned_ms: float = 0.0        # the plan's prediction at its sequence length (plan.seq_len)
    predicted_ms: float = 0.0      # the same plan's prediction at this request's length
    target_ms: float = 0.0
    tokens: int = 0
    truncated: bool = False
    embed_ms: float = 0.0
    head_ms: float = 0.0
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


# --- memory accounting ----------------------------------------------------------------------
class ModelBytes:
    """Bytes of model weights alive in memory, with the peak (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.now = self.peak = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.now += n
            self.peak = max(self.peak, self.now)

    def sub(self, n: int) -> None:
        with self._lock:
            self.now -= n

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.now


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _PeakRSS:
    """Process peak RSS over a span: Linux lets us reset the high-water mark (VmHWM)."""

    def __init__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = True
        except OSError:
            self.ok = False

    def growth(self) -> int:
        if self.ok:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return max(0, int(line.split()[1]) * 1024 - self.base)
        return max(0, self.proc.memory_info().rss - self.base)


# --- hand-off between the lanes ----------------------------------------------------------------
class _Mailbox:
    """What the IO lane has delivered for one request, keyed by (layer, shard) or 'embed'."""

    def __init__(self):
        self.cond = threading.Condition()
        self.items: dict = {}
        self.error: BaseException | None = None
        self.cancelled = False
        self.dropped: set = set()  # (layer, shard) the compute lane no longer wants
        self.skipped: set = set()  # (layer, shard) the IO lane's guard skipped

    def put(self, key, value) -> None:
        with self.cond:
            self.items[key] = value
            self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            self.error = exc
            self.cond.notify_all()

    def take(self, key):
        with self.cond:
            while key not in self.items:
                if self.error is not None:
                    raise self.error
                self.cond.wait()
            return self.items.pop(key)


SKIPPED = object()     # the deadline guard left the shard out: nothing to use
PRELOADED = object()   # the shard is in the preload buffer: nothing to read


class Window:
    """Bounds the packed bytes the IO lane may have read ahead of the compute lane: a read
    waits until enough earlier shards have been used (one record is always allowed)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()
        self.cancelled = False

    def acquire(self, n: int) -> None:
        with self.cond:
            while self.used > 0 and self.used + n > self.limit and not self.cancelled:
                self.cond.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def reset(self) -> None:
        with self.cond:
            self.used, self.cancelled = 0, False

    def cancel(self) -> None:
        with self.cond:
            self.cancelled = True
            self.cond.notify_all()


# --- the engine -------------------------------------------------------------------------------
class Engine:
    """Runs requests against one store with one plan. The preload buffer is loaded once and
    stays resident; requests are served one at a time (concurrent callers queue)."""

    def __init__(self, store: str | Path | Store, plan: Plan, device: DeviceProfile,
                 storage: str = "cold", guard: bool = True, threads: int | None = None,
                 max_length: int = 128, pad_to: int | None = None):
        self.store = store if isinstance(store, Store) else Store(store, storage)
        if plan.store_id != self.store.store_id:
            raise InputError(f"the plan was made for store {plan.store_id[:12]}, not {self.store.store_id[:12]}: "
                             "make a new plan for this store")
        missing = {b for row in plan.bits for b in row} | {b for _, _, b in plan.preload}
        missing -= set(self.store.bits) & set(device.bits)
        if missing:
            raise InputError(f"the plan uses bitwidths {sorted(missing)} that the store or the device profile "
                             f"lacks (store: {list(self.store.bits)}): make a new plan for this store")
        self.plan, self.device, self.guard = plan, device, guard
        self.pad_to = pad_to  # pad every request to this many tokens (the paper pads to 128)
        self.config = self.store.config
        self.threads = threads or device.threads
        # never longer than the model has position embeddings for
        self.tokenizer = Tokenizer(self.store.path, max_length=min(max_length, self.config.max_tokens))
        self.steps, self.due = schedule(plan, device)
        # the IO lane may run this late before the answer would miss T; a third of the spare
        # time is kept back for jitter and for work the profile does not see
        self.spare_ms = GUARD_SHARE * max(0.0, plan.target_ms - plan.latency_ms)
        # how much slower than the profile the compute lane ran in recent requests (their
        # median) is the compute guard's pace for a request until its own first layer is
        # done; the engine's first request pays for lazy initialisation and is left out
        self._slowdowns: collections.deque = collections.deque(maxlen=PACE_MEMORY)
        self._requests = 0
        # the IO pace starts as if one layer's worth of reads had run on time (see _Pace)
        streamed_ms = sum(device.io_ms(s.bits) for steps in self.steps for s in steps if not s.preloaded)
        self.io_prior_ms = streamed_ms / max(1, len(self.steps))
        self.closed = False
        self.bytes = ModelBytes()
        self._load_resident()
        records = [self.store.shard_record(s.layer, s.shard, b) for steps in self.steps for s in steps
                   for b in self.store.bits]
        # decoded bytes of each record's head and FFN_PARTS slice, by record offset (looked up
        # per shard per request: worked out once here)
        self.head_bytes = {r.offset: _blob_bytes(r, ATTN_PARTS) for r in records}
        self.ffn_bytes = {r.offset: _blob_bytes(r, FFN_PARTS) for r in records}
        biggest = max([self.store.shard_record(s.layer, s.shard, s.bits).length
                       for steps in self.steps for s in steps if not s.preloaded] or [0])
        self.window = Window(max(int(plan.inflight_bytes), 2 * biggest))
        self.heads = Window(HEADS_AHEAD * max(self.head_bytes.values(), default=0))
        self._lock = threading.Lock()
        self._report_lock = threading.Lock()
        self._predictions: dict[tuple[int, int], float] = {}
        self.rows_per_block = self.store.tables["position"][1]
        # two IO-side threads: the reader and the decoder (see _read_lane, _decode_lane)
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sti-io")

    # resident parts: layer records, head, embedding misc, and the preload buffer
    def _load_resident(self) -> None:
        s = self.store
        self.shared = {i: s.layer_shared(i) for i in self.plan.layers}
        self.head = s.head()
        self.misc = s.embed_misc()
        self.bytes.add(_nbytes([t for sh in self.shared.values() for t in vars(sh).values()]))
        self.bytes.add(_nbytes([*self.head.tensors().values(), *self.misc.values()]))
        self.preload: dict[tuple[int, int], tuple[Record, memoryview]] = {}
        for layer, shard, bits in self.plan.preload:
            rec = s.shard_record(layer, shard, bits)
            self.preload[(layer, shard)] = (rec, s.read(rec))
            self.bytes.add(rec.length)
        self.preload_bytes = sum(rec.length for rec, _ in self.preload.values())
        self.resident_bytes = self.bytes.now
        if self.preload_bytes > self.plan.memory_bytes:
            raise InputError(f"the preload buffer needs {self.preload_bytes} bytes, more than the plan's "
                             f"budget of {self.plan.memory_bytes}")

    def close(self) -> None:
        self.closed = True
        self._io.shutdown(wait=True)
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- one request ---
    def run(self, text: str) -> Result:
        if not isinstance(text, str):
            raise InputError(f"expected a text, got {type(text).__name__}")
        if self.closed:
            raise InputError("this engine is closed: open a new one")
        batch = self.tokenizer.encode([text], pad_to=self._pad_width())
        with self._lock, torch.inference_mode():
            torch.set_num_threads(self.threads)
            return self._run(batch)

    @property
    def compute_slowdown(self) -> float:
        """The median compute pace of recent requests (1.0 before there are any)."""
        return statistics.median(self._slowdowns) if self._slowdowns else 1.0

    def _pad_width(self) -> int | None:
        return None if self.pad_to is None else min(self.pad_to, self.tokenizer.max_length)

    def _run(self, batch) -> Result:
        rss = _PeakRSS()
        self.bytes.reset_peak()
        width, distinct = int(batch.input_ids.shape[1]), len(set(batch.input_ids[0].tolist()))
        report = Report(planned_ms=self.plan.latency_ms, predicted_ms=self._predicted_ms(width, distinct),
                        target_ms=self.plan.target_ms,
                        tokens=int(batch.attention_mask.sum()), truncated=batch.truncated[0],
                        preload_bytes=self.preload_bytes,
                        layers=[LayerReport(layer) for layer in self.plan.layers])
        box, t0 = _Mailbox(), time.perf_counter()
        self.window.reset()
        self.heads.reset()
        read = queue.SimpleQueue()
        lanes = [self._io.submit(self._read_lane, batch.input_ids[0], box, read, t0, report),
                 self._io.submit(self._decode_lane, box, read, t0, report)]
        try:
            logits = self._compute_lane(batch, box, t0, report)
        except BaseException:
            box.cancelled = True
            self.window.cancel()
            self.heads.cancel()
            for lane in lanes:
                lane.exception()  # wait for the IO side to stop before the next request
            self.bytes.now = self.resident_bytes  # what the failed request held is garbage now
            raise
        for lane in lanes:
            lane.result()
        report.latency_ms = (time.perf_counter() - t0) * 1e3
        report.peak_model_bytes = self.bytes.peak
        report.rss_growth_bytes = rss.growth()
        probs = torch.softmax(logits, -1)[0]
        label = self.config.labels[int(probs.argmax())]
        return Result(label, probs.tolist(), logits[0], report)

    def _predicted_ms(self, width: int, distinct: int) -> float:
        """The plan's latency for a request `width` tokens wide (padding included) holding
        `distinct` different tokens (the embedding rows it reads)."""
        key = (width, distinct)
        if key not in self._predictions:
            p, d = self.plan, self.device
            embed = d.embed_rows_ms(width, distinct, self.rows_per_block)
            timeline = simulate(p.layers, p.m, p.bits, p.preload, d, width, embed_ms=embed)
            self._predictions[key] = timeline[-1].compute_end + d.head_ms
        return self._predictions[key]

    # --- the IO lane: a reader and a decoder ---
    # The reader reads and verifies records in plan order, as far ahead as `window` allows
    # (packed bytes); the decoder turns each shard's head, streamed or preloaded, into
    # tensors, at most HEADS_AHEAD heads ahead of the compute lane (`heads`). Decoding in the
    # reader would hold a whole layer or two of fp32 heads in memory whenever IO runs ahead;
    # decoding in the compute lane would put it on the critical path.
    def _read_lane(self, ids: torch.Tensor, box: _Mailbox, out: queue.SimpleQueue, t0: float,
                   report: Report) -> None:
        now = lambda: (time.perf_counter() - t0) * 1e3  # noqa: E731
        try:
            a = now()
            words = self.store.table_rows("word", ids.tolist())
            off = self.config.position_offset
            position = self.store.table_rows("position", range(off, off + len(ids)))
            report.spans.append(("io", "embedding rows", a, now()))
            box.put("embed", (words, position))
            pace = _Pace(self.io_prior_ms)
            distinct = len(set(ids.tolist()))
            pace.add(self.device.embed_rows_ms(len(ids), distinct, self.rows_per_block), now() - a)
            for pos, steps in enumerate(self.steps):
                streamed = [s for s in steps if not s.preloaded]
                bits = {s.shard: s.bits for s in streamed}
                read = 0  # streamed shards of this layer already handed on
                for step in steps:
                    if box.cancelled:
                        return
                    if step.preloaded:  # no IO: the decoder takes it from the preload buffer
                        out.put((step, SKIPPED if step.shard_key in box.dropped else PRELOADED))
                        continue
                    rest, read = streamed[read:], read + 1
                    for s in rest:  # what the compute lane dropped needs no IO
                        if s.shard_key in box.dropped:
                            bits[s.shard] = None
                    if self.guard:
                        self._guard(rest, bits, now(), self.due[pos] + self.spare_ms, pace.slowdown(), report)
                        box.skipped |= {s.shard_key for s in rest if bits[s.shard] is None}
                    if bits[step.shard] is None:
                        out.put((step, SKIPPED))
                        continue
                    out.put((step, self._read(step, bits[step.shard], now, report.layers[pos], report, pace)))
        except BaseException as exc:  # the compute lane re-raises it
            box.fail(exc)
        finally:
            out.put(None)  # the decoder stops here

    def _read(self, step: Step, bits: int, now, lr: LayerReport, report: Report, pace: "_Pace"):
        """Read and verify one shard record (the window bounds the packed bytes in flight)."""
        rec = self.store.shard_record(step.layer, step.shard, bits)
        self.window.acquire(rec.length)
        a = now()
        buf = self.store.read(rec)
        b = now()
        self.bytes.add(rec.length)
        lr.io_ms += b - a
        pace.add(self.device.shard_read_ms[bits], b - a)
        report.spans.append(("io", f"read L{step.layer}.S{step.shard}@{bits}", a, b))
        return rec, buf

    def _decode_lane(self, box: _Mailbox, inbox: queue.SimpleQueue, t0: float, report: Report) -> None:
        now = lambda: (time.perf_counter() - t0) * 1e3  # noqa: E731
        try:
            while (item := inbox.get()) is not None:
                step, got = item
                if got is SKIPPED or box.cancelled:
                    box.put(step.shard_key, SKIPPED)
                    continue
                rec, buf = self.preload[step.shard_key] if got is PRELOADED else got
                head_bytes = self.head_bytes[rec.offset]
                self.heads.acquire(head_bytes)
                a = now()
                parts = self.store.decode_parts(rec, buf, ATTN_PARTS)
                b = now()
                self.bytes.add(head_bytes)
                self._add_decode(report.layers[step.pos], b - a)
                report.spans.append(("decode", f"decode L{step.layer}.S{step.shard}", a, b))
                box.put(step.shard_key, (rec, buf, parts))
        except BaseException as exc:
            box.fail(exc)

    def _add_decode(self, lr: LayerReport, ms: float) -> None:
        with self._report_lock:
            lr.decode_ms += ms

    def _guard(self, remaining: list[Step], bits: dict, now_ms: float, due_ms: float,
               slow: float, report: Report) -> None:
        """Lower bits, then skip shards, until the layer's remaining IO fits before it is due."""
        lowest = min(self.store.bits)

        def late() -> bool:
            io = sum(self.device.io_ms(bits[s.shard]) for s in remaining if bits[s.shard] is not None)
            return now_ms + slow * io > due_ms + GUARD_TOLERANCE_MS

        least_first = sorted(remaining, key=lambda s: -s.rank)
        for s in least_first:
            if not late():
                return
            if bits[s.shard] is not None and bits[s.shard] > lowest:
                report.guard_changes.append((s.layer, s.shard, bits[s.shard], lowest))
                bits[s.shard] = lowest
        if not self.plan.prune:  # a plain model runs whole: lower bits only, never skip
            return
        for s in least_first:
            if not late():
                return
            if s.rank > 0 and bits[s.shard] is not None:  # keep each layer's most important shard
                report.guard_changes.append((s.layer, s.shard, bits[s.shard], None))
                bits[s.shard] = None

    # --- the compute lane ---
    def _compute_lane(self, batch, box: _Mailbox, t0: float, report: Report) -> torch.Tensor:
        now = lambda: (time.perf_counter() - t0) * 1e3  # noqa: E731
        ids, mask = batch.input_ids, batch.attention_mask
        a = now()
        words, position = box.take("embed")
        emb = Embeddings(word=torch.empty(0), position=position, token_type=self.misc["token_type"],
                         ln_w=self.misc["ln_w"], ln_b=self.misc["ln_b"])
        x = embed(emb, ids, self.config, word_rows=words[None], position_rows=position)
        report.embed_ms = now() - a
        keep = attention_keep(mask)
        pace = _Pace()
        for pos, steps in enumerate(self.steps):
            slow = pace.slowdown() if pace.planned > 0 else self.compute_slowdown
            x = self._layer(x, keep, pos, steps, box, now, report.layers[pos], report, slow)
            pace.add(self.device.compute_ms(report.layers[pos].shards, x.shape[1]), report.layers[pos].compute_ms)
        self._requests += 1
        if self._requests > 1:
            self._slowdowns.append(pace.slowdown())
        a = now()
        logits = head_logits(self.head, x, mask)
        report.head_ms = now() - a
        return logits

    def _ready(self, step: Step, box: _Mailbox, now, lr: LayerReport, report: Report):
        """(record, bytes, head tensors) of the shard, waiting for the IO lane if need be;
        None if the deadline guard skipped it."""
        a = now()
        got = box.take(step.shard_key)
        waited = now() - a
        lr.stall_ms += waited
        if waited > 0.05:
            report.spans.append(("compute", f"wait L{step.layer}.S{step.shard}", a, a + waited))
        return None if got is SKIPPED else got

    def _layer(self, x, keep, pos: int, steps: list[Step], box: _Mailbox, now, lr: LayerReport,
               report: Report, slow: float = 1.0) -> torch.Tensor:
        """One layer, shard by shard: every head, the first LayerNorm, then every FFN_PARTS slice
        (decoded just before use). Each shard's tensors are dropped, and un-counted, as soon
        as they have been used, so at most one decoded FFN_PARTS slice exists at a time."""
        c, sh = self.config, self.shared[steps[0].layer]
        lr.start_ms = now()
        dropped = self._compute_guard(pos, steps, lr.start_ms, x.shape[1], box, report, slow) \
            if self.guard and self.plan.prune else set()
        box.dropped |= {s.shard_key for s in steps if s.shard in dropped}
        held, attn = [], torch.zeros_like(x)
        for step in steps:
            if step.shard in dropped:
                # let go of it in IO order: the decoder may be holding heads for it, and a
                # later shard the compute lane waits for may be queued behind them
                self._discard(step, box.take(step.shard_key))
                continue
            got = self._ready(step, box, now, lr, report)
            if got is None:
                continue
            rec, buf, head = got
            a = now()
            attn += head_output(x, keep, head, c.head_dim)
            del head
            self.bytes.sub(self.head_bytes[rec.offset])
            self.heads.release(self.head_bytes[rec.offset])
            held.append((step, rec, buf))
            lr.compute_ms += now() - a
            lr.shard_ids.append(step.shard)
            lr.bits.append(rec.bits)
        lr.shards = len(held)
        a = now()
        h = c.hidden_size
        x = F.layer_norm(x + attn + sh.o_b, (h,), sh.ln1_w, sh.ln1_b, c.layer_norm_eps)
        out = torch.zeros_like(x)
        while held:
            step, rec, buf = held.pop(0)
            ffn_bytes = self.ffn_bytes[rec.offset]
            self.bytes.add(ffn_bytes)
            out += ffn_slice(x, self.store.decode_parts(rec, buf, FFN_PARTS))
            self.bytes.sub(ffn_bytes + (0 if step.preloaded else rec.length))
            if not step.preloaded:
                self.window.release(rec.length)
            del buf
        x = F.layer_norm(x + out + sh.f_b, (h,), sh.ln2_w, sh.ln2_b, c.layer_norm_eps)
        lr.compute_ms += now() - a
        lr.end_ms = now()
        report.spans.append(("compute", f"layer {steps[0].layer}", lr.start_ms, lr.end_ms))
        return x

    def _compute_guard(self, pos: int, steps: list[Step], now_ms: float, width: int, box: _Mailbox,
                       report: Report, slow: float = 1.0) -> set[int]:
        """Shards of this layer to leave out because the compute lane runs late, or will at
        its pace: `slow` is how much slower than the profile it has run so far (in this
        request, or before its first layer is done the median of recent requests; beside the
        engine's own IO lane the first layers ran up to 2x slower than profiled). Enough of the least important shards that,
        dropped in this and each later layer alike, they win back the lateness now plus
        the lateness the pace adds over the layers left. Never a layer's most important
        shard, nor one the IO lane's guard already skipped (dropping it would save nothing)."""
        ahead = sum(self.device.compute_ms(len(later), width) for later in self.steps[pos:])
        late = now_ms - (self.due[pos] + self.spare_ms) + (slow - 1.0) * ahead - GUARD_TOLERANCE_MS
        if late <= 0 or len(steps) < 2:
            return set()
        m, layers_left = len(steps), len(self.steps) - pos
        per_shard = slow * (self.device.compute_ms(m, width) - self.device.compute_ms(m - 1, width))
        count = math.ceil(late / max(1e-3, per_shard * layers_left))
        candidates = [s for s in steps if s.rank > 0 and s.shard_key not in box.skipped]
        out = sorted(candidates, key=lambda s: -s.rank)[:count]
        report.guard_changes.extend((s.layer, s.shard, s.bits, None) for s in out)
        return {s.shard for s in out}

    def _discard(self, step: Step, got) -> None:
        """Free a shard the IO lane delivered after the compute lane dropped it (a preloaded
        record stays in the preload buffer; only its decoded head goes)."""
        if got is SKIPPED:
            return
        rec, buf, head = got
        self.bytes.sub(self.head_bytes[rec.offset] + (0 if step.preloaded else rec.length))
        self.heads.release(self.head_bytes[rec.offset])
        if not step.preloaded:
            self.window.release(rec.length)


SHARD_MATRICES = ("q_w", "k_w", "v_w", "o_w", "i_w", "f_w")


def _blob_bytes(rec: Record, names) -> int:
    """Bytes decoded out of the record's packed blobs among `names` (float32 parts are
    views into the record's buffer, counted with the buffer)."""
    return sum(4 * math.prod(p.shape) for p in rec.parts if p.name in names and p.encoding == "blob")


class _Pace:
    """How much slower than the profile a lane is running in this request. `prior_ms` of
    on-time work is counted in from the start, so that one short read that ran long (the
    embedding rows of a short request: 1.1 ms planned, 2.4 ms measured) does not make the
    guard take the whole request for 2x slow and skip shards it had time for."""

    def __init__(self, prior_ms: float = 0.0):
        self.planned = self.actual = prior_ms

    def add(self, planned_ms: float, actual_ms: float) -> None:
        self.planned += planned_ms
        self.actual += actual_ms

    def slowdown(self) -> float:
        return max(1.0, self.actual / self.planned) if self.planned > 0 else 1.0
