"""Scale benchmark: the engine on random-initialised BERT-base (12 x 768) and BERT-large (24 x 1024).

For each preset, a store of random weights (BERT's init, seed 0; codec linear, bits 2,3,4,5,6,32)
is built once under $STI_HOME/scale/<preset>-linear, with the real MiniLM tokenizer (the same
30522-word vocabulary as BERT). Its device profile for --storage is measured once and kept in
the store.

Random weights have no accuracy to trade, so the planner gets a stand-in importance profile
(not measured, and said so in the output): submodel accuracy 0.5 + 0.4 (n/N)(m/M), shard j of
a layer weighing 0.8^j (as after rewiring), and an error that halves per extra bit. With it the
plans fill T as they would for a trained model, which is what this benchmark is about: latency
and memory as the model grows. (A measured importance profile of a random model is flat, and
would take hours for BERT-large on a small CPU.)

Then, one request at a time over the first --requests test sentences (unpadded):
  - the T unit: the median latency of the whole fp32 model resident (sti.bench.full_compute_ms);
  - per T (multiples of the unit) and M (% of the fp32 model bytes): a joint plan with the
    default 10% headroom (infeasible points are recorded with the smallest feasible T and M),
    run by the engine after one warm-up request: median and p95 latency, deadline hit rate,
    measured / predicted latency, the share of requests the deadline guard changed, peak
    resident model bytes (our accounting) and the process's peak RSS growth;
  - baselines: Preload (the fp32 model resident) and Load&Exec (read the fp32 model from the
    store in the same storage mode, then run; per request).
Accuracy is not applicable: the weights are random.

    .venv/bin/python benchmarks/bench_scale.py --smoke         # tiny model, 3 requests, T 0.5,2,8x: a check
    .venv/bin/python benchmarks/bench_scale.py                 # bert-base and bert-large
    .venv/bin/python benchmarks/bench_scale.py --presets bert-base --storage cold --targets-x 1,2

Writes benchmarks/results/scale.json (--smoke: scale-smoke.json) after every point, so an
interrupted run keeps what it has.
The first run per preset builds the store (BERT-large: a 1.3 GB fp32 model, a store of about
2.4 GB) and measures the device profile.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

from sti import api
from sti.assets import ensure_model, sti_home
from sti.bench import full_compute_ms, model_bytes, percentile, run_engine, run_reference
from sti.results import write_json
from sti.config import PRESETS, ModelConfig
from sti.data import load_split
from sti.encoder import classify
from sti.errors import Cancelled, StiError, StoreError
from sti.planning import PlanError, make_plan
from sti.profile_device import machine
from sti.profiles import ImportanceProfile
from sti.store import Store, build_store
from sti.tokenizer import Tokenizer
from sti.weights import ModelWeights

RESULTS = Path(__file__).parent / "results"
CODEC = "linear"
ACCURACY_NOTE = "accuracy: not applicable (random weights)"
IMPORTANCE_NOTE = ("importance: a stand-in, not measured (random weights): submodel accuracy 0.5 + 0.4 (n/N)(m/M), "
                   "shard j weighing 0.8^j, error halving per extra bit; it only makes plans fill T")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextlib.contextmanager
def progress_bar(label: str):
    """A progress callback (done, total) -> True: a rich bar on a terminal, else a log line per 10%."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        with Progress(TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(label, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total) or True
        return
    shown = [-1]

    def tick(done: int, total: int) -> bool:
        tenth = 10 * done // max(total, 1)
        if tenth > shown[0]:
            shown[0] = tenth
            log(f"  {label}: {done}/{total}")
        return True
    yield tick


# --- setup: store, weights, profiles -----------------------------------------------------------
def scale_config(preset: str, vocab: int) -> ModelConfig:
    """The preset's shape, widened where it cannot take the real tokenizer's ids (the tiny
    preset: 120 words, 64 positions) so that real sentences can be fed to it."""
    c = PRESETS[preset]
    if c.vocab_size < vocab or c.max_position < 128:
        c = dataclasses.replace(c, vocab_size=max(c.vocab_size, vocab), max_position=max(c.max_position, 512))
        log(f"{preset}: vocabulary widened to {c.vocab_size} and positions to {c.max_position} for the real tokenizer")
    return c


