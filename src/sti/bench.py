"""sti against the baselines and real peers, measured by one harness.

For every storage mode and sequence-length mode, the harness first measures the full
model's resident compute time (the `preload` system) and expresses every latency target T
as a multiple of it, and measures the device profile afresh (a few seconds), which every
system of that storage and length mode then plans with (corrected on the engine at each
point, as a user's engine is when it opens): the machines we run on are shared and their
speed drifts by up to 2x within an hour, so a profile saved earlier would make stale plans
and predictions. The profiles used are kept in the results. Then, per system
and point:
  - latency: the median, p95 and p99 over the test sentences (all of them unless `requests`
    says fewer), one request at a time, as an app would send them; the deadline-hit rate;
  - memory: peak resident model bytes (our accounting, where the system allows it) and the
    process's peak RSS growth during the requests;
  - accuracy: served (above) and, for comparison, in batches with the exact weights.

What is published is what users get: every system that runs our engine answers every test
sentence (and `ood_limit` sentences of each out-of-domain set) one request at a time, and
its `served_accuracy` is the accuracy of the labels the engine returned; `accuracy` beside it
is the plan's (its submodel and bitwidths in batches), so the deadline guard's cost is the
difference. Latency, hit rate (with a 95% Wilson interval), guard rate and memory are over
the same test requests. Baselines that do not run the engine are served where affordable
(preload; disk offload at cold storage); load-exec and from_pretrained, seconds per request,
are timed over `slow_requests` and carry the batch accuracy of the same weights, labelled.

Systems (`SYSTEMS`):
  sti-joint, sti-paper  the engine with the joint / the paper's planner
  stdpl-fp32, stdpl-4bit  layer-by-layer pipelined loading of the whole model, no preload
  small-submodel        the smallest submodel of the grid, streamed at 32 bits, no planning
  load-exec             read the fp32 model from storage, then run (per request)
  hf-from-pretrained    transformers `from_pretrained` then run (per request, cold files)
  hf-disk-offload       accelerate `disk_offload` (weights read from disk during forward)
  preload               the whole fp32 model resident (fastest; memory = the model)
  preload-bf16          transformers' model resident in bfloat16 (our head in fp32): the fused
                        model at the arithmetic the engine may compute in (the T unit stays fp32)
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import api
from .data import OOD_SETS, load_split
from .encoder import Submodel, classify, depth_layers, head_logits, parse_grid_key
from .errors import InputError, StiError
from .evaluate import accuracy, latency_stats
from .planning import (Plan, PlanChoice, PlanPrediction, PlanRequest, PlanSet, make_plan, make_plan_set,
                       make_plan_set_with_rows, simulate)
from .planning.problem import predicted_memory
from .planning.rows import replan_around
from .profiles import DeviceProfile, profile_id
from .profile_device import measure_device
from .runtime import Engine
from .runtime.memory import PeakRSS
from .store import Store
from .tokenizer import Tokenizer

SYSTEMS = ("sti-joint", "sti-paper", "stdpl-fp32", "stdpl-4bit", "small-submodel", "load-exec",
           "hf-from-pretrained", "hf-disk-offload", "preload", "preload-bf16")
PLANNED = ("sti-joint", "sti-paper")
FIXED = ("stdpl-fp32", "stdpl-4bit", "small-submodel")  # the engine on a given schedule, no planner
SEQ_MODES = {"own": None, "pad128": 128}
SKEW = "skew3.6"   # emulated bandwidth: reading a fp32 layer takes 3.6x its compute (the paper's board)


@dataclass(frozen=True)
class BenchConfig:
    targets_x: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
    memories_mb: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    storages: tuple[str, ...] = ("cold", "emulate:100MB/s", SKEW)
    seq_modes: tuple[str, ...] = ("own", "pad128")
    systems: tuple[str, ...] = SYSTEMS
    requests: int | None = None  # test sentences served per point (None: all); slow baselines: below
    slow_requests: int = 50
    plan_len_own: int = 48       # plans for "own" lengths assume this many tokens (test p95: 47)
    headroom: float = api.DEFAULT_HEADROOM  # share of T the sti plans keep back (both planners)
    # sti-joint at own lengths: a plan per length bucket sharing one buffer chosen for the dev
    # split's lengths (False: one plan for plan_len_own tokens, as sti-paper)
    length_aware: bool = True
    # correct the device profile on the engine at each point before planning (calibrate.py)
    calibrate: bool = True
    # the planned systems' engines follow the device as they serve (runtime/follow.py): when
    # their lanes drift from the profile, they plan again between requests
    follow: bool = False
    # sti-joint's length-aware plans may hold frequent tokens' embedding rows resident
    # (planning/rows.py; False: every row is read, as before)
    row_cache: bool = True
    # sentences per out-of-domain set, served and in batches (None: all 12,752, which makes
    # every point ~13x slower than the test split's 1057; 0: none, the test split only)
    ood_limit: int | None = 200
    # (T x, M MB) points where sti-joint is served again without the deadline guard
    no_guard_points: tuple[tuple[float, float], ...] = ((1.0, 2.0), (2.0, 2.0))
    seed: int = 0
    # a results.json of an earlier run whose T units and device profiles this run takes
    # instead of measuring its own (`same_conditions`): two stores of one shape (e.g. two
    # codecs' roundings) then plan with the same figures, and differ only in their weights
    conditions_from: str | None = None

    @staticmethod
    def quick() -> "BenchConfig":
        """The demo's short version: one storage, one length mode, M = 2 MB, three targets."""
        return BenchConfig(targets_x=(0.75, 1.0, 2.0), memories_mb=(2.0,), storages=("emulate:100MB/s",),
                           seq_modes=("own",), systems=("sti-joint", "sti-paper", "stdpl-4bit", "load-exec",
                                                        "preload"),
                           requests=200, slow_requests=3, ood_limit=100, no_guard_points=())


