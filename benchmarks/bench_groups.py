"""One layer's work in isolation: filling shard groups and computing them, beside the fused layer.

On the real MiniLM store, 26 tokens, 1 torch thread, cycling through the 6 layers' weights
(median of 100 per figure), for the engine's group sizes and a few others, in float32 and
bfloat16, at 4 and 32 bits:
  - fill: decoding every shard of the layer into its groups (what the engine's decoder does);
  - compute: the grouped layer from filled groups (what the compute lane does);
  - fused: `encoder.layer_forward` on the fp32 layer (the resident model's layer).
Prints a table; writes benchmarks/results/groups.json.

    .venv/bin/python benchmarks/bench_groups.py [--store DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from sti.assets import sti_home
from sti.encoder import attention_keep, layer_forward
from sti.groups import ATTN, FFN, DTYPES, ShardGroup, group_sizes, layer_by_groups
from sti.store import Store

OUT = Path(__file__).resolve().parent / "results" / "groups.json"


def median_ms(fn, repeat: int = 100) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=sti_home() / "stores" / "minilm-l6-rt-elastic-full-linear")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with Store(args.store) as s:
        c = s.config
        x, keep = torch.randn(1, 26, c.hidden_size), attention_keep(torch.ones(1, 26))
        fp32 = s.load_model(32)
        turn = itertools.cycle(range(c.num_layers))
        with torch.inference_mode():
            fused = median_ms(lambda: layer_forward(x, keep, fp32.layers[next(turn)], c))
        for bits in (4, 32):
            layers = [([s.shard_record(i, j, bits) for j in range(c.num_shards)], s.layer_shared(i))
                      for i in range(c.num_layers)]
            layers = [(recs, [s.read(r) for r in recs], shared) for recs, shared in layers]
            for dtype in DTYPES:
                for sizes in dict.fromkeys([group_sizes(c, DTYPES[dtype]), (4, 2), (8, 4), (12, 6)]):
                    groups = {phase: [ShardGroup(phase, size, c, DTYPES[dtype])
                                      for _ in range(-(-c.num_shards // size))] for phase, size in zip((ATTN, FFN), sizes)}
                    cycle = itertools.cycle(layers)

                    def fill():
                        recs, bufs, _ = next(cycle)
                        for phase, size in zip((ATTN, FFN), sizes):
                            for g in groups[phase]:
                                g.clear()
                            for j, (r, b) in enumerate(zip(recs, bufs)):
                                groups[phase][j // size].fill(j, s, r, b)

                    def compute():
                        _, _, shared = next(cycle)
                        with torch.inference_mode():
                            layer_by_groups(x, keep, [(g, len(g.shards)) for g in groups[ATTN]],
                                            [(g, len(g.shards)) for g in groups[FFN]], shared, c)
                    fill()
                    rows.append({"bits": bits, "dtype": dtype, "groups": list(sizes), "fill_ms": median_ms(fill),
                                 "compute_ms": median_ms(compute), "fused_fp32_ms": fused})
                    r = rows[-1]
                    print(f"{bits:>2} bits {dtype:8} groups {sizes}: fill {r['fill_ms']:.3f} ms, compute "
                          f"{r['compute_ms']:.3f} ms a layer (fused fp32 layer {fused:.3f} ms)", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"rows": rows, "tokens": 26, "torch_threads": 1, "store": str(args.store),
                               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