def ensure_store(preset: str, config: ModelConfig, model_dir: Path) -> Path:
    """The preset's store of random weights (seed 0), built only if missing or of another shape."""
    store_dir = sti_home() / "scale" / f"{preset}-{CODEC}"
    try:
        with Store(store_dir) as s:
            if s.config == config and s.codec == CODEC:
                return store_dir
            log(f"{store_dir} holds another model shape or codec: rebuilding it")
    except StoreError as exc:
        if (store_dir / "manifest.json").exists():
            log(f"{store_dir} is unusable ({exc}): rebuilding it")
    log(f"{preset}: random weights (seed 0), {config.num_layers} layers x {config.hidden_size} ...")
    weights = ModelWeights.random(config, seed=0)
    t0 = time.perf_counter()
    with progress_bar(f"building {preset} store") as tick:
        build_store(weights, store_dir, codec=CODEC, progress=tick, tokenizer_from=model_dir)
    log(f"{preset}: store built in {time.perf_counter() - t0:.0f} s: {store_dir}")
    return store_dir


def check_finite(weights: ModelWeights, tokenizer: Tokenizer, texts: list[str]) -> None:
    batch = tokenizer.encode(texts[:8])
    logits = classify(weights, batch.input_ids, batch.attention_mask)
    if not torch.isfinite(logits).all():
        raise SystemExit("the random model gives non-finite logits: the benchmark would measure nonsense")


def stand_in_importance(store: Store) -> ImportanceProfile:
    """What random weights cannot give the planner: accuracy growing with the submodel, shards
    ordered as after rewiring, and an error halving per extra bit (see the module docstring)."""
    c, packed = store.config, [b for b in store.bits if b != 32]
    N, M = c.num_layers, c.num_shards
    kl = np.tile(0.8 ** np.arange(M), (N, 1))
    grid = {f"{n},{m}": 0.5 + 0.4 * (n / N) * (m / M) for n in range(1, N + 1) for m in range(1, M + 1)}
    errors = {b: 2.0 ** -(b - min(packed)) for b in packed} | {32: 0.0}
    return ImportanceProfile(store_id=store.store_id, method="gradient", split="stand-in", seed=0,
                             lowest_bits=min(packed), full_accuracy=0.9, submodel_accuracy=grid,
                             shard_kl=tuple(tuple(row) for row in (kl / kl.sum()).tolist()), shard_acc_drop=None,
                             bits_error=errors, kl_to_acc=0.3, created="stand-in")


def planner_for(store_dir: Path, device):
    """(T ms, M MB) -> a joint plan with the default headroom, from the stand-in importance."""
    with Store(store_dir) as s:
        importance, store_id, fixed = stand_in_importance(s), s.store_id, api.resident_bytes(s)
    return lambda t, mb: make_plan(device, importance, store_id, t, int(mb * 1e6), seq_len=api.DEFAULT_SEQ_LEN,
                                   planner="joint", fixed_bytes=fixed, headroom=api.DEFAULT_HEADROOM)


# --- measurements ----------------------------------------------------------------------------------
def measure_point(store_dir: Path, storage: str, device, plan_for, texts: list[str], x: float, unit_ms: float,
                  pct: float, fp32_bytes: int) -> dict:
    target, mem_mb = x * unit_ms, pct / 100 * fp32_bytes / 1e6
    row = {"target_x": x, "target_ms": target, "memory_pct": pct, "memory_mb": mem_mb}
    try:
        plan = plan_for(target, mem_mb)
    except PlanError as exc:
        return row | {"note": f"infeasible: {exc}", "min_target_ms": exc.min_target_ms,
                      "min_target_x": exc.min_target_ms and exc.min_target_ms / unit_ms,
                      "min_memory_mb": exc.min_memory_bytes and exc.min_memory_bytes / 1e6}
    try:
        m = run_engine(store_dir, plan, device, storage, None, texts)
    except StiError as exc:  # a point that fails is a row that says why, not a lost preset
        return row | {"n": plan.choice.n, "m": plan.choice.m, "note": f"failed: {exc}"}
    return row | {"n": plan.choice.n, "m": plan.choice.m, "bits": [list(b) for b in plan.choice.bits], "preload_shards": len(plan.choice.preload),
                  "preload_bytes": m["preload_bytes"], "planned_ms": plan.predicted.latency_ms,
                  "latency_median_ms": statistics.median(m["lat"]), "latency_p95_ms": percentile(m["lat"], 95),
                  "hit_rate": sum(v <= target for v in m["lat"]) / len(m["lat"]),
                  "predicted_ratio": m["ratio"], "guard_rate": m["guard_rate"],
                  "peak_model_bytes": m["peak_model_bytes"], "rss_growth_bytes": m["rss_growth_bytes"],
                  "requests": len(texts), "note": ""}