@dataclass
class Row:
    system: str
    storage: str
    seq_mode: str
    target_x: float | None
    target_ms: float | None
    memory_mb: float | None
    accuracy: dict = field(default_factory=dict)          # the weights' accuracy, in batches
    served_accuracy: dict = field(default_factory=dict)   # of the labels returned, request by request
    served_accuracy_no_guard: float | None = None         # test split, the same plan without the guard
    latency_median_ms: float = math.nan
    latency_p95_ms: float = math.nan
    latency_p99_ms: float = math.nan
    hit_rate: float | None = None
    hit_rate_ci: tuple[float, float] | None = None        # 95% Wilson interval
    planned_ms: float | None = None
    predicted_ratio: float | None = None   # median over requests of measured / predicted at its length
    stall_median_ms: float | None = None
    guard_rate: float | None = None
    replans: int | None = None                # plans swapped in because the device drifted (--follow)
    replan_history: list = field(default_factory=list)  # for each: the request it came after, the drifts
    guard_skipped_mean: float | None = None   # shards the guard left out, per request
    guard_lowered_mean: float | None = None   # shards the guard read at fewer bits, per request
    embed_read_median_ms: float | None = None  # the IO lane's embedding rows, per request (engine systems)
    embed_hit_share: float | None = None      # distinct tokens whose word rows were resident
    row_cache_bytes: int | None = None        # resident embedding rows the plans hold
    peak_model_bytes: int | None = None
    rss_growth_bytes: int | None = None
    requests: int = 0
    note: str = ""


# --- helpers -----------------------------------------------------------------------------
def fixed_plan(device, importance, store_id: str, layers, m: int, bits, seq_len: int, fixed_bytes: int,
               hidden: int, name: str) -> Plan:
    """A baseline's schedule as a Plan (no planning, no preload: StdPL and the fixed small
    submodel), with the same predictions a planned plan carries; it may stall."""
    layers, bits = tuple(layers), tuple(tuple(row) for row in bits)
    timeline = simulate(layers, m, bits, (), device, seq_len)
    latency = timeline[-1].compute_end + device.head_ms
    streamed = [sum(device.shard_bytes[b] for b in row) for row in bits]
    inflight, working = predicted_memory(streamed, device.shard_bytes[32], importance.num_shards, seq_len, hidden)
    acc = importance.submodel_acc(len(layers), m) - sum(
        importance.shard_penalty(layer, j, b) for layer, row in zip(layers, bits) for j, b in enumerate(row))
    return Plan(
        PlanRequest(planner=name, store_id=store_id, device_id=profile_id(device), importance_id=profile_id(importance),
                    target_ms=latency, memory_bytes=fixed_bytes, seq_len=seq_len, fixed_bytes=fixed_bytes,
                    model_layers=importance.num_layers, model_shards=importance.num_shards),
        PlanChoice(n=len(layers), m=m, layers=layers, bits=bits, preload=()),
        PlanPrediction(latency_ms=latency, accuracy=acc, submodel_accuracy=importance.submodel_acc(len(layers), m),
                       full_accuracy=importance.full_accuracy,
                       embed_ms=device.setup_ms + device.embed_read_ms(seq_len),   # the lanes' start
                       head_ms=device.head_ms, preload_bytes=0.0, inflight_bytes=float(inflight), working_bytes=working,
                       resident_bytes=fixed_bytes + inflight + working, timeline=timeline))


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def skew_bandwidth(device, store: Store, seq_len: int) -> float:
    """Bytes/s at which reading a full-precision layer takes 3.6x its compute."""
    layer_bytes = device.shard_bytes[32] * store.config.num_shards
    return layer_bytes / (3.6 * device.compute_ms(store.config.num_shards, seq_len) / 1e3)


