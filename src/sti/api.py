"""The short path from a store to answers: profiles kept beside the store, plans, engines.

    with sti.open_engine(store_dir, latency_ms=30, memory_mb=2, storage="cold") as engine:
        result = engine.run("a gripping, beautifully acted film")

Profiles live in `<store>/profiles/` as JSON, one device profile per (storage, sequence
length) and one importance profile per method; missing ones are measured on first use
(device: under 2 minutes; importance: under a minute with the cheap `gradient` method) and
reused afterwards.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

from .errors import InputError, StiError
from .planning import PlanError, PlanSet, make_plan, make_plan_set
from .profiles import DeviceProfile, ImportanceProfile, load_profile, save_profile
from .storage import parse_storage
from .store import Store

DEFAULT_SEQ_LEN = 48  # one plan for every length assumes this many tokens: the test split's 95th percentile is 47
# The share of T a plan keeps back: the profiles are medians on a shared, noisy machine, and
# the deadline guard spends this when a request runs late (see runtime/guards.py).
DEFAULT_HEADROOM = 0.1


def profiles_dir(store_dir: str | Path) -> Path:
    return Path(store_dir) / "profiles"


def storage_slug(storage: str) -> str:
    mode, bandwidth, latency = parse_storage(storage)
    if mode != "emulate":
        return mode
    return f"emulate-{bandwidth / 1e6:g}MBps-{latency * 1e3:g}ms"


def device_profile_path(store_dir, storage: str) -> Path:
    """One device profile per storage mode: its compute fit covers every sequence length."""
    return profiles_dir(store_dir) / f"device-{storage_slug(storage)}.json"


def importance_profile_path(store_dir, method: str, data: bool = False) -> Path:
    """Where the importance profile of a method is kept: one measured on the built-in dev
    split, and (with `data`) one measured on a user's data file, beside it."""
    if not re.fullmatch(r"[a-z]+", method):
        raise InputError(f"unknown importance method {method!r}: use degrade or gradient")
    return profiles_dir(store_dir) / f"importance-{method}{'-data' if data else ''}.json"


def device_profile(store_dir, storage: str = "cold", measure: bool = True, log=print) -> DeviceProfile:
    """The saved device profile for this store and storage; measured if missing."""
    path = device_profile_path(store_dir, storage)
    store_id = store_id_of(store_dir)
    if not measure or (path.exists() and not _outdated(path, "device")):
        return load_profile(path, store_id)
    from .profile_device import measure_device
    log(f"measuring the device profile ({storage}) once; saved to {path}"
        + (" (the saved one is of an older sti)" if path.exists() else ""))
    profile = measure_device(store_dir, storage=storage)
    save_profile(profile, path)
    return profile


IMPORTANCE_METHODS = ("degrade", "gradient")  # the paper's first: preferred when both are saved


def _outdated(path: Path, kind: str) -> bool:
    """A saved profile in an older format version (measured again rather than refused:
    profiles are measurements, not user data)."""
    import json
    from .profiles import VERSIONS
    try:
        return json.loads(path.read_bytes()).get("version") != VERSIONS[kind]
    except (OSError, ValueError, AttributeError):
        return False  # unreadable: load_profile says why


def importance_profile(store_dir, method: str | None = None, measure: bool = True, log=print,
                       builtin: bool = False) -> ImportanceProfile:
    """The saved importance profile for this store; measured on the dev split if missing.
    One measured on a user's data file (`sti profile importance --data`) comes first while
    that file is unchanged (it is of the user's task), unless `builtin` asks for the
    built-in data's (the benchmark does). With `method` None, the best one saved (the
    paper's `degrade` before `gradient`); if none is, the cheap `gradient` one is measured
    (on MiniLM and 2 cores well under a minute, against about 9 minutes for `degrade`;
    their shard rankings agree closely)."""
    store_id = store_id_of(store_dir)
    methods = IMPORTANCE_METHODS if method is None else (method,)
    if not builtin:
        for m in methods:
            path = importance_profile_path(store_dir, m, data=True)
            if path.exists():
                profile = load_profile(path, store_id)
                if data_unchanged(profile.data):
                    return profile
    if method is None:
        saved = [m for m in IMPORTANCE_METHODS if importance_profile_path(store_dir, m).exists()]
        method = saved[0] if saved else "gradient"
    path = importance_profile_path(store_dir, method)
    if path.exists() or not measure:
        return load_profile(path, store_id)
    from .profile_importance import measure_importance
    log(f"measuring shard importance ({method}, dev split) once; saved to {path}"
        + ("" if method == "degrade" else f" (the paper's method: `sti profile importance {store_dir} --method "
                                           "degrade`, several minutes)"))
    profile = measure_importance(store_dir, method=method)
    save_profile(profile, path)
    return profile


