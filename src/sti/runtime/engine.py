"""The engine: execute a plan on real storage and answer by the deadline.

Per request, three lanes run side by side (the execution model of docs/DESIGN.md):
  - the reader (an IO thread) reads the request's embedding rows, then every streamed shard
    in plan order (read the record, verify its CRC), at most `window` packed bytes ahead;
  - the decoder (a second IO thread) decodes the attention head of every shard, streamed
    or preloaded, in plan order, at most HEADS_AHEAD heads ahead of the compute lane;
  - the compute lane (the caller's thread) embeds, then runs each layer shard by shard as
    soon as the shard it needs is ready: every shard's head, the layer's first LayerNorm,
    then every shard's FFN slice (decoded just before use).
Decoding in the reader would hold a layer or two of fp32 heads whenever IO runs ahead;
decoding in the compute lane would put it on the critical path. A shard's tensors are
dropped as soon as they have been used, so the model bytes resident are the preload buffer
plus the shards in flight, never a whole fp32 layer. The preload buffer holds packed,
CRC-verified records across requests. The deadline guards are in guards.py.
"""

from __future__ import annotations

import collections
import queue
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from ..encoder import attention_keep, embed, ffn_slice, head_logits, head_output
from ..errors import InputError
from ..planning import Plan, simulate
from ..profiles import DeviceProfile, profile_id
from ..store import Record, Store
from ..tokenizer import Tokenizer
from ..weights import ATTN_PARTS, FFN_PARTS, Embeddings
from .guards import GUARD_SHARE, Pace, compute_guard, io_guard
from .memory import ModelBytes, PeakRSS, Window, blob_bytes, nbytes
from .report import LayerReport, Report, Result
from .request import PRELOADED, SKIPPED, Request
from .schedule import Step, schedule

PACE_MEMORY = 5            # recent requests whose compute pace seeds the next one's guard
HEADS_AHEAD = 4            # decoded heads the decoder may hold ahead of the compute lane