class Harness:
    """Everything one benchmark run shares: store, data, tokenizer, profiles, results."""

    def __init__(self, store_dir: Path, model_dir: Path, cfg: BenchConfig, log=print):
        self.store_dir, self.model_dir, self.cfg, self.log = Path(store_dir), Path(model_dir), cfg, log
        # every system computes with the engine's thread count (one core left to the IO lane)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
        with Store(store_dir) as s:
            # an earlier run's conditions are checked against this store first, before any work
            self.borrowed = same_conditions(cfg.conditions_from, s) if cfg.conditions_from else None
            self.config, self.store_id = s.config, s.store_id
            self.rows_per_block = s.tables["position"][1]
            self.fixed = api.resident_bytes(s)
            self.weights32 = s.load_model(32)
        self.tokenizer = Tokenizer(store_dir)
        self.test = load_split("test")
        if cfg.requests is not None and (isinstance(cfg.requests, bool) or not isinstance(cfg.requests, int)
                                         or cfg.requests < 1):
            raise InputError(f"--requests must be a positive integer, got {cfg.requests!r}")
        self.served_test = self.test[:cfg.requests] if cfg.requests else self.test
        self.sample = [e.text for e in self.served_test]
        rng = np.random.default_rng(cfg.seed)
        self.ood = {}
        if cfg.ood_limit is not None and (isinstance(cfg.ood_limit, bool) or not isinstance(cfg.ood_limit, int)
                                          or cfg.ood_limit < 0):
            raise InputError(f"--ood-limit must be 0 (no out-of-domain sets) or more, got {cfg.ood_limit!r}")
        for name in OOD_SETS if cfg.ood_limit != 0 else ():
            ex = load_split(name)
            if cfg.ood_limit and len(ex) > cfg.ood_limit:
                ex = [ex[i] for i in sorted(rng.choice(len(ex), cfg.ood_limit, replace=False))]
            self.ood[name] = ex
        self.importance = api.importance_profile(store_dir, log=log, builtin=True)  # the built-in task's
        self.max_tokens = min(api.DEFAULT_MAX_LENGTH, self.config.max_tokens)  # the engine's default cut
        self.cut = Tokenizer(store_dir, max_length=self.max_tokens)  # request lengths as the engine cuts them
        self.dev_texts = [e.text for e in load_split("dev")]
        self.dev_tokens = self.cut.ids(self.dev_texts)
        self.dev_lengths = [len(ids) for ids in self.dev_tokens]
        self.row_counts = api.row_counts(store_dir, self.max_tokens)  # the training split's
        self._lengths: dict = {}
        self.rows: list[Row] = []
        self.profiles: list[dict] = []  # every device profile measured, with where it was used
        self._devices: dict = {}
        self._skew: str | None = None
        self._acc_cache: dict = {}

    # --- accuracy of exact weights + submodel, cached per (layers, shards, bits) ---
    def accuracy_of(self, layers, shards, bits) -> dict:
        key = (tuple(layers), tuple(map(tuple, shards)), tuple(map(tuple, bits)))
        if key not in self._acc_cache:
            self._acc_cache[key] = self._scored(layers, shards, bits, self.sets)
        return self._acc_cache[key]

    @property
    def sets(self) -> dict:
        return {"test": self.test, **self.ood}

    def _scored(self, layers, shards, bits, sets: dict) -> dict:
        """{name: accuracy} of the exact weights of a submodel and bitwidths on each set."""
        with Store(self.store_dir) as s:
            w = self.weights32.clone()
            for layer, ids, b in zip(layers, shards, bits):
                w.layers[layer] = s.layer(layer, list(ids), list(b))
        sub = Submodel(tuple(layers), tuple(tuple(i) for i in shards))
        # accuracy is not timed: use every core for it, then give the engine's setting back
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            return {k: accuracy(w, self.tokenizer, ex, sub) for k, ex in sets.items()}
        finally:
            torch.set_num_threads(threads)

    def plan_accuracy(self, plans: Plan | PlanSet) -> dict:
        """The weights' accuracy in batches; with length-aware plans, each example is scored
        with the plan of its length, as the engine serves it."""
        if isinstance(plans, Plan) or len(plans.plans) == 1:
            plan = plans if isinstance(plans, Plan) else plans.first
            return self.accuracy_of(plan.choice.layers, plan.shards, plan.choice.bits)
        hits = dict.fromkeys(self.sets, 0.0)
        for plan in {id(p): p for p in plans.plans}.values():
            mine = {name: [e for e, n in zip(ex, self.lengths(name)) if plans.plan_for(n) is plan]
                    for name, ex in self.sets.items()}
            mine = {name: ex for name, ex in mine.items() if ex}
            for name, acc in self._scored(plan.choice.layers, plan.shards, plan.choice.bits, mine).items():
                hits[name] += acc * len(mine[name])
        return {name: hits[name] / len(ex) for name, ex in self.sets.items()}

    def lengths(self, name: str) -> list[int]:
        """Token counts of a set's examples (the engine's cut)."""
        if name not in self._lengths:
            self._lengths[name] = self.cut.lengths([e.text for e in self.sets[name]])
        return self._lengths[name]

    # --- storage and device profiles ---
    def storage_spec(self, storage: str, seq_len: int) -> str:
        """The storage to open: the skew storage's bandwidth is fixed by the first warm
        profile of the run, so every system meets the same storage."""
        if storage != SKEW:
            return storage
        if self._skew is None:
            base = self.device("warm", seq_len, f"{SKEW} bandwidth")
            with Store(self.store_dir) as s:
                self._skew = f"emulate:{skew_bandwidth(base, s, seq_len) / 1e6:.1f}MB/s"
        return self._skew

    def device(self, spec: str, seq_len: int, used_for: str):
        """A device profile of this storage measured now (compute too: it runs beside that
        storage's IO lane), kept in the results."""
        p = measure_device(self.store_dir, storage=spec, seq_len=seq_len)
        self.profiles.append({"storage": spec, "used_for": used_for, "profile": p.to_dict()})
        return p

    def group_device(self, storage: str, seq_mode: str, spec: str, seq_len: int, full_ms: float,
                     corrected: bool = True):
        """The profile the systems of one storage and length mode run with (measured once,
        when the group's first system needs it, so that every system plans from the same
        figures); `corrected` on the engine unless the config says not to (the planned
        systems take it raw and correct it at each point: `point_device`)."""
        key = (storage, seq_mode)
        if key not in self._devices:
            self._devices[key] = self.borrowed_device(_label(storage, seq_mode)) if self.borrowed is not None \
                else self.device(spec, seq_len, _label(storage, seq_mode))
        if not (corrected and self.cfg.calibrate):
            return self._devices[key]
        return self.point_device(storage, seq_mode, spec, full_ms, 1.5, max(self.cfg.memories_mb), "fixed plans")

    def point_device(self, storage: str, seq_mode: str, spec: str, full_ms: float, x: float, mem: float,
                     what: str = "") -> DeviceProfile:
        """The group's profile corrected on the engine as a user's engine is when it opens
        for these targets (`sti.open_engine`): probed under the joint plans for T = x times
        the T unit and M = mem when the first planned system reaches the point (the others
        plan from the same profile)."""
        label = _label(storage, seq_mode, (x, mem) if not what else None, what)
        if label not in self._devices:
            if self.borrowed is not None:
                self._devices[label] = self.borrowed_device(label)
            else:
                raw = self._devices[(storage, seq_mode)]
                self._devices[label] = self.calibrated(raw, spec, SEQ_MODES[seq_mode], x * full_ms, mem)
                self.profiles.append({"storage": spec, "used_for": label, "profile": self._devices[label].to_dict()})
        return self._devices[label]

    def borrowed_device(self, used_for: str):
        """The profile the earlier run used for `used_for`, as this store's."""
        found = [p["profile"] for p in self.borrowed["conditions"]["device_profiles"] if p["used_for"] == used_for]
        if not found:
            raise InputError(f"{self.cfg.conditions_from} has no device profile used for {used_for!r}: "
                             "run the same storages, length modes, targets and memories (and --calibrate or not) "
                             "as it did")
        device = replace(DeviceProfile.from_dict(found[-1], self.cfg.conditions_from), store_id=self.store_id)
        self.profiles.append({"storage": device.storage, "used_for": used_for + f" (from {self.cfg.conditions_from})",
                              "profile": device.to_dict()})
        return device

    def t_unit(self, storage: str, seq_mode: str) -> float:
        """The full model's time that T is a multiple of: the earlier run's, if borrowed."""
        group = f"{storage}/{seq_mode}"
        if self.borrowed is None:
            return full_compute_ms(self.weights32, self.tokenizer, self.sample, SEQ_MODES[seq_mode])
        units = self.borrowed["conditions"]["full_compute_ms"]
        if group not in units:
            raise InputError(f"{self.cfg.conditions_from} measured no T unit for {group}: "
                             "run the same storages and length modes as it did")
        return float(units[group])

    def calibrated(self, device, spec: str, pad_to, target_ms: float, mem: float):
        """The device profile corrected on the engine, probed with dev-split requests under
        the joint plans for these targets."""
        from .calibrate import calibrated
        plans = planned(self, "sti-joint", device, target_ms, mem, pad_to)
        with Engine(Store(self.store_dir, spec), plans, device, storage=spec, guard=False, pad_to=pad_to) as engine:
            engine.run(self.dev_texts[0])
            return calibrated(engine, self.dev_texts, lambda msg: self.log(f"{spec}, T = {target_ms:.1f} ms, "
                                                                           f"M = {mem} MB: {msg}"))