def baselines(store_dir: Path, storage: str, weights: ModelWeights, tokenizer: Tokenizer, texts: list[str],
              load_exec_requests: int) -> dict:
    fp32 = model_bytes(weights)
    pre = run_reference(tokenizer, lambda: (weights, fp32), texts, None)

    def load():
        with Store(store_dir, storage) as s:
            w = s.load_model(32)
        return w, model_bytes(w)
    log(f"load&exec: {load_exec_requests} requests, each reading the fp32 model ({fp32 / 1e6:.0f} MB) "
        f"through {storage} (plus a warm-up) ...")
    le = run_reference(tokenizer, load, texts[:load_exec_requests], None)
    return {name: {"latency_median_ms": statistics.median(r["lat"]), "latency_p95_ms": percentile(r["lat"], 95),
                   "peak_model_bytes": r["peak_model_bytes"], "rss_growth_bytes": r["rss_growth_bytes"],
                   "requests": len(r["lat"])}
            for name, r in (("preload", pre), ("load_exec", le))}


def run_preset(preset: str, args, model_dir: Path, vocab: int, texts: list[str], results: dict) -> dict:
    store_dir = ensure_store(preset, scale_config(preset, vocab), model_dir)
    device = api.device_profile(store_dir, args.storage, log=log)
    plan_for = planner_for(store_dir, device)
    with Store(store_dir) as s:
        weights, store_id = s.load_model(32), s.store_id
    tokenizer = Tokenizer(store_dir)
    check_finite(weights, tokenizer, texts)
    fp32 = model_bytes(weights)
    unit = full_compute_ms(weights, tokenizer, texts, None)
    log(f"{preset}: fp32 model {fp32 / 1e6:.1f} MB; resident, own lengths: {unit:.2f} ms (the T unit)")
    out = {"config": weights.config.to_dict(), "store": str(store_dir), "store_id": store_id,
           "fp32_model_bytes": fp32, "t_unit_ms": unit, "device_threads": device.threads, "rows": []}
    results["presets"][preset] = out
    out["baselines"] = baselines(store_dir, args.storage, weights, tokenizer, texts, args.load_exec_requests)
    del weights
    points = [(x, p) for x in args.targets_x for p in args.memory_pct]
    for i, (x, pct) in enumerate(points, 1):
        t0 = time.perf_counter()
        row = measure_point(store_dir, args.storage, device, plan_for, texts, x, unit, pct, fp32)
        out["rows"].append(row)
        write_json(results, args.out)  # after every point: an interrupted run keeps what it has
        what = (f"n x m {row['n']} x {row['m']}, median {row['latency_median_ms']:.1f} ms, "
                f"hit {row['hit_rate']:.0%}") if "hit_rate" in row else row["note"][:80]
        log(f"[{i}/{len(points)}] {preset} T {x:g}x M {pct:g}%: {what} ({time.perf_counter() - t0:.0f} s)")
    return out


# --- output ----------------------------------------------------------------------------------------
def fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def header(c: dict) -> str:
    m = c["machine"]
    return (f"# sti scale benchmark\n\nMachine: {m['processor']} ({m['cpus']} CPUs, {m['memory_gb']} GB), torch "
            f"{m['torch']}, {c['torch_threads']} torch threads, load average at start "
            f"{', '.join(f'{v:.1f}' for v in c['load_avg_at_start'])}; {c['date']}. Storage {c['storage']}. Latency "
            f"over the first {c['requests']} test sentences (own lengths), one request at a time; plans for "
            f"{c['plan_seq_len']} tokens with {c['headroom']:.0%} headroom (joint planner). {ACCURACY_NOTE}. "
            f"{IMPORTANCE_NOTE}.\n")


