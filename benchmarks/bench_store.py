"""Store build time, size, and whole-model accuracy per codec and bitwidth.

    .venv/bin/python benchmarks/bench_store.py [--model DIR]

Builds a store of the fine-tuned model per codec (bits 2,3,4,5,6,32), then evaluates the whole
model with every shard at b bits on the Rotten Tomatoes test split. Targets: at 4 bits within
1 point of fp32, at 3 bits within 3 points. Writes benchmarks/results/store.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from sti.data import load_split
from sti.evaluate import accuracy
from sti.finetune import default_model_dir
from sti.store import Store, build_store
from sti.tokenizer import Tokenizer

OUT = Path(__file__).parent / "results" / "store.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=default_model_dir("full"))
    args = ap.parse_args()
    if not (args.model / "model.safetensors").exists():
        print(f"no fine-tuned model in {args.model}: run `sti finetune` first", file=sys.stderr)
        return 1
    torch.set_num_threads(2)
    test = load_split("test")
    tok = Tokenizer(args.model)
    rows = []
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        for codec in ("linear", "gobo"):
            t0 = time.perf_counter()
            path = build_store(args.model, Path(tmp) / codec, codec=codec)
            build_s = time.perf_counter() - t0
            with Store(path) as s:
                sizes = s.sizes()
                for b in s.bits:
                    acc = accuracy(s.load_model(b), tok, test)
                    rows.append({"codec": codec, "bits": b, "test_accuracy": acc, "build_s": build_s,
                                 "shard_bytes": sizes["shards_by_bits"][b], "store_bytes": sizes["data_file"]})
                    print(f"{codec:6} {b:>2} bits: test accuracy {acc:.4f}  shards {sizes['shards_by_bits'][b] / 1e6:6.2f} MB",
                          flush=True)
    fp32 = {r["codec"]: r["test_accuracy"] for r in rows if r["bits"] == 32}
    print(f"\n{'codec':7}" + "".join(f"{b:>8}" for b in (2, 3, 4, 5, 6, 32)) + "   build s  store MB")
    for codec in ("linear", "gobo"):
        sel = {r["bits"]: r for r in rows if r["codec"] == codec}
        print(f"{codec:7}" + "".join(f"{sel[b]['test_accuracy']:8.4f}" for b in sorted(sel))
              + f"   {sel[32]['build_s']:7.1f}  {sel[32]['store_bytes'] / 1e6:8.1f}")
        for b, limit in ((4, 0.01), (3, 0.03)):
            drop = fp32[codec] - sel[b]["test_accuracy"]
            print(f"   {b} bits: {drop * 100:+.2f} points below fp32 (target <= {limit * 100:.0f}): "
                  + ("met" if drop <= limit else "NOT met"))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"model": str(args.model), "split": "test", "rows": rows}, indent=1))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