def store_id_of(store_dir) -> str:
    with Store(store_dir) as store:
        return store.store_id


def resident_bytes(store: Store) -> int:
    """Bytes that are always resident: the per-layer records, the head, embedding misc."""
    return sum(r.length for r in store.layers.values()) + store.singles["head"].length \
        + store.singles["embed_misc"].length


def check_targets(latency_ms: float, memory_mb: float) -> None:
    for name, v, lo in (("latency", latency_ms, 0.0), ("memory", memory_mb, 0.0)):
        try:
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        except OverflowError:
            ok = False
        if not ok:
            raise InputError(f"the {name} target must be a finite number, got {str(v)[:40]}")
    if latency_ms <= 0 or latency_ms > 3.6e6:
        raise InputError(f"--latency-ms must be in (0, 3600000], got {latency_ms}")
    if memory_mb < 0 or memory_mb > 1e6:
        raise InputError(f"--memory-mb must be in [0, 1000000], got {memory_mb}")


DEFAULT_MAX_LENGTH = 128  # tokens a request is cut to unless told (never past the model's limit)


def check_max_length(store: Store, max_length: int | None) -> int:
    """`max_length` checked against the model's position embeddings (None: the default)."""
    limit = store.config.max_tokens
    if max_length is None:
        return min(DEFAULT_MAX_LENGTH, limit)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= limit:
        raise InputError(f"--max-length must be an integer in 2..{limit} (the model's position embeddings "
                         f"cover {limit} tokens), got {max_length!r}")
    return max_length


def dev_texts() -> list[str]:
    """The built-in dev split's sentences (never the test split, which the benchmark scores)."""
    from .data import load_split
    return [e.text for e in load_split("dev")]