def _label(storage: str, seq_mode: str, point: tuple | None = None, what: str = "") -> str:
    """What a device profile of the run was used for (results.json keeps it; an earlier
    run's conditions are looked up by it)."""
    label = f"{storage} / {seq_mode}"
    if point is not None:
        return label + f", calibrated on the engine at T = {point[0]:g}x, M = {point[1]:g} MB"
    return label + (f", calibrated on the engine for the {what}" if what else "")


# --- measuring one system at one point -------------------------------------------------------
def time_requests(fn, texts: list[str]) -> tuple[list[float], list]:
    out, lat = [], []
    for text in texts:
        t = time.perf_counter()
        out.append(fn(text))
        lat.append((time.perf_counter() - t) * 1e3)
    return lat, out


def served(labels: list[str], examples, names: tuple[str, ...]) -> float:
    """Accuracy of the labels a system returned (by name) against the examples' labels."""
    return served_ids([names.index(got) for got in labels], examples)


def run_engine(store_dir: Path, plan: Plan | PlanSet, device, storage: str, pad_to, sets: dict, guard=True,
               replan=None) -> dict:
    """The engine over every example of `sets` ({name: examples}, "test" first), one request
    at a time after one warm-up request: latency and guard figures over the test requests,
    served accuracy per set. Given `replan` (`replanner`), the engine follows the device."""
    engine = Engine(Store(store_dir, storage), plan, device, storage=storage, guard=guard, pad_to=pad_to,
                    replan=replan, follow=replan is not None)
    try:
        first = next(iter(sets.values()))
        engine.run(first[0].text)  # warm-up: the first request pays for lazy initialisation
        out = {"served_accuracy": {}}
        for name, examples in sets.items():
            rss = PeakRSS()
            lat, results = time_requests(engine.run, [e.text for e in examples])
            out["served_accuracy"][name] = served([r.label for r in results], examples, engine.config.labels)
            if name != "test":
                continue
            out["rss_growth_bytes"] = rss.growth()
            reports = [r.report for r in results]
            final = [{(c[0], c[1]): c[3] for c in r.guard_changes} for r in reports]  # a shard's last change
            out.update(lat=lat, peak_model_bytes=max(r.peak_model_bytes for r in reports),
                       preload_bytes=engine.preload_bytes,
                       ratio=statistics.median(r.latency_ms / r.predicted_ms for r in reports),
                       stall=statistics.median(r.stall_ms for r in reports),
                       guard_rate=sum(bool(r.guard_changes) for r in reports) / len(reports),
                       guard_skipped=statistics.fmean(sum(b is None for b in f.values()) for f in final),
                       guard_lowered=statistics.fmean(sum(b is not None for b in f.values()) for f in final),
                       embed_read=statistics.median(r.embed_read_ms for r in reports),
                       embed_hits=sum(r.embed_hits for r in reports) / max(1, sum(r.embed_hits + r.embed_misses
                                                                                for r in reports)),
                       row_cache_bytes=engine.rows.nbytes,
                       replans=sum(e.get("kind") == "drift" and "error" not in e for e in engine.history)
                       if replan is not None else None,
                       replan_history=[{"request": e["request"], "drift": e.get("drift", {}), "error": e.get("error")}
                                       for e in engine.history])
        return out
    finally:
        engine.close()


