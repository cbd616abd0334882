"""Embedding rows without the wait: the resident row cache (src/sti/rowcache.py).

    .venv/bin/python benchmarks/bench_embedding.py [--store DIR] [--model DIR]

Three measurements, in one run, on the real store at emulated 100 MB/s, one torch thread:
  1. accuracy of the whole fp32 model with every word and position row in the cache's compact
     form (int8, a scale per row) against fp32 rows, on the test split and on each whole
     out-of-domain set (the worst case: a cache holds only some rows compact);
  2. the engine's embedding time per request (the IO lane getting the rows,
     `Report.embed_read_ms`), over every test request at their own lengths and padded to 128,
     without a cache and with the 256, 1024 and 2048 most frequent training-split tokens' word
     rows plus 128 position rows (plans for T = 1.5x, M = 2 MB around each; guard off);
  3. served accuracy at T = 1x and 1.5x, M = 2 MB: `sti bench`'s sti-joint without and with
     the row cache (the planner choosing its size), back to back.
  4. the pages a request's missed rows would take under other layouts of the word table on
     disk (the store's fp32 rows in token order, two to a 4 KiB page; int8 rows ten to a page
     in token order; int8 rows in training-split frequency order), counted, not timed (every
     page costs one read of the same size), without a cache and with the 1024 most frequent
     tokens resident; and the cache's misses when it is ranked on the dev split (the
     requests plans are costed on) against the training split (what plans now use).
Writes benchmarks/results/embedding.json (key `embed_ms_median_100MBps`: own lengths, the
largest cache of at most 0.5 MB; `..._pad128` its twin) and prints the tables.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from sti import api
from sti.atomic import atomic_write_json
from sti.bench import BenchConfig, full_compute_ms, run_bench
from sti.data import OOD_SETS, load_split
from sti.evaluate import accuracy
from sti.planning.rows import plans_with
from sti.rowcache import RowCache, compact, expand, most_frequent, token_counts
from sti.runtime import Engine
from sti.store import Store
from sti.tokenizer import Tokenizer
from sti.weights import Embeddings

STORAGE = "emulate:100MB/s"
CACHES = (0, 256, 1024, 2048)
OUT = Path(__file__).parent / "results" / "embedding.json"


def compact_accuracy(store_dir: Path) -> dict:
    with Store(store_dir) as s:
        fp32 = s.load_model(32)
    e = fp32.embeddings
    rows = replace(fp32, embeddings=Embeddings(word=expand(*compact(e.word)), position=expand(*compact(e.position)),
                                               token_type=e.token_type, ln_w=e.ln_w, ln_b=e.ln_b))
    tok = Tokenizer(store_dir)
    out = {}
    for name in ("test", *OOD_SETS):
        ex = load_split(name)
        a, b = accuracy(fp32, tok, ex), accuracy(rows, tok, ex)
        out[name] = {"examples": len(ex), "fp32_rows": a, "compact_rows": b, "points": 100 * (b - a)}
        print(f"  {name:7} {len(ex):5d}  fp32 rows {a:.4f}  compact rows {b:.4f}  ({100 * (b - a):+.2f} points)")
    return out


def embed_times(store_dir: Path, device, full_ms: float) -> list[dict]:
    importance = api.importance_profile(store_dir, log=lambda *a: None)
    test = [e.text for e in load_split("test")]
    cut = Tokenizer(store_dir, max_length=api.DEFAULT_MAX_LENGTH)
    dev_tokens = cut.ids([e.text for e in load_split("dev")])
    counts = api.row_counts(store_dir, api.DEFAULT_MAX_LENGTH)  # what plans rank by
    with Store(store_dir) as s:
        hidden, per_block, fixed, store_id = s.config.hidden_size, s.tables["word"][1], api.resident_bytes(s), s.store_id
    out = []
    for n in CACHES:
        cache = RowCache(most_frequent(counts, n), api.DEFAULT_MAX_LENGTH, hidden) if n else None
        plans = plans_with(cache, device, importance, store_id, 1.5 * full_ms, 2e6, dev_tokens,
                           api.DEFAULT_MAX_LENGTH, per_block, fixed, api.DEFAULT_HEADROOM, True)
        for mode, pad in (("own", None), ("pad128", 128)):
            with Engine(Store(store_dir, STORAGE), plans, device, storage=STORAGE, guard=False, pad_to=pad) as engine:
                engine.run(test[0])
                reports = [engine.run(t).report for t in test]
            hits = sum(r.embed_hits for r in reports) / sum(r.embed_hits + r.embed_misses for r in reports)
            row = {"words": n, "positions": cache.positions if cache else 0, "bytes": cache.nbytes if cache else 0,
                   "seq": mode, "requests": len(reports),
                   "embed_ms_median": statistics.median(r.embed_read_ms for r in reports),
                   "embed_ms_p95": sorted(r.embed_read_ms for r in reports)[int(0.95 * len(reports))],
                   "hit_share": hits, "misses_median": statistics.median(r.embed_misses for r in reports)}
            out.append(row)
            print(f"  {n:5d} words {row['bytes'] / 1e3:6.0f} KB  {mode:6}  embedding {row['embed_ms_median']:.2f} ms "
                  f"median, {row['embed_ms_p95']:.2f} p95; {hits:.1%} of distinct tokens resident")
    return out


def layouts(store_dir: Path) -> dict:
    """Pages of missed word rows per test request under three on-disk layouts (see the
    module's docstring), and misses with the cache ranked on dev against train counts."""
    cut = Tokenizer(store_dir, max_length=api.DEFAULT_MAX_LENGTH)
    test = cut.ids([e.text for e in load_split("test")])
    train = api.row_counts(store_dir, api.DEFAULT_MAX_LENGTH)
    dev = token_counts(cut.ids([e.text for e in load_split("dev")]))
    with Store(store_dir) as s:
        vocab, hidden, per_page = s.config.vocab_size, s.config.hidden_size, s.tables["word"][1]
    compact_per_page = 4096 // (hidden + 4)   # int8 codes and a float32 scale a row
    ranked = most_frequent(train, len(train))
    order = {t: k for k, t in enumerate([*ranked, *sorted(set(range(vocab)) - set(ranked))])}
    pages = {"fp32_token_order": lambda t: t // per_page, "int8_token_order": lambda t: t // compact_per_page,
             "int8_frequency_order": lambda t: order[t] // compact_per_page}
    out = {"rows_per_page": {"fp32": per_page, "int8": compact_per_page}, "caches": []}
    for n in (0, 1024):
        held = set(ranked[:n])
        missed = [[t for t in dict.fromkeys(ids) if t not in held] for ids in test]
        row = {"words": n, "misses_median": statistics.median(map(len, missed)),
               "misses_mean": statistics.fmean(map(len, missed))}
        for name, page in pages.items():
            counts = [len({page(t) for t in m}) for m in missed]
            row[f"pages_{name}_median"], row[f"pages_{name}_mean"] = statistics.median(counts), statistics.fmean(counts)
        if n:
            by_dev = set(most_frequent(dev, n))
            row["misses_mean_ranked_on_dev"] = statistics.fmean(sum(t not in by_dev for t in set(ids)) for ids in test)
        out["caches"].append(row)
        print(f"  {n:5d} words resident: misses {row['misses_mean']:.2f} a request (mean); pages "
              + ", ".join(f"{k} {row[f'pages_{k}_mean']:.2f}" for k in pages)
              + (f"; ranked on dev: misses {row['misses_mean_ranked_on_dev']:.2f}" if n else ""))
    return out


def served(store_dir: Path, model_dir: Path) -> dict:
    cfg = BenchConfig(targets_x=(1.0, 1.5), memories_mb=(2.0,), storages=(STORAGE,), seq_modes=("own",),
                      systems=("sti-joint",), no_guard_points=(), ood_limit=200)
    out = {}
    for name, row_cache in (("no_row_cache", False), ("row_cache", True)):
        rows = run_bench(store_dir, model_dir, replace(cfg, row_cache=row_cache), log=lambda *a: None)["rows"]
        out[name] = [{k: r[k] for k in ("target_x", "target_ms", "served_accuracy", "hit_rate", "guard_rate",
                                        "latency_median_ms", "embed_read_median_ms", "embed_hit_share",
                                        "row_cache_bytes", "peak_model_bytes")} for r in rows]
        for r in out[name]:
            print(f"  {name:12} T = {r['target_x']}x: served test {r['served_accuracy']['test']:.4f}, within T "
                  f"{r['hit_rate']:.1%}, guard {r['guard_rate']:.1%}, embedding {r['embed_read_median_ms']:.2f} ms, "
                  f"rows {r['row_cache_bytes'] / 1e3:.0f} KB")
    return out


def main() -> None:
    from sti.demo import demo_store_path
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=None, help="default: the demo's store")
    ap.add_argument("--model", type=Path, default=None, help="the store's model directory (default: the demo "
                    "store's, by its name)")
    args = ap.parse_args()
    store = args.store or demo_store_path()
    model = args.model or store.parent.parent / "models" / store.name.removesuffix("-linear")
    torch.set_num_threads(1)
    print("1. accuracy with compact (int8) embedding rows")
    acc = compact_accuracy(store)
    device = api.device_profile(store, STORAGE)
    with Store(store) as s:
        weights = s.load_model(32)
    full_ms = full_compute_ms(weights, Tokenizer(store), [e.text for e in load_split("test")[:40]], None)
    print(f"2. the engine's embedding time (T = 1.5 x {full_ms:.2f} ms, M = 2 MB, {STORAGE})")
    times = embed_times(store, device, full_ms)
    result = {"conditions": {"storage": STORAGE, "threads": 1, "full_ms": full_ms, "store": str(store)},
              "compact_accuracy": acc, "embed_times": times}
    small = [r for r in times if r["bytes"] <= 5e5]
    best = max(small, key=lambda r: r["bytes"])["words"]
    result["embed_ms_median_100MBps"] = next(r["embed_ms_median"] for r in small
                                             if r["words"] == best and r["seq"] == "own")
    result["embed_ms_median_100MBps_pad128"] = next(r["embed_ms_median"] for r in small
                                                    if r["words"] == best and r["seq"] == "pad128")
    result["embed_ms_median_100MBps_no_cache"] = next(r["embed_ms_median"] for r in times
                                                      if r["words"] == 0 and r["seq"] == "own")
    print("4. pages of missed rows under other on-disk layouts (counted)")
    result["layouts"] = layouts(store)
    print("3. served accuracy without and with the row cache (sti bench, back to back)")
    result["served"] = served(store, model)
    atomic_write_json(result, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