def calibration_texts(path: str | Path | None = None, count: int | None = None,
                      columns: dict | None = None, seed: int = 0) -> list[tuple[str, str | None]]:
    """Texts a store's GPTQ rounding is calibrated on, as (text, second text or None): `count`
    (default 512) spread evenly over a data file's rows (docs/DATA.md), or drawn with `seed`
    from the built-in training split (never dev or test, which profiles and benchmarks use;
    another seed is another draw, to measure how much the rounding depends on it; a data
    file's spread has no seed)."""
    import random
    from .gptq import CALIBRATION_TEXTS
    count = CALIBRATION_TEXTS if count is None else count
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InputError(f"the calibration count must be a positive integer, got {count!r}")
    if path is None:
        from .data import load_split
        train = [(e.text, e.text_pair) for e in load_split("train")]
        random.Random(seed).shuffle(train)
        return train[:count]
    found = _file_requests(path, columns or {})
    if not found:
        raise InputError(f"{path}: no texts to calibrate on")
    return [found[i * len(found) // count] for i in range(min(count, len(found)))]


def sample_requests(importance: ImportanceProfile | None = None) -> tuple[list[tuple[str, str | None]], str]:
    """The requests plans are made for and calibration probes run: the examples of the data
    file the importance profile was measured on, if it is still there unchanged (so a task
    of sentence pairs is planned for its own lengths), else the built-in dev split. Returns
    (text, second text or None) pairs and where they came from."""
    source = importance.data if importance is not None else None
    if data_unchanged(source):
        found = _file_requests(source["path"], source.get("columns", {}))
        step = max(1, -(-len(found) // MAX_SAMPLE))  # an even spread of at most MAX_SAMPLE requests
        return found[::step], f"data file {Path(source['path']).name} (the importance profile's)"
    return [(t, None) for t in dev_texts()], "dev split"


def _file_requests(path, columns: dict) -> list[tuple[str, str | None]]:
    """Every example of a data file as (text, second text or None)."""
    from .datafile import Columns, rows
    return [(r.text, r.pair) for r in rows(Path(path), Columns(**columns))]


def request_ids(store_dir, max_length: int, requests: list[tuple[str, str | None]]) -> list[list[int]]:
    """Token ids of (text, second text or None) requests under this store's tokenizer."""
    from .tokenizer import Tokenizer
    return Tokenizer(store_dir, max_length=max_length).ids([t for t, _ in requests], [p for _, p in requests])


MAX_SAMPLE = 2000  # sample requests taken from a user's data file


def data_unchanged(source: dict | None) -> bool:
    """Is the data file a profile was measured on still there, unchanged (size and sha256)?"""
    if source is None:
        return False
    path = Path(source["path"])
    if not path.is_file():
        return False
    st = path.stat()
    return st.st_size == source["size"] and _sha256(str(path), st.st_size, st.st_mtime_ns) == source["sha256"]


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256, hashed once per version of it (size and modification time): opening
    an engine asks for it several times (importance profile, plans, calibration)."""
    from .assets import sha256_file
    return sha256_file(Path(path))


def request_lengths(store_dir, max_length: int | None = None,
                    requests: list[tuple[str, str | None]] | None = None) -> list[int]:
    """Token counts of sample requests (default: `sample_requests` of the store's saved
    importance profile) under this store's tokenizer: the length distribution
    length-aware plans are made for unless told otherwise."""
    from .tokenizer import Tokenizer
    with Store(store_dir) as store:
        max_length = check_max_length(store, max_length)
    if requests is None:
        requests = sample_requests(_saved_importance(store_dir))[0]
    return Tokenizer(store_dir, max_length=max_length).lengths([t for t, _ in requests], [p for _, p in requests])


def row_counts(store_dir, max_length: int, importance: ImportanceProfile | None = None):
    """How many requests hold each token (`rowcache.token_counts`), counted on the requests
    the model learned from: every example of the importance profile's data file if it is
    still there unchanged, else the built-in training split. The row cache holds the most
    frequent ones; plans measure its misses on other requests (`sample_requests`)."""
    source = importance.data if importance is not None else None
    if data_unchanged(source):
        return _counts(str(store_dir), max_length, source["path"], source["sha256"],
                       tuple(sorted(source.get("columns", {}).items())))
    return _counts(str(store_dir), max_length, None, None, ())


@functools.lru_cache(maxsize=8)
def _counts(store_dir: str, max_length: int, path, sha256, columns):
    """Counted once per store, length and data file version (tokenizing the training split
    takes about half a second, and an engine plans several times as it opens)."""
    from .rowcache import token_counts
    if path is None:
        from .data import load_split
        requests = [(e.text, None) for e in load_split("train")]
    else:
        requests = _file_requests(path, dict(columns))
    return token_counts(request_ids(store_dir, max_length, requests))


def _saved_importance(store_dir, method: str | None = None) -> ImportanceProfile | None:
    try:
        return importance_profile(store_dir, method, measure=False)
    except StiError:
        return None


def plan(store_dir, latency_ms: float, memory_mb: float, planner: str = "joint", storage: str = "cold",
         seq_len: int | None = None, method: str | None = None, log=print, headroom: float = DEFAULT_HEADROOM,
         allow_pruning: bool = False, max_length: int | None = None, lengths=None,
         device: DeviceProfile | None = None, row_cache: bool = True) -> PlanSet:
    """Plans for this store under a latency target (ms) and a preload budget (MB), each
    predicted to finish by (1 - headroom) * T. With the joint planner and no `seq_len`:
    length-aware plans, one per 8-token bucket up to `max_length`, sharing the preload
    buffer that is best for `lengths` (token counts of sample requests; by default the dev
    split's, `request_lengths`). With a `seq_len`, or the paper planner (default 48 tokens,
    the test split's 95th percentile), one plan serves every length. Layers and shards are
    left out only if the model was trained elastic (`sti finetune`) or `allow_pruning` says
    so; otherwise the plans choose bitwidths and the preload buffer for the whole model.
    `method` picks the importance profile (None: the best saved, see `importance_profile`);
    `device` overrides the saved device profile (e.g. one calibrated on the engine). With
    length-aware plans made for sample requests (no `lengths` given) and `row_cache`, part
    of M may hold the frequent tokens' embedding rows, if that buys more accuracy than
    preloading shards (planning/rows.py)."""
    check_targets(latency_ms, memory_mb)
    device = device or device_profile(store_dir, storage, log=log)
    importance = importance_profile(store_dir, method, log=log)
    with Store(store_dir) as store:
        max_length = check_max_length(store, max_length)
        prune = bool(allow_pruning or store.config.elastic)
        if planner == "joint" and seq_len is None:
            source = "given lengths"
            if lengths is None:
                requests, source = sample_requests(importance)
                if row_cache:
                    from .planning import make_plan_set_with_rows
                    tokens = request_ids(store_dir, max_length, requests)
                    return make_plan_set_with_rows(
                        device, importance, store.store_id, float(latency_ms), int(memory_mb * 1e6), tokens,
                        max_length, store.config.hidden_size, store.tables["word"][1],
                        fixed_bytes=resident_bytes(store), headroom=headroom, prune=prune,
                        source=f"{source}, {len(tokens)} requests",
                        counts=row_counts(store_dir, max_length, importance))
                lengths = request_lengths(store_dir, max_length, requests)
            return make_plan_set(device, importance, store.store_id, float(latency_ms), int(memory_mb * 1e6),
                                 lengths, max_length, fixed_bytes=resident_bytes(store), headroom=headroom,
                                 prune=prune, source=f"{source}, {len(lengths)} requests")
        seq_len = min(DEFAULT_SEQ_LEN if seq_len is None else seq_len, max_length)
        return PlanSet.single(make_plan(device, importance, store.store_id, float(latency_ms), int(memory_mb * 1e6),
                                        seq_len=seq_len, planner=planner, fixed_bytes=resident_bytes(store),
                                        headroom=headroom, prune=prune))


def open_engine(store_dir, latency_ms: float, memory_mb: float, storage: str = "cold", planner: str = "joint",
                seq_len: int | None = None, guard: bool = True, method: str | None = None, log=print,
                headroom: float = DEFAULT_HEADROOM, allow_pruning: bool = False, max_length: int | None = None,
                warmup: bool = True, lengths=None, calibrate: bool = True, row_cache: bool = True,
                follow=False, follow_memory_pressure: bool = False, device: DeviceProfile | None = None):
    """An engine ready to answer requests within `latency_ms` with a `memory_mb` preload buffer;
    requests longer than `max_length` tokens are truncated. The plans are `plan`'s (length-
    aware unless a `seq_len` or the paper planner is asked for), made from the device profile
    corrected on the engine itself (`calibrated_device`, about a second) unless `calibrate`
    is False; `row_cache` lets the plans hold embedding rows resident (see `plan`). With
    `warmup`, one throwaway request runs first, so that the caller's first answer is not
    slowed (and cut by the deadline guard) by lazy initialisation. With `follow` (True,
    or a `runtime.follow.Band`), the engine follows the device: when it runs slower or
    faster than its profile, it plans again and swaps the plans in between requests
    (runtime/follow.py); with `follow_memory_pressure`, it halves its preload budget while
    Linux reports memory pressure and grows it back when calm (runtime/pressure.py); `engine.retarget` and
    `engine.resize` change T and M on an open engine either way. A `device` profile given
    (one `calibrated_device` returned, say, to open several engines from one calibration)
    is used as it is: neither loaded nor calibrated."""
    args = (store_dir, latency_ms, memory_mb, planner, storage, seq_len, method, log, headroom, allow_pruning)
    if device is None:
        device = calibrated_device(*args, max_length=max_length, lengths=lengths, row_cache=row_cache) if calibrate \
            else device_profile(store_dir, storage, log=log)
    return _engine(store_dir, storage, device, guard, max_length, warmup, args, lengths, row_cache, follow,
                   follow_memory_pressure)


def calibrated_device(store_dir, latency_ms: float, memory_mb: float, planner: str = "joint",
                      storage: str = "cold", seq_len: int | None = None, method: str | None = None, log=print,
                      headroom: float = DEFAULT_HEADROOM, allow_pruning: bool = False,
                      max_length: int | None = None, lengths=None, row_cache: bool = True) -> DeviceProfile:
    """The saved device profile corrected on the engine (calibrate.py): an engine opened with
    the plans for these targets runs dev-split probe requests without its deadline guard."""
    from .calibrate import calibrated
    device = device_profile(store_dir, storage, log=log)
    requests, source = sample_requests(importance_profile(store_dir, method, log=log))
    args = (store_dir, latency_ms, memory_mb, planner, storage, seq_len, method, log, headroom, allow_pruning)
    with _engine(store_dir, storage, device, False, max_length, True, args, lengths, row_cache) as engine:
        return calibrated(engine, requests, log, source)


def _engine(store_dir, storage, device, guard, max_length, warmup, args, lengths, row_cache=True, follow=False,
            pressure=False):
    from .runtime import Engine
    store = Store(store_dir, storage)
    try:
        max_length = check_max_length(store, max_length)
        plans = plan(*args, max_length=max_length, lengths=lengths, device=device, row_cache=row_cache)
        replan = _Replanner(args, max_length, lengths, row_cache)
        if follow:
            replan.prepare()   # so that the first replan is as quick as the later ones
        from .runtime.pressure import MemoryPressure
        engine = Engine(store, plans, device, storage=storage, guard=guard, max_length=max_length,
                        replan=replan, follow=follow, memory_pressure=MemoryPressure() if pressure else None)
        if warmup:  # an engine's first request pays for lazy initialisation: not the caller's
            engine.run("warm up")
        return engine
    except BaseException:
        store.close()
        raise


class _Replanner:
    """How an engine opened here plans again (`Engine.replan`): with `kept` (the device
    drifted), around the kept preload buffer and rows (planning/rows.py `replan_around`;
    the paper planner plans afresh);
    without it (new targets), `plan` from scratch for the engine's current profile. What a
    quick replan needs (the importance profile, the sample's token ids) is loaded once,
    by `prepare` (opening the store alone takes about a second)."""

    def __init__(self, args, max_length: int, lengths, row_cache: bool):
        self.args, self.max_length, self.lengths, self.row_cache = args, max_length, lengths, row_cache
        self._ready = None

    def prepare(self):
        if self._ready is None:
            store_dir, method, seq_len = self.args[0], self.args[6], self.args[5]
            importance = importance_profile(store_dir, method, log=_quiet)
            tokens = None
            if self.row_cache and seq_len is None and self.lengths is None:  # the plans costed the rows' misses
                requests = sample_requests(importance)[0]
                tokens = request_ids(store_dir, self.max_length, requests)
            with Store(store_dir) as store:
                self._ready = (importance, tokens, store.config.hidden_size, store.tables["word"][1])
        return self._ready

    def __call__(self, device, latency_ms: float, memory_mb: float, kept=None, new_buffer: bool = False):
        store_dir, _, _, planner, storage, seq_len, method, _, headroom, allow_pruning = self.args
        if kept is None or planner != "joint":
            return plan(store_dir, latency_ms, memory_mb, planner, storage, seq_len, method, _quiet, headroom,
                        allow_pruning, self.max_length, self.lengths, device, self.row_cache)
        from .planning.rows import replan_around
        importance, tokens, hidden, per_block = self.prepare()
        return replan_around(kept, device, importance, tokens, per_block, hidden, headroom, new_buffer)


def _quiet(*args, **kwargs) -> None:
    """A replan runs beside requests: nothing to print."""


def classify_exact(store_dir, texts: list[str], max_length: int | None = None, batch_size: int = 32,
                   pairs: list[str | None] | None = None) -> list[dict]:
    """The whole model at full precision (every shard's 32-bit record), no plan and no
    deadline: the reference answer of a store, for checking. `pairs[i]`, if given, is text
    i's second text. One dict per text: label, probs, logits, truncated."""
    items = list(zip(texts, pairs if pairs is not None else [None] * len(texts)))
    return [answer for _, answer in exact_answers(store_dir, items, max_length, batch_size)]


def exact_answers(store_dir, items, max_length: int | None = None, batch_size: int = 32):
    """`classify_exact` over an iterable of (text, second text or None, ...) tuples, read
    and answered a batch at a time: yields (item, answer)."""
    import itertools
    import torch
    from .encoder import classify
    from .tokenizer import Tokenizer
    with Store(store_dir) as store:
        if 32 not in store.bits:
            raise InputError(f"store {store_dir} holds no 32-bit shards (bits {list(store.bits)}): build it with 32 "
                             "among --bits to run it exactly")
        max_length = check_max_length(store, max_length)
        weights = store.load_model(32)
    tokenizer = Tokenizer(store_dir, max_length=max_length)
    items = iter(items)
    while chunk := list(itertools.islice(items, batch_size)):
        batch = tokenizer.encode([item[0] for item in chunk], pairs=[item[1] for item in chunk])
        logits = classify(weights, batch.input_ids, batch.attention_mask, token_type_ids=batch.token_type_ids)
        for item, row, truncated in zip(chunk, logits, batch.truncated):
            probs = torch.softmax(row, -1)
            yield item, {"label": weights.config.labels[int(row.argmax())], "probs": probs.tolist(),
                         "logits": row.tolist(), "truncated": truncated}


def evaluate_file(store_dir, data, latency_ms: float, memory_mb: float, storage: str = "cold",
                  planner: str = "joint", limit: int | None = None, columns=None, log=print, progress=None,
                  slow_after: int | None = None, resize_after: tuple[int, float] | None = None,
                  **engine_options):
    """Serve every example of a labelled data file (TSV, CSV or JSONL: datafile.py) through an
    engine under (T, M), as a user's requests would be: the accuracy of the labels it returned,
    latency over every request, hit and guard rates, peak model bytes, beside the fused full
    model's accuracy on the same examples (`evaluate.Served`). `engine_options` go to
    `open_engine`; `progress(done, total)` returning False (or Ctrl-C) stops early with what
    was measured. For demonstrations of an engine following the device (`follow=True`):
    `slow_after` N halves the emulated storage's bandwidth before request N, `resize_after`
    (N, MB) resizes the preload budget before request N."""
    from dataclasses import replace
    from .datafile import Columns, read_examples, source_of
    from .evaluate import serve
    columns = columns or Columns()
    with Store(store_dir) as store:
        labels = store.config.labels
    examples = read_examples(data, labels, columns, limit)
    source = source_of(data, len(examples), columns).to_dict()
    if slow_after is not None and not storage.startswith("emulate"):
        raise InputError(f"--slow-after slows emulated storage only, not {storage!r}: give --storage emulate:...")

    def before(i: int, engine) -> None:
        if i == slow_after:
            engine.store.reader.bandwidth /= 2
            log(f"before request {i}: the emulated storage is now 2x slower")
        if resize_after is not None and i == resize_after[0]:
            try:
                engine.resize(resize_after[1])
                log(f"before request {i}: the preload budget is now {resize_after[1]:g} MB")
            except PlanError as exc:   # the engine is unchanged: serve on with the plans it has
                log(f"before request {i}: no plan fits {resize_after[1]:g} MB, the plans are kept ({exc})")
    with open_engine(store_dir, latency_ms, memory_mb, storage=storage, planner=planner, log=log,
                     **engine_options) as engine:
        with Store(store_dir) as store:
            full = store.load_model(max(store.bits))  # the whole model, resident, for comparison
        return replace(serve(engine, examples, full, progress, before), data=source)