class Engine:
    """Runs requests against one store with one plan. The preload buffer is loaded once and
    stays resident; requests are served one at a time (concurrent callers queue)."""

    def __init__(self, store: str | Path | Store, plan: Plan, device: DeviceProfile,
                 storage: str = "cold", guard: bool = True, threads: int | None = None,
                 max_length: int = 128, pad_to: int | None = None):
        self.store = store if isinstance(store, Store) else Store(store, storage)
        _check_plan(plan, self.store, device)
        self.plan, self.device, self.guard = plan, device, guard
        self.pad_to = pad_to  # pad every request to this many tokens (the paper pads to 128)
        self.config = self.store.config
        self.threads = threads or device.threads
        # never longer than the model has position embeddings for
        self.tokenizer = Tokenizer(self.store.path, max_length=min(max_length, self.config.max_tokens))
        self.steps, self.due = schedule(plan)
        # the lanes may run this late before the answer would miss T; a third of the spare
        # time is kept back for jitter and for work the profile does not see
        self.spare_ms = GUARD_SHARE * max(0.0, plan.spare_ms)
        # the IO pace starts as if one layer's worth of reads had run on time (see Pace)
        self.io_prior_ms = plan.io_ms / max(1, len(self.steps))
        # how much slower than the profile the compute lane ran in recent requests (their
        # median) is the compute guard's pace for a request until its own first layer is
        # done; the engine's first request pays for lazy initialisation and is left out
        self._slowdowns: collections.deque = collections.deque(maxlen=PACE_MEMORY)
        self._requests = 0
        self.lowest_bits = min(self.store.bits)
        self.rows_per_block = self.store.tables["position"][1]
        self.closed = False
        self.bytes = ModelBytes()
        self._load_resident()
        self._size_windows()
        self._lock = threading.Lock()
        self._predictions: dict[tuple[int, int], float] = {}
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sti-io")  # the reader, the decoder

    def _load_resident(self) -> None:
        """The parts always resident (layer records, head, embedding misc) and the preload buffer."""
        s = self.store
        self.shared = {i: s.layer_shared(i) for i in self.plan.choice.layers}
        self.head = s.head()
        self.misc = s.embed_misc()
        self.bytes.add(nbytes([t for sh in self.shared.values() for t in vars(sh).values()]))
        self.bytes.add(nbytes([*self.head.tensors().values(), *self.misc.values()]))
        self.preload: dict[tuple[int, int], tuple[Record, memoryview]] = {}
        for layer, shard, bits in self.plan.choice.preload:
            rec = s.shard_record(layer, shard, bits)
            self.preload[(layer, shard)] = (rec, s.read(rec))
            self.bytes.add(rec.length)
        self.preload_bytes = sum(rec.length for rec, _ in self.preload.values())
        self.resident_bytes = self.bytes.now
        if self.preload_bytes > self.plan.request.memory_bytes:
            raise InputError(f"the preload buffer needs {self.preload_bytes} bytes, more than the plan's "
                             f"budget of {self.plan.request.memory_bytes}")

    def _size_windows(self) -> None:
        """Decoded sizes of every record the plan may read (at any bitwidth: the guard may
        lower one), and the windows bounding the packed and decoded bytes in flight."""
        records = [self.store.shard_record(s.layer, s.shard, b) for steps in self.steps for s in steps
                   for b in self.store.bits]
        self.head_bytes = {r.offset: blob_bytes(r, ATTN_PARTS) for r in records}
        self.ffn_bytes = {r.offset: blob_bytes(r, FFN_PARTS) for r in records}
        biggest = max([self.store.shard_record(s.layer, s.shard, s.bits).length
                       for steps in self.steps for s in steps if not s.preloaded] or [0])
        self.window = Window(max(int(self.plan.predicted.inflight_bytes), 2 * biggest))
        self.heads = Window(HEADS_AHEAD * max(self.head_bytes.values(), default=0))

    def close(self) -> None:
        self.closed = True
        self._io.shutdown(wait=True)
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def compute_slowdown(self) -> float:
        """The median compute pace of recent requests (1.0 before there are any)."""
        return statistics.median(self._slowdowns) if self._slowdowns else 1.0

    # --- one request ------------------------------------------------------------------------
    def run(self, text: str) -> Result:
        if not isinstance(text, str):
            raise InputError(f"expected a text, got {type(text).__name__}")
        if self.closed:
            raise InputError("this engine is closed: open a new one")
        pad = None if self.pad_to is None else min(self.pad_to, self.tokenizer.max_length)
        batch = self.tokenizer.encode([text], pad_to=pad)
        with self._lock, torch.inference_mode():
            torch.set_num_threads(self.threads)
            return self._serve(batch)

    def _serve(self, batch) -> Result:
        """The reader and the decoder start on the IO threads; this thread computes."""
        rss = PeakRSS()
        self.bytes.reset_peak()
        self.window.reset()
        self.heads.reset()
        req = Request(self._new_report(batch))
        read = queue.SimpleQueue()
        lanes = [self._io.submit(self._read_lane, batch.input_ids[0], req, read),
                 self._io.submit(self._decode_lane, req, read)]
        try:
            logits = self._compute_lane(batch, req)
        except BaseException:
            req.cancelled = True
            self.window.cancel()
            self.heads.cancel()
            for lane in lanes:
                lane.exception()  # wait for the IO side to stop before the next request
            self.bytes.now = self.resident_bytes  # what the failed request held is garbage now
            raise
        for lane in lanes:
            lane.result()
        report = req.report
        report.latency_ms = req.now()
        report.peak_model_bytes = self.bytes.peak
        report.rss_growth_bytes = rss.growth()
        probs = torch.softmax(logits, -1)[0]
        return Result(self.config.labels[int(probs.argmax())], probs.tolist(), logits[0], report)

    def _new_report(self, batch) -> Report:
        width, distinct = int(batch.input_ids.shape[1]), len(set(batch.input_ids[0].tolist()))
        return Report(planned_ms=self.plan.predicted.latency_ms, predicted_ms=self._predicted_ms(width, distinct),
                      target_ms=self.plan.request.target_ms, tokens=int(batch.attention_mask.sum()),
                      truncated=batch.truncated[0], preload_bytes=self.preload_bytes,
                      layers=[LayerReport(layer) for layer in self.plan.choice.layers])

    def _predicted_ms(self, width: int, distinct: int) -> float:
        """The plan's latency for a request `width` tokens wide (padding included) holding
        `distinct` different tokens (the embedding rows it reads)."""
        key = (width, distinct)
        if key not in self._predictions:
            c, d = self.plan.choice, self.device
            embed_ms = d.embed_rows_ms(width, distinct, self.rows_per_block)
            timeline = simulate(c.layers, c.m, c.bits, c.preload, d, width, embed_ms=embed_ms)
            self._predictions[key] = timeline[-1].compute_end + d.head_ms
        return self._predictions[key]

    # --- the reader -------------------------------------------------------------------------
    def _read_lane(self, ids: torch.Tensor, req: Request, out: queue.SimpleQueue) -> None:
        try:
            pace = self._read_embeddings(ids, req)
            for pos, steps in enumerate(self.steps):
                if req.cancelled:
                    return
                self._read_layer(pos, steps, req, out, pace)
        except BaseException as exc:  # the compute lane re-raises it
            req.fail(exc)
        finally:
            out.put(None)  # the decoder stops here

    def _read_embeddings(self, ids: torch.Tensor, req: Request) -> Pace:
        a = req.now()
        words = self.store.table_rows("word", ids.tolist())
        off = self.config.position_offset
        position = self.store.table_rows("position", range(off, off + len(ids)))
        req.span("io", "embedding rows", a, req.now())
        req.put("embed", (words, position))
        pace = Pace(self.io_prior_ms)
        pace.add(self.device.embed_rows_ms(len(ids), len(set(ids.tolist())), self.rows_per_block), req.now() - a)
        return pace

    def _read_layer(self, pos: int, steps: list[Step], req: Request, out: queue.SimpleQueue, pace: Pace) -> None:
        """Hand the layer's shards to the decoder in plan order, reading the streamed ones at
        the bitwidth the IO guard leaves them (None: skipped)."""
        streamed = [s for s in steps if not s.preloaded]
        bits = {s.shard: s.bits for s in streamed}
        done = 0  # streamed shards of this layer already handed on
        for step in steps:
            if req.cancelled:
                return
            if step.preloaded:  # no IO: the decoder takes it from the preload buffer
                out.put((step, SKIPPED if step.shard_key in req.dropped else PRELOADED))
                continue
            self._guard_reads(pos, streamed[done:], bits, req, pace)
            done += 1
            got = SKIPPED if bits[step.shard] is None else self._read(step, bits[step.shard], req, pace)
            out.put((step, got))

    def _guard_reads(self, pos: int, rest: list[Step], bits: dict, req: Request, pace: Pace) -> None:
        for s in rest:  # what the compute lane dropped needs no IO
            if s.shard_key in req.dropped:
                bits[s.shard] = None
        if not self.guard:
            return
        changes = io_guard(rest, bits, req.now(), self.due[pos] + self.spare_ms, pace.slowdown(), self.device,
                           self.lowest_bits, self.plan.request.prune)
        for _, shard, _, new in changes:
            bits[shard] = new
        req.report.guard_changes.extend(changes)
        req.skipped |= {s.shard_key for s in rest if bits[s.shard] is None}

    def _read(self, step: Step, bits: int, req: Request, pace: Pace):
        """Read and verify one shard record (the window bounds the packed bytes in flight)."""
        rec = self.store.shard_record(step.layer, step.shard, bits)
        self.window.acquire(rec.length)
        a = req.now()
        buf = self.store.read(rec)
        b = req.now()
        self.bytes.add(rec.length)
        req.report.layers[step.pos].io_ms += b - a
        pace.add(self.device.shard_read_ms[bits], b - a)
        req.span("io", f"read L{step.layer}.S{step.shard}@{bits}", a, b)
        return rec, buf

    # --- the decoder ------------------------------------------------------------------------
    def _decode_lane(self, req: Request, inbox: queue.SimpleQueue) -> None:
        try:
            while (item := inbox.get()) is not None:
                step, got = item
                if got is SKIPPED or req.cancelled:
                    req.put(step.shard_key, SKIPPED)
                    continue
                rec, buf = self.preload[step.shard_key] if got is PRELOADED else got
                head_bytes = self.head_bytes[rec.offset]
                self.heads.acquire(head_bytes)
                a = req.now()
                parts = self.store.decode_parts(rec, buf, ATTN_PARTS)
                b = req.now()
                self.bytes.add(head_bytes)
                req.add_decode(step.pos, b - a)
                req.span("decode", f"decode L{step.layer}.S{step.shard}", a, b)
                req.put(step.shard_key, (rec, buf, parts))
        except BaseException as exc:
            req.fail(exc)

    # --- the compute lane -------------------------------------------------------------------
    def _compute_lane(self, batch, req: Request) -> torch.Tensor:
        ids, mask = batch.input_ids, batch.attention_mask
        a = req.now()
        words, position = req.take("embed")
        emb = Embeddings(word=torch.empty(0), position=position, token_type=self.misc["token_type"],
                         ln_w=self.misc["ln_w"], ln_b=self.misc["ln_b"])
        x = embed(emb, ids, self.config, word_rows=words[None], position_rows=position)
        req.report.embed_ms = req.now() - a
        keep = attention_keep(mask)
        pace = Pace()
        for pos in range(len(self.steps)):
            slow = pace.slowdown() if pace.planned > 0 else self.compute_slowdown
            x = self._layer(x, keep, pos, self._dropped(pos, x.shape[1], req, slow), req)
            lr = req.report.layers[pos]
            pace.add(self.device.compute_ms(lr.shards, x.shape[1]), lr.compute_ms)
        self._requests += 1
        if self._requests > 1:
            self._slowdowns.append(pace.slowdown())
        a = req.now()
        logits = head_logits(self.head, x, mask)
        req.report.head_ms = req.now() - a
        return logits

    def _dropped(self, pos: int, width: int, req: Request, slow: float) -> set[int]:
        """Shards of layer `pos` the compute guard leaves out (a plan that may not prune
        keeps them all)."""
        if not (self.guard and self.plan.request.prune):
            return set()
        out = compute_guard(self.steps, pos, req.now(), self.due[pos] + self.spare_ms, slow, self.device, width,
                            req.skipped)
        req.report.guard_changes.extend((s.layer, s.shard, s.bits, None) for s in out)
        req.dropped |= {s.shard_key for s in out}
        return {s.shard for s in out}

    def _layer(self, x, keep, pos: int, dropped: set[int], req: Request) -> torch.Tensor:
        """One layer, shard by shard: every head, the first LayerNorm, then every FFN slice.
        Each shard's tensors are dropped, and un-counted, as soon as they have been used."""
        steps, lr = self.steps[pos], req.report.layers[pos]
        c, sh = self.config, self.shared[steps[0].layer]
        lr.start_ms = req.now()
        held, attn = [], torch.zeros_like(x)
        for step in steps:
            if step.shard in dropped:
                # let go of it in IO order: the decoder may be holding heads for it, and a
                # later shard the compute lane waits for may be queued behind them
                self._discard(step, req.take(step.shard_key))
                continue
            got = self._ready(step, req, lr)
            if got is None:
                continue
            rec, buf, head = got
            a = req.now()
            attn += head_output(x, keep, head, c.head_dim)
            del head
            self.bytes.sub(self.head_bytes[rec.offset])
            self.heads.release(self.head_bytes[rec.offset])
            held.append((step, rec, buf))
            lr.compute_ms += req.now() - a
            lr.shard_ids.append(step.shard)
            lr.bits.append(rec.bits)
        lr.shards = len(held)
        a = req.now()
        x = F.layer_norm(x + attn + sh.o_b, (c.hidden_size,), sh.ln1_w, sh.ln1_b, c.layer_norm_eps)
        x = F.layer_norm(x + self._ffn(x, held) + sh.f_b, (c.hidden_size,), sh.ln2_w, sh.ln2_b, c.layer_norm_eps)
        lr.compute_ms += req.now() - a
        lr.end_ms = req.now()
        req.span("compute", f"layer {steps[0].layer}", lr.start_ms, lr.end_ms)
        return x

    def _ffn(self, x, held: list) -> torch.Tensor:
        """The sum of the held shards' FFN slices, each decoded just before use and freed
        after (at most one decoded slice exists at a time)."""
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
        return out

    def _ready(self, step: Step, req: Request, lr: LayerReport):
        """(record, bytes, head tensors) of the shard, waiting for the IO side if need be;
        None if the deadline guard skipped it."""
        a = req.now()
        got = req.take(step.shard_key)
        waited = req.now() - a
        lr.stall_ms += waited
        if waited > 0.05:
            req.span("compute", f"wait L{step.layer}.S{step.shard}", a, a + waited)
        return None if got is SKIPPED else got

    def _discard(self, step: Step, got) -> None:
        """Free a shard the IO side delivered after the compute lane dropped it (a preloaded
        record stays in the preload buffer; only its decoded head goes)."""
        if got is SKIPPED:
            return
        rec, buf, head = got
        self.bytes.sub(self.head_bytes[rec.offset] + (0 if step.preloaded else rec.length))
        self.heads.release(self.head_bytes[rec.offset])
        if not step.preloaded:
            self.window.release(rec.length)


def _check_plan(plan: Plan, store: Store, device: DeviceProfile) -> None:
    """The plan must be of this store, made with this device profile, at bitwidths both hold."""
    if plan.request.store_id != store.store_id:
        raise InputError(f"the plan was made for store {plan.request.store_id[:12]}, not {store.store_id[:12]}: "
                         "make a new plan for this store")
    if profile_id(device) != plan.request.device_id:
        raise InputError(f"the plan was made with device profile {plan.request.device_id}, not this one "
                         f"({profile_id(device)}): plan again with the profile the engine runs with")
    missing = {b for row in plan.choice.bits for b in row} | {b for _, _, b in plan.choice.preload}
    missing -= set(store.bits) & set(device.bits)
    if missing:
        raise InputError(f"the plan uses bitwidths {sorted(missing)} that the store or the device profile "
                         f"lacks (store: {list(store.bits)}): make a new plan for this store")