def run_reference(tokenizer: Tokenizer, load, texts: list[str], pad_to) -> dict:
    """A baseline built from `load()` -> (weights, model bytes), called per request."""
    def one(text):
        weights, _ = load()
        batch = tokenizer.encode([text], pad_to=pad_to)
        return classify(weights, batch.input_ids, batch.attention_mask)
    one(texts[0])
    rss = PeakRSS()
    lat, logits = time_requests(one, texts)
    return {"lat": lat, "peak_model_bytes": load()[1], "rss_growth_bytes": rss.growth(),
            "labels": [int(x.argmax()) for x in logits]}


def model_bytes(weights) -> int:
    return sum(t.numel() * 4 for t in weights.tensors().values())


def hf_runner(h: Harness, mode: str, pad_to):
    """transformers' AutoModel loaded as users do it, with the model's own head (ours pools
    by the mean, which transformers has no module for)."""
    from transformers import AutoModel
    from .hf import weight_files
    # our head is applied below; BERT's and RoBERTa's own pooler is not needed
    kw = {"add_pooling_layer": False} if h.config.family in ("bert", "roberta") else {}
    head = h.weights32.head

    def forward(model, text):
        batch = h.tokenizer.encode([text], pad_to=pad_to)
        with torch.inference_mode():
            hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            return head_logits(head, hidden.float(), batch.attention_mask)  # (a bfloat16 model's too)

    if mode == "bf16":  # resident, every weight and activation in bfloat16, as transformers runs it
        resident = AutoModel.from_pretrained(h.model_dir, dtype=torch.bfloat16, **kw).eval()
        return (lambda text: forward(resident, text)), None
    if mode == "from_pretrained":
        def one(text):
            for f in weight_files(h.model_dir)[1]:
                evict(f)
            model = AutoModel.from_pretrained(h.model_dir, **kw).eval()
            return forward(model, text)
        return one, None
    from accelerate import disk_offload
    tmp = tempfile.mkdtemp(prefix="sti-offload-")
    model = AutoModel.from_pretrained(h.model_dir, **kw).eval()
    disk_offload(model, offload_dir=tmp)

    def one(text):
        for f in Path(tmp).glob("*.dat"):
            evict(f)
        return forward(model, text)
    return one, tmp


