"""The engine: execute a plan on real storage and answer by the deadline.

Per request, three lanes run side by side (the execution model of docs/DESIGN.md):
  - the reader (an IO thread) reads the request's embedding rows, then every streamed shard
    in plan order (read the record, verify its CRC), at most `window` packed bytes ahead;
  - the decoder (a second IO thread) decodes every shard, streamed or preloaded, into
    shard groups (groups.py): a layer's heads first, group by group, then its FFN slices,
    each group handed to the compute lane when full. A pool of preallocated groups bounds
    how far it runs ahead; a shard's packed record is let go once it is decoded;
  - the compute lane (the caller's thread) embeds, then runs each layer a group at a time:
    every attention group, the layer's first LayerNorm, every FFN group, the second.
Decoding is off the critical path, and a group computes several shards in a few large ops.
The model bytes resident are the preload buffer, the groups and the packed records in
flight, never a whole fp32 layer. The preload buffer holds packed, CRC-verified records
across requests. The deadline guards are in guards.py.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..encoder import attention_keep, embed, head_logits
from ..groups import ATTN, DTYPES, FFN, accumulator, group_sizes
from .. import codec as codecs
from ..errors import InputError, StiError
from ..planning import Plan, PlanError, PlanSet, simulate
from ..planning.lengths import check_set
from ..profiles import DeviceProfile, profile_id
from ..rowcache import ResidentRows, RowCache
from ..store import Record, Store
from ..tokenizer import Tokenizer
from ..weights import Embeddings
from .follow import Band, Follower, layer_paces, request_paces, rescaled
from .guards import GUARD_SHARE, Pace, PositionPaces, compute_guard, finish_by, io_guard
from .memory import GroupPool, ModelBytes, PeakRSS, Window, nbytes
from .pressure import MemoryPressure
from .report import LayerReport, Report, Result
from .request import PRELOADED, SKIPPED, Request
from .schedule import Step, schedule

SLABS = 2                  # shard groups in the pool: one being computed, one being filled


class Engine:
    """Runs requests against one store with one plan, or with length-aware plans (a
    `PlanSet`: each request runs the plan of its length). The preload buffer is loaded once
    and stays resident; requests are served one at a time (concurrent callers queue).

    Given `replan` (how to plan again: `replan(device, latency_ms, memory_mb, kept,
    new_buffer)` returns a PlanSet; `kept`, when given, is the current set, whose resident
    parts should stay unless `new_buffer` allows a new preload buffer), the
    engine can change its targets (`retarget`, `resize`), and with `follow` it follows the
    device: when its lanes drift from the profile (follow.py), it plans again on a thread of
    its own and swaps the plans in between two requests; with `memory_pressure`
    (pressure.py) it shrinks its preload budget while the OS is short of memory. Every change is in `history`, and
    in the report of the first request served with the new plans: `request` is the
    request count when it was asked for, `from_request` the first request served with it."""

    def __init__(self, store: str | Path | Store, plans: Plan | PlanSet, device: DeviceProfile,
                 storage: str = "cold", guard: bool = True, threads: int | None = None,
                 max_length: int = 128, pad_to: int | None = None, replan=None, follow: bool | Band = False,
                 memory_pressure: MemoryPressure | None = None):
        self.store = store if isinstance(store, Store) else Store(store, storage)
        if (follow or memory_pressure is not None) and replan is None:
            raise InputError("an engine follows the device only if it can plan again: give it `replan` "
                             "(sti.open_engine does)")
        self.guard = guard
        self.pad_to = pad_to  # pad every request to this many tokens (the paper pads to 128)
        self.config = self.store.config
        self.threads = threads or device.threads
        # never longer than the model has position embeddings for
        self.tokenizer = Tokenizer(self.store.path, max_length=min(max_length, self.config.max_tokens))
        self.lowest_bits = min(self.store.bits)
        self.rows_per_block = self.store.tables["position"][1]
        self.closed = False
        self.head = self.store.head()
        self.misc = self.store.embed_misc()
        self.shared, self.preload, self.arena, self.pool, self.rows = {}, {}, np.zeros(0, np.uint8), None, None
        self._requests = 0
        self._install(plans, device)
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sti-io")  # the reader, the decoder
        self.replan = replan
        self.follower = Follower(follow if isinstance(follow, Band) else Band()) if follow else None
        self.history: list[dict] = []
        self._planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sti-plan") if replan else None
        self._pending = None    # (future of (plans, device), what it is for) of a replan under way
        self._announce = None   # the history entry the next report carries
        self._opened = time.monotonic()
        self.memory_pressure = memory_pressure
        self._ceiling_mb = self.plans.first.request.memory_bytes / 1e6  # pressure never grows it past this
        self._floor_mb = None   # nor shrinks it below this, once a shrink to less was refused

    def _install(self, plans: Plan | PlanSet, device: DeviceProfile) -> None:
        """Take these plans and this profile: the resident parts and buffers they need are
        built first (the preload records both plan sets hold are copied, not read again),
        then everything is swapped at once, so a failure leaves the engine as it was."""
        plans = plans if isinstance(plans, PlanSet) else PlanSet.single(plans)
        same_device = getattr(self, "device", None) is device
        check_set(plans)  # a set built by hand gets the checks of one read from a file
        for plan in plans.plans:
            _check_plan(plan, self.store, device)
        # one schedule per bucket that has a plan (the same object for buckets sharing one)
        walks = {id(p): schedule(p) for p in plans.plans}
        walks = [walks[id(plans.plan_for(b.max_tokens))] for b in plans.buckets]
        resident = self._resident(plans)
        window, pool = self._buffers(walks, plans, device)
        self.plans, self.device, self.walks = plans, device, walks
        self.shared, self.rows, self.arena, self.preload, self.preload_bytes = resident
        self.window, self.pool = window, pool
        self.bytes = ModelBytes()
        self.bytes.add(nbytes([t for sh in self.shared.values() for t in vars(sh).values()]))
        self.bytes.add(nbytes([*self.head.tensors().values(), *self.misc.values()]))
        self.bytes.add(self.rows.nbytes + self.arena.nbytes + self.pool.nbytes)
        self.resident_bytes = self.bytes.now
        # each layer position's compute pace against this profile in recent requests: what
        # the compute guard projects the layers left at (kept across a swap that keeps the
        # profile: a new T or M); the engine's first request pays for lazy initialisation
        # and is left out
        if not same_device:
            self.positions = PositionPaces()
        self._predictions: dict[tuple[int, int, int], float] = {}

    def _resident(self, plans: PlanSet):
        """The parts always resident for `plans`: layer records, embedding rows, and the
        preload buffer, its records side by side in one array (each 8-aligned), so that the
        decoder can decode several of them in one call (ShardGroup.fill_many)."""
        s = self.store
        layers = sorted({i for p in plans.plans for i in p.choice.layers})
        shared = {i: self.shared.get(i) or s.layer_shared(i) for i in layers}
        cache = plans.rows or RowCache(hidden=self.config.hidden_size)
        rows = self.rows if self.rows is not None and self.rows.cache == cache \
            else ResidentRows(s, cache)
        recs = [s.shard_record(layer, shard, bits) for layer, shard, bits in plans.buffer]
        ends = list(itertools.accumulate(r.length + -r.length % 8 for r in recs))
        starts = [0, *ends[:-1]]
        arena = np.zeros(ends[-1] if ends else 0, np.uint8)
        preload: dict[tuple[int, int], tuple[Record, memoryview, int]] = {}
        for rec, at in zip(recs, starts):
            old = self.preload.get((rec.layer, rec.shard))
            if old is not None and old[0] == rec:   # held already: no read
                arena[at:at + rec.length] = self.arena[old[2]:old[2] + rec.length]
            else:
                arena[at:at + rec.length] = np.frombuffer(s.read(rec), np.uint8)
            preload[(rec.layer, rec.shard)] = (rec, memoryview(arena)[at:at + rec.length], at)
        preload_bytes = sum(rec.length for rec in recs)
        budget = plans.first.request.memory_bytes
        if preload_bytes + rows.nbytes > budget:
            raise InputError(f"the preload buffer and the resident rows need {preload_bytes + rows.nbytes} "
                             f"bytes, more than the plan's budget of {budget}")
        return shared, rows, arena, preload, preload_bytes

    def _buffers(self, walks, plans: PlanSet, device: DeviceProfile):
        """The window bounding the packed bytes in flight, and the pool of shard groups (in
        the device profile's compute dtype) bounding the decoded ones (kept if it fits)."""
        steps = [s for w in walks for layer in w.steps for s in layer]
        biggest = max([self.store.shard_record(s.layer, s.shard, s.bits).length for s in steps if not s.preloaded]
                      or [0])
        inflight = max(p.predicted.inflight_bytes for p in plans.plans)
        window = Window(max(int(inflight), 2 * biggest))
        dtype = DTYPES[device.compute_dtype]
        for bits in {s.bits for s in steps} | {self.lowest_bits}:
            codecs.prepare_jobs(bits, dtype == torch.bfloat16)  # the decoder's kernels, compiled now
        sizes = group_sizes(self.config, dtype, SLABS)
        if self.pool is not None and self.pool.sizes == sizes and self.pool.dtype == dtype:
            return window, self.pool
        return window, GroupPool(SLABS, sizes, self.config, dtype)

    @property
    def group_sizes(self) -> tuple[int, int]:
        return self.pool.sizes

    def close(self) -> None:
        self.closed = True
        if self._planner is not None:
            self._planner.shutdown(wait=True, cancel_futures=True)
        self._io.shutdown(wait=True)
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def requests(self) -> int:
        """Requests this engine has served, its warm-up included (history entries count so)."""
        return self._requests

    # --- one request ------------------------------------------------------------------------
    def run(self, text: str, pair: str | None = None) -> Result:
        """The answer for one text (with `pair`, a sentence pair: text, then pair)."""
        if not isinstance(text, str):
            raise InputError(f"expected a text, got {type(text).__name__}")
        if self.closed:
            raise InputError("this engine is closed: open a new one")
        called = time.perf_counter()
        pad = None if self.pad_to is None else min(self.pad_to, self.tokenizer.max_length)
        batch = self.tokenizer.encode([text], pad_to=pad, pairs=None if pair is None else [pair])
        tokenizing = time.perf_counter() - called
        with self._lock, torch.inference_mode():
            self._take_replan()
            # the request's clock runs from the call, as its caller's does, less any wait
            # behind another request or for new plans to be swapped in (the caller's T is
            # for this request's own work)
            start = time.perf_counter() - tokenizing
            torch.set_num_threads(self.threads)
            result = self._serve(batch, start)
            if self._announce is not None:
                result.report.replanned, self._announce = self._announce, None
            self._follow(result.report)
            self._heed_pressure()
            return result

    # --- following the device, changing targets ----------------------------------------------
    def _follow(self, report: Report) -> None:
        """Feed the follower this request's paces; when the device has drifted, plan again
        (around the resident parts, which stay) on the planning thread."""
        if self.follower is None or self._requests <= 1:  # the first request pays for lazy initialisation
            return
        drift = self.follower.add(request_paces(report, self.device, self.rows_per_block,
                                                self.rows.cache.positions))
        if drift is None or self._pending is not None:
            return
        device = rescaled(self.device, drift)
        # a lane that drifted but takes little of the request (the embedding rows, say) is
        # not worth a new plan: only a change of the plan's predicted latency is
        bucket, width, misses = self.plans.index_for(report.width), report.width, report.embed_misses
        before, after = self._predicted_ms(bucket, width, misses), self._predicted_ms(bucket, width, misses, device)
        if abs(after / before - 1.0) <= self.follower.band.width:
            return
        req = self.plans.first.request
        why = {"kind": "drift", "drift": {k: round(v, 4) for k, v in drift.items()}}
        # the storage's pace decides which shards are worth holding: only then may the buffer
        # be chosen afresh (planning that costs about 0.1 s of the CPU the requests share)
        self._plan_async(device, req.target_ms, req.memory_bytes / 1e6, self.plans, why, drift,
                         new_buffer="read" in drift)

    def _heed_pressure(self) -> None:
        """Under memory pressure halve the preload budget (not below the least that meets T);
        after a calm spell double it, up to the budget asked for (pressure.py)."""
        if self.memory_pressure is None or self._pending is not None:
            return
        action = self.memory_pressure.poll()
        req = self.plans.first.request
        now = req.memory_bytes / 1e6
        if action == "shrink" and self._floor_mb is not None and now <= self._floor_mb:
            return   # as small as T allows: a shrink was refused here already
        want = {"shrink": now / 2, "grow": min(self._ceiling_mb, 2 * now)}.get(action, now)
        if want != now:
            self._plan_async(self.device, req.target_ms, want, None, {"kind": "memory pressure", "action": action},
                             {}, floor=action == "shrink")

    def _plan_async(self, device, latency_ms: float, memory_mb: float, kept, why: dict, drift: dict,
                    floor: bool = False, new_buffer: bool = False) -> None:
        start, current = time.monotonic(), self.plans.first.request.memory_bytes

        def job():
            try:
                plans = self.replan(device, latency_ms, memory_mb, kept, new_buffer)
            except PlanError as exc:   # (floor) too little for T: the least M that meets it, if that is less
                least = exc.min_memory_bytes
                if not floor or least is None or least >= current:
                    raise
                plans = self.replan(device, latency_ms, least / 1e6, kept, new_buffer)
            return plans, device, (time.monotonic() - start) * 1e3
        self._pending = (self._planner.submit(job), {**why, "request": self._requests,
                                                    "at_s": round(start - self._opened, 3)}, drift)

    def _take_replan(self) -> None:
        """Between two requests: swap in the plans a finished replan made."""
        if self._pending is None or not self._pending[0].done():
            return
        future, entry, drift = self._pending
        self._pending = None
        try:
            plans, device, plan_ms = future.result()
        except StiError as exc:  # no plan for the drifted device: keep these (the guard keeps T)
            self.history.append({**entry, "error": str(exc)})
            if entry["kind"] == "memory pressure":
                self._floor_mb = self.plans.first.request.memory_bytes / 1e6
            if self.follower is not None:
                self.follower.replanned({})
            return
        self._swap(plans, device, {**entry, "plan_ms": round(plan_ms, 2)})
        if drift:
            self._floor_mb = None   # the least M that meets T moved with the device
        if self.follower is not None:
            self.follower.replanned(drift)

    def _swap(self, plans: PlanSet, device: DeviceProfile, entry: dict) -> dict:
        """Install new plans (the caller holds the lock: no request is in flight) and record it."""
        old = self._summary()
        a = time.monotonic()
        self._install(plans, device)
        entry = {**entry, "swap_ms": round((time.monotonic() - a) * 1e3, 2), "from_request": self._requests,
                 "old": old, "new": self._summary()}
        self.history.append(entry)
        self._announce = entry
        return entry

    def _summary(self) -> dict:
        p = self.plans.first.request
        return {"expected_accuracy": round(self.plans.expected_accuracy, 5), "target_ms": p.target_ms,
                "memory_bytes": p.memory_bytes, "preload_bytes": self.preload_bytes,
                "rows_bytes": self.rows.nbytes, "device_id": p.device_id}

    def retarget(self, latency_ms: float | None = None, memory_mb: float | None = None) -> dict:
        """Plan for a new latency target and/or preload budget (None: keep it) and swap the
        plans in between two requests: requests in flight or queued are served, by the old
        plans or the new. Planning happens before the swap, outside the engine's lock;
        until the swap both preload buffers are held (the new one is built from the old
        where they share records). Returns the history entry. Raises PlanError (the engine
        unchanged) if nothing fits the new targets."""
        if self.replan is None:
            raise InputError("this engine cannot plan again: open it with sti.open_engine, or give it `replan`")
        req = self.plans.first.request
        latency = req.target_ms if latency_ms is None else latency_ms
        memory = req.memory_bytes / 1e6 if memory_mb is None else memory_mb
        a = time.monotonic()
        plans = self.replan(self.device, latency, memory, None, False)
        entry = {"kind": "retarget", "request": self._requests, "at_s": round(a - self._opened, 3),
                 "plan_ms": round((time.monotonic() - a) * 1e3, 2)}
        with self._lock:
            if self._pending is not None:   # a replan made for the old targets is of no use now
                self._pending[0].cancel()
                self._pending = None
                if self.follower is not None:
                    self.follower.replanned({})
            self._ceiling_mb, self._floor_mb = memory, None
            return self._swap(plans, self.device, entry)

    def resize(self, memory_mb: float) -> dict:
        """`retarget` with a new preload budget only."""
        return self.retarget(memory_mb=memory_mb)

    def _serve(self, batch, start: float) -> Result:
        """The reader and the decoder start on the IO threads; this thread computes. `start`
        is the request's clock's zero (`time.perf_counter()`)."""
        rss = PeakRSS()
        self.bytes.reset_peak()
        self.window.reset()
        self.pool.reset()
        width = int(batch.input_ids.shape[1])
        i = self.plans.index_for(width)
        req = Request(self._new_report(batch, i), self.walks[i], start)
        req.report.setup_ms = req.now()
        read = queue.SimpleQueue()
        lanes = [self._io.submit(self._read_lane, batch.input_ids[0], req, read),
                 self._io.submit(self._decode_lane, req, read)]
        try:
            logits = self._compute_lane(batch, req)
        except BaseException:
            req.cancelled = True
            self.window.cancel()
            self.pool.cancel()
            for lane in lanes:
                lane.exception()  # wait for the IO side to stop before the next request
            self.bytes.now = self.resident_bytes  # what the failed request held is garbage now
            raise  # (the window and the pool are reset when the next request starts)
        for lane in lanes:
            lane.result()
        report = req.report
        report.peak_model_bytes = self.bytes.peak
        report.rss_growth_bytes = rss.growth()
        probs = torch.softmax(logits, -1)[0]
        result = Result(self.config.labels[int(probs.argmax())], probs.tolist(), logits[0], report)
        report.latency_ms = req.now()
        return result

    def _new_report(self, batch, bucket: int) -> Report:
        width, ids = int(batch.input_ids.shape[1]), batch.input_ids[0].tolist()
        distinct = len(self.rows.cache.misses(ids))  # the word rows it reads
        plan = self.walks[bucket].plan
        return Report(planned_ms=plan.predicted.latency_ms, predicted_ms=self._predicted_ms(bucket, width, distinct),
                      target_ms=plan.request.target_ms, tokens=int(batch.attention_mask.sum()), width=width,
                      truncated=batch.truncated[0], preload_bytes=self.preload_bytes,
                      plan_tokens=plan.request.seq_len, layers=[LayerReport(layer) for layer in plan.choice.layers])

    def _predicted_ms(self, bucket: int, width: int, distinct: int, device: DeviceProfile | None = None) -> float:
        """The latency of the plan of `bucket` for a request `width` tokens wide (padding
        included) holding `distinct` different tokens (the embedding rows it reads), by the
        engine's device profile (or by `device`, not kept)."""
        key = (bucket, width, distinct)
        if device is None and key in self._predictions:
            return self._predictions[key]
        c, d = self.walks[bucket].plan.choice, device or self.device
        embed_ms = d.embed_rows_ms(width, distinct, self.rows_per_block, width > self.rows.cache.positions)
        timeline = simulate(c.layers, c.m, c.bits, c.preload, d, width, embed_ms=embed_ms)
        out = timeline[-1].compute_end + d.head_ms
        if device is None:
            self._predictions[key] = out
        return out

    # --- the reader -------------------------------------------------------------------------
    def _read_lane(self, ids: torch.Tensor, req: Request, out: queue.SimpleQueue) -> None:
        try:
            pace = self._read_embeddings(ids, req)
            for pos, steps in enumerate(req.sched.steps):
                if req.cancelled:
                    return
                self._read_layer(pos, steps, req, out, pace)
        except BaseException as exc:  # the compute lane re-raises it
            req.fail(exc)
        finally:
            out.put(None)  # the decoder stops here

    def _read_embeddings(self, ids: torch.Tensor, req: Request) -> Pace:
        """The request's word and position rows: the resident ones from the row cache, the
        others read from the store."""
        a = req.now()
        words, hits, misses = self.rows.words(ids.tolist())
        position = self.rows.positions(len(ids))
        if position is None:
            off = self.config.position_offset
            position = self.store.table_rows("position", range(off, off + len(ids)))
        req.span("io", f"embedding rows ({len(misses)} read, {hits} resident)", a, req.now())
        req.report.embed_hits, req.report.embed_misses = hits, len(misses)
        req.report.embed_read_ms = req.now() - a
        req.put("embed", (words, position))
        pace = Pace(req.sched.io_prior_ms)
        pace.add(self.device.embed_rows_ms(len(ids), len(misses), self.rows_per_block,
                                           len(ids) > self.rows.cache.positions), req.now() - a)
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
        changes = io_guard(rest, bits, req.now(), self._late_after(req, pos), pace.slowdown(), self.device,
                           self.lowest_bits, self.plans.first.request.prune)
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
        req.report.read_ms += b - a
        req.report.read_profiled_ms += self.device.shard_read_ms[bits]
        pace.add(self.device.shard_read_ms[bits], b - a)
        req.span("io", f"read L{step.layer}.S{step.shard}@{bits}", a, b)
        return rec, buf

    # --- the decoder ------------------------------------------------------------------------
    def _decode_lane(self, req: Request, inbox: queue.SimpleQueue) -> None:
        try:
            for pos, steps in enumerate(req.sched.steps):
                kept = self._decode_heads(pos, steps, req, inbox)
                if kept is None:
                    return  # the reader stopped (cancelled, or failed: the compute lane re-raises)
                self._decode_ffns(pos, kept, req)
        except BaseException as exc:
            req.fail(exc)

    def _decode_heads(self, pos: int, steps: list[Step], req: Request, inbox: queue.SimpleQueue):
        """The layer's heads into attention groups, in arrival order; returns the shards
        decoded (step, record, bytes, place in the preload buffer or None) for their FFN
        slices, or None if the reader stopped."""
        kept, groups = [], _Groups(self, req, ATTN, pos)
        for _ in steps:
            item = self._next(inbox, groups)
            if item is None:
                return None
            step, got = item
            if got is SKIPPED or req.cancelled or step.shard_key in req.dropped:
                self._let_go(step, got)
                continue
            entry = self.preload[step.shard_key] if got is PRELOADED else (*got, None)
            if not groups.add(step, *entry):
                return None
            kept.append((step, *entry))
        groups.finish()
        return kept

    @staticmethod
    def _next(inbox: queue.SimpleQueue, groups: "_Groups"):
        """The reader's next item; before waiting for it, the shards put aside to decode
        together are decoded (the compute lane may be waiting for them)."""
        try:
            return inbox.get(block=False)
        except queue.Empty:
            groups.flush()
            return inbox.get()

    def _decode_ffns(self, pos: int, kept: list, req: Request) -> None:
        """The kept shards' FFN slices into FFN groups; each packed record is let go once
        its slice is decoded."""
        groups = _Groups(self, req, FFN, pos)
        for step, rec, buf, at in kept:
            if not (req.cancelled or step.shard_key in req.dropped):
                groups.add(step, rec, buf, at)  # (if the request was cancelled, nothing more is used)
            self._let_go(step, (rec, buf))
        groups.finish()

    def _let_go(self, step: Step, got) -> None:
        """Free a shard's packed record the reader handed on (one in the preload buffer stays)."""
        if got is SKIPPED or got is PRELOADED or step.preloaded:
            return
        rec, _ = got
        self.bytes.sub(rec.length)
        self.window.release(rec.length)

    # --- the compute lane -------------------------------------------------------------------
    @staticmethod
    def _late_after(req: Request, pos: int) -> float:
        """When layer `pos` is late: its planned start plus a share of the plan's spare time
        (a third of it is kept back for jitter and for work the profile does not see)."""
        return req.sched.due[pos] + GUARD_SHARE * req.sched.spare_ms

    def _compute_lane(self, batch, req: Request) -> torch.Tensor:
        ids, mask = batch.input_ids, batch.attention_mask
        a = req.now()
        words, position = req.take("embed")
        emb = Embeddings(word=torch.empty(0), position=position, token_type=self.misc["token_type"],
                         ln_w=self.misc["ln_w"], ln_b=self.misc["ln_b"])
        x = embed(emb, ids, self.config, word_rows=words[None], position_rows=position,
                  token_type_ids=batch.token_type_ids)
        req.report.embed_ms = req.now() - a
        keep = attention_keep(mask)
        steps, width = req.sched.steps, x.shape[1]
        usual = self.positions.factors(len(steps))
        # how much slower than usual this request's layers run; one layer on time (a layer
        # after the first: without the first layer's extra cost) is counted in, so that one
        # slow layer (a hand-off, a page fault) is not taken for a slow device
        pace = Pace(self.device.layer_ms(len(steps[0]), width, 1))
        for pos in range(len(steps)):
            x = self._layer(x, keep, pos, self._dropped(pos, width, req, pace.slowdown(), usual), req)
            lr = req.report.layers[pos]
            pace.add(usual[pos] * self.device.layer_ms(lr.shards, width, pos), lr.busy_ms)
        self._requests += 1
        if self._requests > 1:
            self.positions.add(layer_paces(req.report, self.device))
        a = req.now()
        logits = head_logits(self.head, x, mask)
        req.report.head_ms = req.now() - a
        return logits

    def _dropped(self, pos: int, width: int, req: Request, slow: float, usual: list[float]) -> set[int]:
        """Shards of layer `pos` the compute guard leaves out (a plan that may not prune
        keeps them all)."""
        if not (self.guard and self.plans.first.request.prune):
            return set()
        out = compute_guard(req.sched.steps, pos, req.now(), finish_by(req.sched), slow, self.device, width,
                            req.skipped, usual)
        req.report.guard_changes.extend((s.layer, s.shard, s.bits, None) for s in out)
        req.dropped |= {s.shard_key for s in out}
        return {s.shard for s in out}

    def _layer(self, x, keep, pos: int, dropped: set[int], req: Request) -> torch.Tensor:
        """One layer, a group at a time: the attention groups, the first LayerNorm, the FFN
        groups, the second; in each group, the shards the compute guard kept."""
        lr = req.report.layers[pos]
        c, sh = self.config, self.shared[req.sched.steps[pos][0].layer]
        lr.start_ms = req.now()
        attn = self._phase(ATTN, pos, x, keep, dropped, req, lr, sh.o_b)
        a = req.now()
        x = F.layer_norm(x + attn, (c.hidden_size,), sh.ln1_w, sh.ln1_b, c.layer_norm_eps)
        lr.compute_ms += req.now() - a
        ffn = self._phase(FFN, pos, x, None, dropped, req, lr, sh.f_b)
        a = req.now()
        x = F.layer_norm(x + ffn, (c.hidden_size,), sh.ln2_w, sh.ln2_b, c.layer_norm_eps)
        lr.compute_ms += req.now() - a  # the LayerNorms too: the profile's layer includes them
        lr.shards = len(lr.shard_ids)
        lr.end_ms = req.now()
        req.span("compute", f"layer {lr.layer}", lr.start_ms, lr.end_ms)
        return x

    def _phase(self, phase: str, pos: int, x, keep, dropped: set[int], req: Request, lr: LayerReport, bias):
        """`bias` plus the sum of one phase's groups of layer `pos`, each group released once
        computed."""
        total, count = accumulator(x, bias), 0
        while (group := self._ready(req, (phase, pos, count), lr)) is not None:
            a = req.now()
            for start, n in group.runs(lambda shard: shard[0].shard not in dropped):
                group.accumulate(total, x, keep, n, start)
                if phase == ATTN:
                    lr.shard_ids.extend(s.shard for s, _ in group.shards[start:start + n])
                    lr.bits.extend(b for _, b in group.shards[start:start + n])
            lr.compute_ms += req.now() - a
            self.pool.release(group)
            count += 1
        return total.view(x.shape)

    def _ready(self, req: Request, key, lr: LayerReport):
        """The next group of a phase from the decoder, waiting for it if need be (None: the
        phase is done)."""
        a = req.now()
        got = req.take(key)
        waited = req.now() - a
        lr.stall_ms += waited
        if waited > 0.05:
            req.span("compute", f"wait L{lr.layer} {key[0]} {key[2]}", a, a + waited)
        return got


class _Groups:
    """The decoder filling one phase of one layer: shards go into groups from the pool in
    order, and each group is handed to the compute lane, under (phase, layer position,
    count), when it is full; `finish` hands on the last and then None (no more). Preloaded
    shards are put aside and decoded together (one call for the run of them, `flush`) when
    the group is full, before a streamed shard, before the decoder waits, and at the end."""

    def __init__(self, engine: Engine, req: Request, phase: str, pos: int):
        self.engine, self.req, self.phase, self.pos = engine, req, phase, pos
        self.group, self.count, self.pending = None, 0, []

    def add(self, step: Step, rec: Record, buf, at: int | None = None) -> bool:
        """Decode one shard into the current group (`at`: its place in the preload buffer;
        such a shard waits to be decoded with the next ones); False if the request was
        cancelled."""
        if at is None:
            self.flush()
        if self.group is None:
            a = self.req.now()
            self.group = self.engine.pool.acquire(self.phase)
            self.req.report.layers[self.pos].group_wait_ms += self.req.now() - a  # (only the decoder writes it)
            if self.group is None:
                return False
        if at is not None:
            self.pending.append(((step, rec.bits), rec, at))
            if len(self.group.shards) + len(self.pending) == self.group.size:
                self.flush()
            return True
        a = self.req.now()
        self.group.fill((step, rec.bits), self.engine.store, rec, buf)
        self._decoded([step], a)
        return True

    def flush(self) -> None:
        """Decode the shards put aside, in one call."""
        if not self.pending:
            return
        a = self.req.now()
        self.group.fill_many(self.pending, self.engine.store, self.engine.arena)
        self._decoded([s for (s, _), _, _ in self.pending], a)
        self.pending = []

    def _decoded(self, steps: list[Step], start: float) -> None:
        req, end = self.req, self.req.now()
        req.add_decode(self.pos, start, end)
        shards = ",".join(str(s.shard) for s in steps)
        req.span("decode", f"decode L{steps[0].layer}.S{shards} {'head' if self.phase == ATTN else 'ffn'}", start, end)
        if self.group.full:
            self._hand_on()

    def finish(self) -> None:
        self.flush()
        if self.group is not None:
            self._hand_on()
        self.req.put((self.phase, self.pos, self.count), None)

    def _hand_on(self) -> None:
        self.req.put((self.phase, self.pos, self.count), self.group)
        self.group, self.count = None, self.count + 1


def _check_plan(plan: Plan, store: Store, device: DeviceProfile) -> None:
    """The plan must be of this store, made with this device profile, at bitwidths both hold."""
    if plan.request.store_id != store.store_id:
        raise InputError(f"the plan was made for store {plan.request.store_id[:12]}, not {store.store_id[:12]}: "
                         "make a new plan for this store")
    try:
        device_id = profile_id(device)
    except (TypeError, ValueError) as exc:
        raise InputError(f"the device profile cannot be written as JSON ({exc}): load it from a file") from None
    if device_id != plan.request.device_id:
        raise InputError(f"the plan was made with device profile {plan.request.device_id}, not this one "
                         f"({device_id}): plan again with the profile the engine runs with")
    missing = {b for row in plan.choice.bits for b in row} | {b for _, _, b in plan.choice.preload}
    missing -= set(store.bits) & set(device.bits)
    if missing:
        raise InputError(f"the plan uses bitwidths {sorted(missing)} that the store or the device profile "
                         f"lacks (store: {list(store.bits)}): make a new plan for this store")
