"""Decode throughput per codec and bitwidth (one thread), beside cold-read bandwidth,
measured in the same run on the real model's shards.

    .venv/bin/python benchmarks/bench_codec.py [--model DIR] [--repeat 7]

For each codec and bitwidth: reading the 12 shard records of a layer cold (O_DIRECT, one
read per record, as the engine does), and decoding them (one thread, as the engine's IO
lane does). Decoding must not be the bottleneck: decode time <= cold read time per layer.
Writes benchmarks/results/codec.json and prints a table. Medians over layers and repeats.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sti.assets import ensure_model
from sti.store import Store, build_store

OUT = Path(__file__).parent / "results" / "codec.json"


def default_model() -> Path:
    from sti.finetune import default_model_dir
    tuned = default_model_dir("full")
    return tuned if (tuned / "model.safetensors").exists() else ensure_model(log=lambda *a: None)


def layer_times(store: Store, bits: int, repeat: int) -> tuple[float, float, int, int]:
    """Median ms to read cold and to decode one layer's shards; packed and fp32 bytes."""
    c = store.config
    reads, decodes = [], []
    for _ in range(repeat):
        for layer in range(c.num_layers):
            recs = [store.shard_record(layer, j, bits) for j in range(c.num_shards)]
            t0 = time.perf_counter()
            bufs = [store.read(r) for r in recs]
            t1 = time.perf_counter()
            for r, b in zip(recs, bufs):
                store.decode_parts(r, b)
            t2 = time.perf_counter()
            reads.append((t1 - t0) * 1e3)
            decodes.append((t2 - t1) * 1e3)
    packed = sum(store.shard_record(0, j, bits).length for j in range(c.num_shards))
    fp32 = sum(store.shard_record(0, j, 32).length for j in range(c.num_shards))
    return float(np.median(reads)), float(np.median(decodes)), packed, fp32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = args.model or default_model()
    rows = []
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:  # on the real disk, not tmpfs
        for codec in ("linear", "gobo"):
            path = build_store(model, Path(tmp) / codec, codec=codec)
            with Store(path, "cold") as store:
                direct = store.reader.direct is not None
                for bits in store.bits:
                    read_ms, dec_ms, packed, fp32 = layer_times(store, bits, args.repeat)
                    rows.append({"codec": codec, "bits": bits, "layer_packed_bytes": packed,
                                 "cold_read_ms": read_ms, "decode_ms": dec_ms,
                                 "cold_read_MBps": packed / read_ms / 1e3,
                                 "decode_in_MBps": packed / dec_ms / 1e3, "decode_out_MBps": fp32 / dec_ms / 1e3,
                                 "decode_not_bottleneck": dec_ms <= read_ms, "o_direct": direct})
    print(f"model {model}; one layer = 12 shard records; torch/numba 1 thread; medians of "
          f"{args.repeat} x 6 layers; cold = O_DIRECT" + ("" if rows[0]["o_direct"] else " unavailable: fadvise"))
    print(f"{'codec':7} {'bits':>4} {'layer KB':>9} {'read ms':>8} {'read MB/s':>9} {'decode ms':>9} "
          f"{'dec in MB/s':>11} {'dec out MB/s':>12}  decode <= read")
    for r in rows:
        print(f"{r['codec']:7} {r['bits']:>4} {r['layer_packed_bytes'] / 1e3:>9.0f} {r['cold_read_ms']:>8.2f} "
              f"{r['cold_read_MBps']:>9.0f} {r['decode_ms']:>9.2f} {r['decode_in_MBps']:>11.0f} "
              f"{r['decode_out_MBps']:>12.0f}  {'yes' if r['decode_not_bottleneck'] else 'NO'}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"model": str(model), "repeat": args.repeat, "rows": rows}, indent=1))
    print(f"wrote {OUT}")
    ok = all(r["decode_not_bottleneck"] for r in rows if r["codec"] == "linear")
    print("default codec (linear): decoding is " + ("not the bottleneck at any bitwidth" if ok else
          "SLOWER than cold reads at some bitwidth"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