def planned(h: Harness, system: str, device, target: float, mem: float, pad_to) -> PlanSet:
    """The plans of a planned system at one point: sti-joint at own lengths plans per length
    bucket (unless the config says one plan); otherwise one plan for the padded length or
    for plan_len_own tokens."""
    cfg, planner = h.cfg, system.split("-")[1]
    if planner == "joint" and pad_to is None and cfg.length_aware and cfg.row_cache:
        return make_plan_set_with_rows(device, h.importance, h.store_id, target, int(mem * 1e6), h.dev_tokens,
                                       h.max_tokens, h.config.hidden_size, h.rows_per_block, fixed_bytes=h.fixed,
                                       headroom=cfg.headroom, prune=h.config.elastic,
                                       source=f"dev split, {len(h.dev_tokens)} requests", counts=h.row_counts)
    if planner == "joint" and pad_to is None and cfg.length_aware:
        return make_plan_set(device, h.importance, h.store_id, target, int(mem * 1e6), h.dev_lengths, h.max_tokens,
                             fixed_bytes=h.fixed, headroom=cfg.headroom, prune=h.config.elastic,
                             source=f"dev split, {len(h.dev_lengths)} requests")
    plan_len = pad_to or cfg.plan_len_own
    return PlanSet.single(make_plan(
        device, h.importance, h.store_id, target, int(mem * 1e6), seq_len=plan_len, planner=planner,
        fixed_bytes=h.fixed, headroom=cfg.headroom, prune=h.config.elastic,
        embed_tokens=device.embed_tokens(plan_len, min(plan_len, cfg.plan_len_own), h.rows_per_block)))


def replanner(h: Harness, system: str, pad_to):
    """How a planned system's engine plans again when it follows the device, as the
    engines `sti.open_engine` opens do (api._Replanner): the device drifted (`kept`
    given), the joint planner streams around the kept buffer and rows; otherwise, and for
    the paper planner, `planned` afresh from the drifted profile."""
    rows = pad_to is None and h.cfg.length_aware and h.cfg.row_cache  # plans costed on the dev split's tokens

    def replan(device, latency_ms: float, memory_mb: float, kept=None, new_buffer: bool = False):
        if kept is None or system != "sti-joint":
            return planned(h, system, device, latency_ms, memory_mb, pad_to)
        return replan_around(kept, device, h.importance, h.dev_tokens if rows else None, h.rows_per_block,
                             h.config.hidden_size, h.cfg.headroom, new_buffer)
    return replan