def markdown(preset: str, r: dict, c: dict) -> str:
    b = r["baselines"]
    mb = lambda v: v and v / 1e6  # noqa: E731
    lines = [f"## {preset} ({r['config']['num_layers']} x {r['config']['hidden_size']}, random weights)", "",
             f"fp32 model {r['fp32_model_bytes'] / 1e6:.1f} MB; T unit (fp32 resident, median) {r['t_unit_ms']:.2f} ms; "
             f"storage {c['storage']}; {c['accuracy']}.",
             f"Preload: median {b['preload']['latency_median_ms']:.1f} ms, p95 {b['preload']['latency_p95_ms']:.1f} ms, "
             f"model {b['preload']['peak_model_bytes'] / 1e6:.1f} MB resident.",
             f"Load&Exec: median {b['load_exec']['latency_median_ms']:.1f} ms over {b['load_exec']['requests']} "
             f"requests, peak {b['load_exec']['peak_model_bytes'] / 1e6:.1f} MB.", "",
             "| T x | T ms | M % | M MB | n x m | planned ms | median ms | p95 ms | measured/predicted | hit rate "
             "| guard | peak model MB | RSS growth MB | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        nm = f"{row['n']} x {row['m']}" if "n" in row else "-"
        note = row["note"]
        if note.startswith("infeasible"):
            t = (f"min T {row['min_target_x']:.2f}x ({row['min_target_ms']:.1f} ms)" if row["min_target_ms"]
                 else "no T fits this M")
            mem = f"min M {row['min_memory_mb']:.2f} MB" if row["min_memory_mb"] else "no M fits this T"
            note = f"infeasible; {t}, {mem}"
        lines.append(
            f"| {row['target_x']:g} | {row['target_ms']:.1f} | {row['memory_pct']:g} | {row['memory_mb']:.2f} | {nm} | "
            f"{fmt(row.get('planned_ms'), '.1f')} | {fmt(row.get('latency_median_ms'), '.1f')} | "
            f"{fmt(row.get('latency_p95_ms'), '.1f')} | {fmt(row.get('predicted_ratio'), '.2f')} | "
            f"{fmt(row.get('hit_rate'), '.0%')} | {fmt(row.get('guard_rate'), '.0%')} | "
            f"{fmt(mb(row.get('peak_model_bytes')), '.2f')} | {fmt(mb(row.get('rss_growth_bytes')), '.1f')} | {note} |")
    return "\n".join(lines)


def floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="bert-base,bert-large", help="model shapes from sti.config.PRESETS")
    ap.add_argument("--storage", default="emulate:100MB/s", help="cold, warm or emulate:BANDWIDTH[,LATENCY]")
    ap.add_argument("--targets-x", type=floats, default=None,
                    help="T as multiples of the fp32 model's resident latency (default 0.5,1,2,3; --smoke: 0.5,2,8, "
                    "as the tiny model's per-shard overheads make the engine several times slower than it)")
    ap.add_argument("--memory-pct", type=floats, default="1,2,5", help="M as %% of the fp32 model bytes")
    ap.add_argument("--requests", type=int, default=20, help="the first N test sentences")
    ap.add_argument("--load-exec-requests", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/scale.json "
                    "(--smoke: scale-smoke.json)")
    ap.add_argument("--smoke", action="store_true", help="the tiny preset and 3 requests, for a fast check")
    args = ap.parse_args()
    presets = ["tiny"] if args.smoke else [p.strip() for p in args.presets.split(",") if p.strip()]
    if args.smoke:
        args.requests = 3
    args.targets_x = args.targets_x or ([0.5, 2.0, 8.0] if args.smoke else [0.5, 1.0, 2.0, 3.0])
    args.out = args.out or RESULTS / ("scale-smoke.json" if args.smoke else "scale.json")
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or not presets:
        ap.error(f"unknown presets {unknown}: choose from {', '.join(PRESETS)}")
    if any(p > 100 for p in args.memory_pct):
        ap.error("--memory-pct: at most 100")
    if args.requests < 1 or args.load_exec_requests < 1:
        ap.error("--requests and --load-exec-requests must be >= 1")
    try:
        api.storage_slug(args.storage)
    except StiError as exc:
        ap.error(str(exc))

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # as sti.bench.Harness: one core for the IO lane
    results = {"benchmark": "scale", "partial": True, "presets": {}, "conditions": {
        "machine": machine(), "torch_threads": torch.get_num_threads(), "storage": args.storage,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load_avg_at_start": os.getloadavg(),
        "requests": args.requests, "load_exec_requests": args.load_exec_requests, "targets_x": args.targets_x,
        "memory_pct": args.memory_pct, "planner": "joint", "headroom": api.DEFAULT_HEADROOM,
        "plan_seq_len": api.DEFAULT_SEQ_LEN, "sequence_lengths": "own (unpadded)",
        "accuracy": ACCURACY_NOTE, "importance": IMPORTANCE_NOTE}}
    c = results["conditions"]
    print(header(c))
    try:
        model_dir = ensure_model(log)
        vocab = HFTokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size()
        texts = [e.text for e in load_split("test")[:args.requests]]
        for preset in presets:
            log(f"=== {preset} ===")
            r = run_preset(preset, args, model_dir, vocab, texts, results)
            write_json(results, args.out)
            print("\n" + markdown(preset, r, c) + "\n", flush=True)
    except (KeyboardInterrupt, Cancelled):
        if results["presets"]:
            write_json(results, args.out)
        print(f"\ninterrupted; partial results (if any) in {args.out}", file=sys.stderr)
        return 130
    results["partial"] = False
    write_json(results, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
