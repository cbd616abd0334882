"""Soak and slow-storage benchmark for the runtime.

Soak: REQUESTS requests (default 10,000) in one process against one Engine. Reports the RSS
growth between request 500 (after warm-up) and the last request (target: under 10 MB), the
thread and file-descriptor counts before the engine opened and after it closed, and checks that
every answer equals the first answer for the same text.

Slow storage (--slow F): the store is read through an EmulatedReader F times slower than the
device profile says (bandwidth / F, per-read latency x F), and the deadline hit rate is measured
with the deadline guard on and off (target with the guard: >= 95%). A run at the profiled speed
(F = 1, guard on) is the control.

By default both run on a tiny random model (3 layers x 4 shards) built in a temporary directory,
with a hand-made importance profile and a device profile measured here on emulated storage
(5 MB/s, 0.1 ms per read, so that IO matters for so small a model). With --store DIR the real
store is used with its saved profiles (`sti profile device/importance`) for --storage.

    .venv/bin/python benchmarks/bench_soak.py                  # soak, 10,000 requests
    .venv/bin/python benchmarks/bench_soak.py --slow 2         # soak, then the slow-storage run
    .venv/bin/python benchmarks/bench_soak.py --slow 2 --no-soak
    .venv/bin/python benchmarks/bench_soak.py --store DIR --storage cold --latency-ms 30 --memory-mb 2 --slow 2

Writes benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from sti.api import DEFAULT_HEADROOM, device_profile, importance_profile, resident_bytes
from sti.config import PRESETS
from sti.planning import Plan, make_plan
from sti.profile_device import measure_device
from sti.profiles import DeviceProfile, ImportanceProfile
from sti.runtime import Engine
from sti.storage import EmulatedReader
from sti.store import DATA, Store, build_store
from sti.weights import ModelWeights

OUT = Path(__file__).parent / "results" / "soak.json"
RSS_TARGET_MB = 10.0
HIT_TARGET = 0.95
TINY_BITS = (2, 4, 32)
TINY_STORAGE = "emulate:5MB/s,0.1ms"
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(116)]
REVIEWS = [
    "a gripping, beautifully acted film", "dull and far too long", "the plot never quite comes together",
    "one of the warmest comedies of the year", "an unwatchable mess", "it is smart, funny and surprisingly moving",
    "the actors do what they can with a thin script", "a triumph of style over substance",
    "i laughed, i cried, i bought the soundtrack", "by the end i had stopped caring about anyone on screen",
    "a quietly devastating portrait of a family coming apart", "loud, stupid and proud of it",
    "the best thing about the movie is its score", "a film that trusts its audience",
    "every scene goes on a beat too long, and the jokes land flat", "charming",
]


# --- the tiny setup ----------------------------------------------------------------------------
def tiny_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(TINY_VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def tiny_texts(count: int = 40) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(f"w{i}" for i in rng.integers(0, 116, int(rng.integers(1, 40)))) for _ in range(count)]


def hand_importance(store: Store) -> ImportanceProfile:
    """Importance of a random model is arbitrary: earlier shards of a layer matter more."""
    c = store.config
    grid = {f"{n},{m}": 0.5 + 0.1 * n + 0.02 * m for n in range(1, c.num_layers + 1)
            for m in range(1, c.num_shards + 1)}
    packed = [b for b in store.bits if b != 32]
    errors = {b: 2.0 ** -(b - min(packed)) for b in packed} | {32: 0.0}
    return ImportanceProfile(store_id=store.store_id, method="degrade", split="dev", seed=0, lowest_bits=min(packed),
                             full_accuracy=0.9, submodel_accuracy=grid,
                             shard_kl=tuple(tuple(0.1 / (1 + j) for j in range(c.num_shards))
                                            for _ in range(c.num_layers)),
                             shard_acc_drop=None, bits_error=errors, kl_to_acc=0.5)


def hand_device(store: Store, read_ms: float = 0.05) -> DeviceProfile:
    """A fast made-up device under which the planner picks mixed bitwidths and a preload buffer."""
    sizes = {b: float(store.shard_record(0, 0, b).length) for b in store.bits}
    return DeviceProfile(store_id=store.store_id, storage="warm", threads=1, seq_len=16, shard_bytes=sizes,
                         shard_read_ms={b: read_ms * sizes[b] / sizes[32] for b in store.bits},
                         shard_decode_ms={b: 0.001 for b in store.bits}, layer_read_ms=0.001,
                         compute_coef=(0.05, 0.0, 0.0, 0.0), compute_fit_error=0.0,
                         embed_ms=(0.01, 0.0), head_ms=0.01)


def build_tiny(root: Path) -> Path:
    tok = tiny_tokenizer(root / "tokenizer")
    return build_store(ModelWeights.random(PRESETS["tiny"], seed=1), root / "store", bits=TINY_BITS,
                       tokenizer_from=tok)


# --- measurements ------------------------------------------------------------------------------
def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 1e6


def counts() -> dict:
    gc.collect()
    return {"python_threads": threading.active_count(), "os_threads": psutil.Process().num_threads(),
            "fds": len(os.listdir("/proc/self/fd"))}


def soak(make_engine, texts: list[str], requests: int, warmup: int = 500, every: int = 500, log=print) -> dict:
    before = counts()
    engine = make_engine()
    first: dict[str, torch.Tensor] = {}
    mismatched = guarded = missed = 0
    rss_at, latencies = {}, []
    t0 = time.perf_counter()
    for i in range(1, requests + 1):
        text = texts[i % len(texts)]
        r = engine.run(text)
        latencies.append(r.report.latency_ms)
        missed += not r.report.met_deadline
        if r.report.guard_changes:
            guarded += 1  # the guard changed the plan: this answer may differ, by design
        elif text not in first:
            first[text] = r.logits.clone()
        elif not torch.equal(first[text], r.logits):
            mismatched += 1
        if i == warmup or i % every == 0 or i == requests:
            rss_at[i] = rss_mb()
            if i % (every * 4) == 0 or i == requests:
                log(f"  request {i:>6}: RSS {rss_at[i]:8.1f} MB  ({time.perf_counter() - t0:6.1f} s)")
    wall = time.perf_counter() - t0
    during = counts()
    engine.close()
    del engine
    after = counts()
    start = rss_at.get(warmup, rss_at[min(rss_at)])
    growth = rss_at[requests] - start
    return {
        "requests": requests, "warmup": warmup, "wall_s": wall, "requests_per_s": requests / wall,
        "rss_mb": {str(k): v for k, v in sorted(rss_at.items())},
        "rss_growth_mb": growth, "rss_target_mb": RSS_TARGET_MB, "rss_ok": growth < RSS_TARGET_MB,
        "rss_max_minus_start_mb": max(v for k, v in rss_at.items() if k >= warmup) - start,
        "latency_ms": {"median": statistics.median(latencies), "p95": float(np.percentile(latencies, 95)),
                       "max": max(latencies)},
        "missed_deadline": missed, "guard_acted": guarded, "answers_differing_from_first": mismatched,
        "before": before, "while_open": during, "after_close": after,
        "leaked": {k: after[k] - before[k] for k in before},
    }


def fit_reader(device: DeviceProfile) -> tuple[float, float]:
    """(bandwidth B/s, latency s) of the storage the profile describes: read_ms = lat + bytes / bw,
    least squares over the bitwidths."""
    x = np.array([device.shard_bytes[b] for b in device.bits])
    y = np.array([device.shard_read_ms[b] for b in device.bits]) / 1e3
    if len(x) < 2 or np.ptp(x) == 0:
        return float(x.mean() / max(y.mean(), 1e-9)), 0.0
    slope, lat = np.polyfit(x, y, 1)
    if slope <= 0:
        return float(x.max() / max(y.max(), 1e-9)), 0.0
    return float(1.0 / slope), max(0.0, float(lat))


def deadline_run(store_path: Path, plan: Plan, device: DeviceProfile, bandwidth: float, latency_s: float,
                 guard: bool, texts: list[str], requests: int, warmup: int) -> dict:
    reader = EmulatedReader(store_path / DATA, bandwidth, latency_s)
    engine = Engine(Store(store_path, reader=reader), plan, device, guard=guard)
    for i in range(warmup):
        engine.run(texts[i % len(texts)])
    lat, hits, changed, skipped, lowered = [], 0, 0, 0, 0
    for i in range(requests):
        r = engine.run(texts[i % len(texts)]).report
        lat.append(r.latency_ms)
        hits += r.met_deadline
        if r.guard_changes:
            changed += 1
            final = {(layer, shard): new for layer, shard, _, new in r.guard_changes}
            skipped += sum(new is None for new in final.values())
            lowered += sum(new is not None for new in final.values())
    engine.close()
    return {"guard": guard, "bandwidth_MBps": bandwidth / 1e6, "latency_ms_per_read": latency_s * 1e3,
            "requests": requests, "hit_rate": hits / requests, "latency_ms_median": statistics.median(lat),
            "latency_ms_p95": float(np.percentile(lat, 95)), "latency_ms_max": max(lat),
            "requests_guard_acted": changed, "shards_skipped_per_request": skipped / requests,
            "shards_lowered_per_request": lowered / requests}


# --- main --------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, help="a real store with saved profiles (default: a tiny random model)")
    ap.add_argument("--storage", default="warm", help="storage of the device profile to use with --store")
    ap.add_argument("--latency-ms", type=float, default=None, help="target T (--store: required)")
    ap.add_argument("--memory-mb", type=float, default=None, help="preload budget M (--store: required)")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--no-soak", action="store_true", help="skip the soak")
    ap.add_argument("--slow", type=float, default=None, help="also run storage this many times slower than profiled")
    ap.add_argument("--slow-requests", type=int, default=400)
    ap.add_argument("--target-factors", default="1.25,1.5,2",
                    help="tiny model, slow run: each T = factor x the latency this engine measures for the "
                         "no-preload plan at the profiled speed")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.target_factors = [float(f) for f in args.target_factors.split(",") if f.strip()]
    if args.store and (args.latency_ms is None or args.memory_mb is None):
        ap.error("--store needs --latency-ms and --memory-mb")
    if args.slow is not None and not args.slow >= 1:
        ap.error("--slow must be >= 1")
    torch.set_num_threads(2)
    results = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                           "torch": torch.__version__, "load_avg_at_start": os.getloadavg()}}
    with tempfile.TemporaryDirectory(prefix="sti-soak-") as tmp:
        if args.store:
            store_path, texts = args.store, REVIEWS
            device = device_profile(store_path, args.storage, measure=False)
            importance = importance_profile(store_path, "degrade", measure=False)
            with Store(store_path) as s:
                plan = make_plan(device, importance, s.store_id, args.latency_ms, int(args.memory_mb * 1e6),
                                 seq_len=48, fixed_bytes=resident_bytes(s), headroom=DEFAULT_HEADROOM)
            soak_engine = lambda: Engine(Store(store_path, args.storage), plan, device, storage=args.storage)  # noqa: E731
            results["setup"] = {"store": str(store_path), "storage": args.storage, "target_ms": args.latency_ms,
                                "memory_mb": args.memory_mb, "guard": True}
        else:
            store_path, texts = build_tiny(Path(tmp)), tiny_texts()
            with Store(store_path) as s:
                device, importance = hand_device(s), hand_importance(s)
                plan = make_plan(device, importance, s.store_id, 0.5, 12000, seq_len=16)
            # the guard stays off here (the made-up device is far faster than this one), so every
            # answer can be checked against the first answer for its text; --slow exercises the guard
            soak_engine = lambda: Engine(Store(store_path, "warm"), plan, device, storage="warm", guard=False)  # noqa: E731
            results["setup"] = {"store": "tiny random model (3 layers x 4 shards, hidden 32), built here",
                                "storage": "warm", "plan": {"n": plan.choice.n, "m": plan.choice.m, "bits": plan.choice.bits,
                                                            "preload": plan.choice.preload}, "guard": False}
        print(f"setup: {results['setup']}")

        if not args.no_soak:
            print(f"soak: {args.requests} requests against one engine")
            s = soak(soak_engine, texts, args.requests, warmup=min(500, args.requests))
            results["soak"] = s
            print_soak(s)

        if args.slow is not None:
            results["slow"] = slow_storage(args, store_path, texts, device, importance, plan)
            print_slow(results["slow"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=list))
    print(f"wrote {args.out}")
    ok = results.get("soak", {}).get("rss_ok", True) and results.get("slow", {}).get("ok", True)
    return 0 if ok else 1


def slow_storage(args, store_path: Path, texts, device, importance, plan) -> dict:
    """The deadline hit rate on storage `args.slow` times slower than profiled, guard on and off,
    for each target T (tiny model: T = factor x the measured full-precision latency)."""
    factor, n, w = args.slow, args.slow_requests, 20
    if not args.store:
        # a device profile measured here, on storage slow enough that IO matters for the tiny model
        print(f"measuring a device profile of the tiny store on {TINY_STORAGE} ...")
        device = measure_device(store_path, storage=TINY_STORAGE, seq_len=16, samples=12, repeat=5)
        with Store(store_path) as s:
            store_id = s.store_id
    bandwidth, latency = fit_reader(device)
    setup = {"device_storage": TINY_STORAGE if not args.store else args.storage, "slowdown": factor,
             "profiled_bandwidth_MBps": bandwidth / 1e6, "profiled_latency_ms": latency * 1e3,
             "requests_per_run": n}
    if args.store:
        plans = [(None, plan)]
    else:
        # with no preload buffer the planner streams the first layer's four shards (the later
        # layers' IO could not hide behind the tiny model's compute); T leaves room over what
        # this engine really takes for that plan at the profiled speed (its per-request
        # overhead is not in the profile)
        base_plan = make_plan(device, importance, store_id, 1e6, 0, seq_len=16)
        probe = deadline_run(store_path, base_plan, device, bandwidth, latency, False, texts, 60, 10)
        setup.update(full_precision_planned_ms=base_plan.predicted.latency_ms,
                     full_precision_measured_ms=probe["latency_ms_median"], memory_bytes=0)
        plans = [(f, make_plan(device, importance, store_id, f * probe["latency_ms_median"], 0, seq_len=16))
                 for f in args.target_factors]
    runs = []
    for f, p in plans:
        print(f"slow storage: T {p.request.target_ms:.2f} ms, plan {p.predicted.latency_ms:.2f} ms (spare {p.request.target_ms - p.predicted.latency_ms:.2f}), "
              f"bits {p.choice.bits}, preload {len(p.choice.preload)}; storage {bandwidth / 1e6:.2f} MB/s + "
              f"{latency * 1e3:.3f} ms per read, then {factor:g}x slower")
        runs.append({
            "target_factor": f, "target_ms": p.request.target_ms, "plan_latency_ms": p.predicted.latency_ms,
            "plan_spare_ms": p.request.target_ms - p.predicted.latency_ms, "plan_bits": [list(r) for r in p.choice.bits],
            "plan_preload": [list(x) for x in p.choice.preload],
            "control_profiled_speed_guard_on": deadline_run(store_path, p, device, bandwidth, latency, True, texts, n, w),
            "guard_on": deadline_run(store_path, p, device, bandwidth / factor, latency * factor, True, texts, n, w),
            "guard_off": deadline_run(store_path, p, device, bandwidth / factor, latency * factor, False, texts, n, w)})
    worst = min(r["guard_on"]["hit_rate"] for r in runs)
    return {"setup": setup, "runs": runs, "hit_target": HIT_TARGET, "worst_hit_rate_guard_on": worst,
            "ok": worst >= HIT_TARGET}


def print_soak(s: dict) -> None:
    rows = [("requests", f"{s['requests']:,} ({s['requests_per_s']:.0f}/s, {s['wall_s']:.1f} s)"),
            (f"RSS at request {s['warmup']}", f"{s['rss_mb'][str(s['warmup'])]:.1f} MB"),
            (f"RSS at request {s['requests']}", f"{s['rss_mb'][str(s['requests'])]:.1f} MB"),
            ("RSS growth (target < 10 MB)", f"{s['rss_growth_mb']:+.2f} MB  {'OK' if s['rss_ok'] else 'OVER'}"),
            ("largest RSS above the start", f"{s['rss_max_minus_start_mb']:+.2f} MB"),
            ("latency median / p95 / max", "{median:.2f} / {p95:.2f} / {max:.2f} ms".format(**s["latency_ms"])),
            ("answers differing from the first", str(s["answers_differing_from_first"])),
            ("python threads before / open / after", "{} / {} / {}".format(
                s["before"]["python_threads"], s["while_open"]["python_threads"], s["after_close"]["python_threads"])),
            ("OS threads before / open / after", "{} / {} / {}".format(
                s["before"]["os_threads"], s["while_open"]["os_threads"], s["after_close"]["os_threads"])),
            ("fds before / open / after", "{} / {} / {}".format(
                s["before"]["fds"], s["while_open"]["fds"], s["after_close"]["fds"]))]
    width = max(len(k) for k, _ in rows)
    print("\nsoak")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def print_slow(r: dict) -> None:
    print(f"\nstorage {r['setup']['slowdown']:g}x slower than profiled "
          f"(target hit rate with the guard >= {HIT_TARGET:.0%}; {r['setup']['requests_per_run']} requests per run)")
    print(f"  {'T ms':>7}{'spare ms':>9}  {'run':<33}{'hit rate':>9}{'median ms':>11}{'p95 ms':>9}"
          f"{'guard acted':>13}{'skipped':>9}{'lowered':>9}")
    for run in r["runs"]:
        for name in ("control_profiled_speed_guard_on", "guard_on", "guard_off"):
            x = run[name]
            print(f"  {run['target_ms']:>7.2f}{run['plan_spare_ms']:>9.2f}  {name:<33}{x['hit_rate']:>9.1%}"
                  f"{x['latency_ms_median']:>11.2f}{x['latency_ms_p95']:>9.2f}{x['requests_guard_acted']:>13}"
                  f"{x['shards_skipped_per_request']:>9.2f}{x['shards_lowered_per_request']:>9.2f}")


if __name__ == "__main__":
    sys.exit(main())
