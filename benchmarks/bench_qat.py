"""The quantization-aware step alone, from the cached elastic model of the full preset.

    .venv/bin/python benchmarks/bench_qat.py --epochs 0.5 --lr 1e-4 [--seed 7]

Loads the cached teacher and elastic model (`sti finetune --preset full` leaves both beside the
model), rewires the teacher as finetune does, runs `finetune.train_qat` with these settings and
prints test accuracy with every shard at 2, 3 and 4 bits (as the store decodes them) before
and after, and the float32 grid after. The trials of docs/TRAINING.md. Writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time

import torch

from sti.assets import ensure_model
from sti.data import load_split
from sti.finetune import FinetuneConfig, default_model_dir, grid_accuracy, quantized_accuracy, train_qat
from sti.rewire import rewire, taylor_importance
from sti.tokenizer import Tokenizer
from sti.weights import load_model_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    model = default_model_dir("full")
    teacher_dir, elastic_dir = (model.with_name(model.name + suffix) for suffix in (".teacher", ".elastic"))
    if not (elastic_dir / "model.safetensors").exists():
        print(f"no cached elastic model in {elastic_dir}: run `sti finetune --preset full` first", file=sys.stderr)
        return 1
    torch.set_num_threads(2)
    cfg = dataclasses.replace(FinetuneConfig(), qat_epochs=args.epochs, qat_lr=args.lr)
    base = ensure_model(lambda *a: None)
    tok, eval_tok = Tokenizer(base, max_length=cfg.max_length), Tokenizer(base, max_length=128)
    train, dev, test = load_split("train"), load_split("dev"), load_split("test")
    teacher = load_model_dir(teacher_dir)
    rewired = rewire(teacher, taylor_importance(teacher, eval_tok, dev))
    student = load_model_dir(elastic_dir)
    print("before: every shard at b bits", quantized_accuracy(student, eval_tok, test), flush=True)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    student = train_qat(student, rewired, tok, train, cfg, random.Random(args.seed))
    print(f"after ({time.perf_counter() - t0:.0f} s):", quantized_accuracy(student, eval_tok, test))
    print("float32 grid after:", {f"{n},{m}": round(a, 4) for (n, m), a in grid_accuracy(student, eval_tok, test).items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
