"""What a fine-tuning step costs, with random batches and with length-bucketed ones.

    .venv/bin/python benchmarks/bench_finetune.py [--steps 12]

Times training steps (forward, backward, AdamW update; dropout on) of the real base model
on Rotten Tomatoes training batches of 32, for the full model and the submodels an elastic
step trains, on the same first batches drawn either way. Prints a table and writes
benchmarks/results/finetune_steps.json (median seconds per step and padded widths).
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sti import data
from sti.assets import ensure_model
from sti.atomic import atomic_write_json
from sti.encoder import Submodel, encode, head_logits
from sti.tokenizer import Tokenizer
from sti.weights import load_model_dir

ft = importlib.import_module("sti.finetune")
OUT = Path(__file__).parent / "results" / "finetune_steps.json"


def random_batches(train, tokenizer, cfg, count: int, rng: random.Random):
    order = list(range(len(train)))
    rng.shuffle(order)
    for start in range(0, count * cfg.batch_size, cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        yield tokenizer.encode([train[i].text for i in idx]), torch.tensor([train[i].label for i in idx])


def step_seconds(weights, opt, batches, cell) -> float:
    """Median seconds of one training step of submodel `cell` over `batches`."""
    sub = Submodel.of(weights.config, *cell)
    times = []
    for batch, labels in batches:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        hidden = encode(weights, batch.input_ids, batch.attention_mask, sub, dropout=0.1)
        F.cross_entropy(head_logits(weights.head, hidden, batch.attention_mask, 0.1), labels).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base = ensure_model(lambda *a: None)
    cfg = ft.FinetuneConfig()
    tokenizer = Tokenizer(base, max_length=cfg.max_length)
    train = data.load_split("train")
    weights = load_model_dir(base, fresh_head=True)
    params = weights.parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-6)
    batches = {
        "random": list(random_batches(train, tokenizer, cfg, args.steps, random.Random(0))),
        "bucketed": [b for _, b in zip(range(args.steps), ft._steps(train, tokenizer, cfg, 1.0, random.Random(0)))],
    }
    rows = []
    for cell in ft.ANCHORS:
        row = {"n": cell[0], "m": cell[1]}
        for name, chosen in batches.items():
            row[f"{name}_s"] = step_seconds(weights, opt, chosen, cell)
        row["ratio"] = row["random_s"] / row["bucketed_s"]
        rows.append(row)
        print(f"({cell[0]}, {cell[1]:2d})  random {row['random_s']:.3f} s  bucketed {row['bucketed_s']:.3f} s  "
              f"{row['ratio']:.2f}x")
    widths = {name: statistics.mean(b.input_ids.shape[1] for b, _ in chosen) for name, chosen in batches.items()}
    print(f"mean padded width: random {widths['random']:.1f}, bucketed {widths['bucketed']:.1f} tokens")
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "threads": torch.get_num_threads(),
              "batch_size": cfg.batch_size, "steps": args.steps, "mean_padded_width": widths, "rows": rows}
    atomic_write_json(result, OUT)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