def measure_point(h: Harness, system: str, storage_name: str, seq_mode: str, full_ms: float) -> list[Row]:
    """Rows for one system under one storage and length mode, across the T x M grid."""
    cfg = h.cfg
    pad_to = SEQ_MODES[seq_mode]
    plan_len = pad_to or cfg.plan_len_own
    storage = h.storage_spec(storage_name, plan_len)
    # the systems that run our engine plan and predict with the group's fresh profile (the
    # planned ones with it corrected at each point)
    uses_profile = system in PLANNED or system in FIXED
    device = h.group_device(storage_name, seq_mode, storage, plan_len, full_ms, corrected=system in FIXED) \
        if uses_profile else None
    sets = {"test": h.served_test, **h.ood}

    def row(**kw) -> Row:
        return Row(system=system, storage=storage_name, seq_mode=seq_mode, **kw)

    def engine_fields(m: dict, target: float) -> dict:
        return dict(served_accuracy=m["served_accuracy"], **latency_stats(m["lat"], target),
                    predicted_ratio=m["ratio"], stall_median_ms=m["stall"], guard_rate=m["guard_rate"],
                    replans=m["replans"], replan_history=m["replan_history"],
                    guard_skipped_mean=m["guard_skipped"], guard_lowered_mean=m["guard_lowered"],
                    embed_read_median_ms=m["embed_read"], embed_hit_share=m["embed_hits"],
                    row_cache_bytes=m["row_cache_bytes"],
                    peak_model_bytes=m["peak_model_bytes"], rss_growth_bytes=m["rss_growth_bytes"],
                    requests=len(m["lat"]))

    if system in PLANNED:
        rows = []
        width = pad_to or int(statistics.median(h.lengths("test")))  # the planned_ms reported: this length's plan
        for x in cfg.targets_x:
            for mem in cfg.memories_mb:
                target = x * full_ms
                try:
                    dev = h.point_device(storage_name, seq_mode, storage, full_ms, x, mem) if cfg.calibrate else device
                    plan = planned(h, system, dev, target, mem, pad_to)
                except StiError as exc:
                    rows.append(row(target_x=x, target_ms=target, memory_mb=mem, note=f"infeasible: {exc}"[:300]))
                    continue
                m = run_engine(h.store_dir, plan, dev, storage, pad_to, sets,
                               replan=replanner(h, system, pad_to) if cfg.follow else None)
                r = row(target_x=x, target_ms=target, memory_mb=mem, accuracy=h.plan_accuracy(plan),
                        planned_ms=plan.plan_for(width).predicted.latency_ms,
                        note=", ".join(filter(None, [
                            f"{len(plan.plans)} plans by length" if len(plan.plans) > 1 else "",
                            f"followed the device: {m['replans']} replans" if m["replans"] is not None else ""])),
                        **engine_fields(m, target))
                if system == "sti-joint" and (x, mem) in cfg.no_guard_points:
                    free = run_engine(h.store_dir, plan, dev, storage, pad_to, {"test": h.served_test}, guard=False)
                    r.served_accuracy_no_guard = free["served_accuracy"]["test"]
                rows.append(r)
        return rows
    c = h.config
    whole = (range(c.num_layers), [range(c.num_shards)] * c.num_layers, [[32] * c.num_shards] * c.num_layers)
    fields, note = {}, ""
    if system in FIXED:
        n, mm, b = {"stdpl-fp32": (c.num_layers, c.num_shards, 32), "stdpl-4bit": (c.num_layers, c.num_shards, 4),
                    "small-submodel": (*map(min, zip(*map(parse_grid_key, h.importance.submodel_accuracy))), 32)}[system]
        layers = depth_layers(c.num_layers, n)
        plan = fixed_plan(device, h.importance, h.store_id, layers, mm, [[b] * mm for _ in layers],
                          seq_len=plan_len, fixed_bytes=h.fixed, hidden=c.hidden_size, name=system)
        m = run_engine(h.store_dir, plan, device, storage, pad_to, sets, guard=False)
        acc = h.plan_accuracy(plan)
        per_target = lambda target: engine_fields(m, target)  # noqa: E731
    elif system == "preload":
        w = h.weights32
        acc = h.accuracy_of(*whole)
        runs = {name: run_reference(h.tokenizer, lambda: (w, model_bytes(w)), [e.text for e in ex], pad_to)
                for name, ex in sets.items()}
        m = runs["test"]
        fields = dict(served_accuracy={name: served_ids(r["labels"], sets[name]) for name, r in runs.items()})
        per_target = lambda target: reference_fields(m, target)  # noqa: E731
    elif system == "preload-bf16":
        one, _ = hf_runner(h, "bf16", pad_to)
        one(h.served_test[0].text)
        acc = h.accuracy_of(*whole)
        rss = PeakRSS()
        runs = {name: time_requests(one, [e.text for e in ex]) for name, ex in sets.items()}
        m = {"lat": runs["test"][0], "peak_model_bytes": model_bytes(h.weights32) // 2, "rss_growth_bytes": rss.growth()}
        fields = dict(served_accuracy={name: served_ids([int(x.argmax()) for x in logits], sets[name])
                                       for name, (_, logits) in runs.items()})
        note = "accuracy (batches) is the fp32 weights'; served is bfloat16's"
        per_target = lambda target: reference_fields(m, target)  # noqa: E731
    elif system == "load-exec":
        def load():
            with Store(h.store_dir, storage) as s:
                weights = s.load_model(32)
            return weights, model_bytes(weights)
        m = run_reference(h.tokenizer, load, h.sample[:cfg.slow_requests], pad_to)
        acc = h.accuracy_of(*whole)
        note = f"accuracy in batches, same weights as preload ({len(m['lat'])} requests timed, seconds each)"
        per_target = lambda target: reference_fields(m, target)  # noqa: E731
    elif system.startswith("hf-"):
        if storage_name != "cold":
            return [row(target_x=None, target_ms=None, memory_mb=None, note="reads files itself: cold storage only")]
        offload = system == "hf-disk-offload"
        one, tmp = hf_runner(h, "disk_offload" if offload else "from_pretrained", pad_to)
        try:
            texts = h.sample if offload else h.sample[:cfg.slow_requests]
            one(texts[0])
            rss = PeakRSS()
            lat, logits = time_requests(one, texts)
        finally:
            if tmp:
                import shutil
                shutil.rmtree(tmp, ignore_errors=True)
        m = {"lat": lat, "peak_model_bytes": None, "rss_growth_bytes": rss.growth()}
        acc = h.accuracy_of(*whole)
        if offload:
            fields = dict(served_accuracy={"test": served_ids([int(x.argmax()) for x in logits], h.served_test)})
            note = "served on the test split; out-of-domain accuracy in batches; model bytes not accounted"
        else:
            note = f"accuracy in batches, same weights as preload ({len(lat)} requests timed); model bytes not accounted"
        per_target = lambda target: reference_fields(m, target)  # noqa: E731
    else:
        raise InputError(f"unknown system {system!r}: choose from {', '.join(SYSTEMS)}")
    return [row(target_x=x, target_ms=x * full_ms, memory_mb=None, accuracy=acc, note=note, **fields,
                **per_target(x * full_ms)) for x in cfg.targets_x]


def served_ids(labels: list[int], examples) -> float:
    """Accuracy of the label ids a system returned against the examples' labels."""
    return sum(got == e.label for got, e in zip(labels, examples)) / len(examples)


def reference_fields(m: dict, target: float) -> dict:
    return dict(**latency_stats(m["lat"], target), peak_model_bytes=m["peak_model_bytes"],
                rss_growth_bytes=m["rss_growth_bytes"], requests=len(m["lat"]))


def full_compute_ms(weights, tokenizer: Tokenizer, texts: list[str], pad_to: int | None) -> float:
    """The T unit: median latency of the whole fp32 model resident in memory."""
    return statistics.median(run_reference(tokenizer, lambda: (weights, 0), texts, pad_to)["lat"])


def run_bench(store_dir, model_dir, cfg: BenchConfig | None = None, log=print, progress=None,
              checkpoint=None, command: str = "") -> dict:
    """Run the benchmark; returns {"config", "conditions", "rows"}. `checkpoint(results)`, if
    given, receives the results so far (marked partial) after every step."""
    cfg = cfg or BenchConfig()
    unknown = [s for s in cfg.systems if s not in SYSTEMS]
    if unknown:
        raise InputError(f"unknown systems {unknown}: choose from {', '.join(SYSTEMS)}")
    unknown = [m for m in cfg.seq_modes if m not in SEQ_MODES]
    if unknown:
        raise InputError(f"unknown length modes {unknown}: choose from {', '.join(SEQ_MODES)}")
    h = Harness(store_dir, model_dir, cfg, log)
    units = {}
    steps = [(st, sm, sys) for st in cfg.storages for sm in cfg.seq_modes for sys in cfg.systems]
    for i, (storage, seq_mode, system) in enumerate(steps):
        group = f"{storage}/{seq_mode}"  # the T unit is measured again for every group (drift)
        if group not in units:
            units[group] = h.t_unit(storage, seq_mode)
            log(f"full model, resident, {seq_mode} lengths: {units[group]:.2f} ms (the T unit for {storage}"
                + (f", from {cfg.conditions_from})" if h.borrowed else ")"))
        t0 = time.perf_counter()
        h.rows.extend(measure_point(h, system, storage, seq_mode, units[group]))
        log(f"[{i + 1}/{len(steps)}] {system} / {storage} / {seq_mode}: {time.perf_counter() - t0:.0f} s")
        if checkpoint is not None:
            checkpoint({"config": asdict(cfg), "conditions": conditions(h, units, command), "partial": True,
                        "rows": [asdict(r) for r in h.rows]})
        if progress is not None and progress(i + 1, len(steps)) is False:
            break
    return {"config": asdict(cfg), "conditions": conditions(h, units, command), "rows": [asdict(r) for r in h.rows]}


def same_conditions(path, store: Store) -> dict:
    """An earlier run's results (a results.json or the directory holding one), checked to be
    of a store of `store`'s shape and record sizes, whose figures this run may plan with."""
    path = Path(path)
    path = path / "results.json" if path.is_dir() else path
    try:
        results = json.loads(path.read_text())
        profiles = results["conditions"]["device_profiles"]
        results["conditions"]["full_compute_ms"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not the results.json of a finished `sti bench` run ({exc})") from None
    sizes = {b: float(np.median([r.length for k, r in store.shards.items() if k[2] == b])) for b in store.bits}
    config = store.config.to_dict()
    for entry in profiles:
        theirs = {int(b): v for b, v in entry["profile"]["shard_bytes"].items()}
        if theirs != sizes:
            raise InputError(f"{path} was measured on a store whose shards have other sizes ({theirs} bytes by "
                             f"bitwidth, this one {sizes}): its figures do not hold here")
    source = results["conditions"].get("store_config")
    if source is not None and source != config:
        raise InputError(f"{path} was measured on a store of another model shape: its figures do not hold here")
    return results


def conditions(h: Harness, units: dict, command: str = "") -> dict:
    from .profile_device import machine
    return {"machine": machine(), "threads": torch.get_num_threads(), "store_id": h.store_id, "command": command,
            "store_config": h.config.to_dict(), "conditions_from": h.cfg.conditions_from,
            "store": str(h.store_dir), "model": str(h.model_dir), "full_compute_ms": units,
            "device_profiles": h.profiles, "importance_method": h.importance.method,
            "fp32_model_bytes": model_bytes(h.weights32), "test_size": len(h.test),
            "ood_sizes": {k: len(v) for k, v in h.ood.items()}, "latency_sample": len(h.sample),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
