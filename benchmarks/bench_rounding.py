"""GPTQ rounding choices the store does not make, against the one it makes.

    .venv/bin/python benchmarks/bench_rounding.py [--bits 2,3] [--variants NAMES] [--out FILE]

The linear codec's GPTQ rounding (sti/gptq.py) measures every layer's input Gram matrices on
the float32 model, picks each group's grid by the least squared weight error over clipping
ratios shrunk symmetrically about the group's centre (`codec.linear_grid`), and damps H by
1% of its mean diagonal. Issue 21 asks for 2 bits within 1.0 point of fp32 and 3 bits within
0.3; these are the textbook alternatives, each measured on the whole model with every shard
at b bits (decoded in memory, exactly as a store of them would decode), against the float32
model's answers over 3,000 training sentences outside the calibration texts (KL, the finer
measure) and on the test and dev splits (accuracy; dev, which no reported figure uses, is the
split to choose a rounding by):
  shipped     what `sti build` does
  sequential  each layer's Gram matrices measured on the model whose earlier layers are
              already rounded at b bits (GPTQ's paper does this)
  weighted    each group's clipping chosen by the error weighted by its inputs' energy
              (H's diagonal), not the plain squared error
  asymmetric  the grid's low and high ends shrunk independently (11 x 11 ratios), not
              together about the centre
  dampX       H damped by X of its mean diagonal (e.g. damp0.1: 10%), not 1%
Writes benchmarks/results/rounding.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import sti.codec as codecs
from bench_store import fidelity, kl_sample
from sti import gptq
from sti.api import calibration_texts
from sti.data import load_split
from sti.encoder import attention_keep, embed, layer_forward
from sti.evaluate import accuracy, predict_logits
from sti.finetune import default_model_dir
from sti.tokenizer import Tokenizer
from sti.weights import load_model_dir, shard_slice, split_dim

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("shipped", "sequential", "weighted", "asymmetric", "damp0.1", "damp0.001")  # the default set


def damp_of(variant: str) -> float | None:
    """X of a "dampX" variant (None: not one)."""
    try:
        return float(variant[4:]) if variant.startswith("damp") else None
    except ValueError:
        return None


def decoded(layer, bits: int, choices: dict, config):
    """`layer` with every matrix replaced by its rounding, encoded and decoded by the codec
    as a store's shard would be."""
    new = {}
    for name in gptq.INPUTS:
        full, dim = getattr(layer, name).clone(), split_dim(name)
        for pos, j in enumerate(layer.shard_ids):
            sl = shard_slice(name, pos, config)
            part = full[:, sl] if dim else full[sl]
            blob = codecs.encode(part.contiguous().numpy(), bits, "linear", choice=choices[(name, j)])
            part.copy_(torch.from_numpy(codecs.decode(blob, tuple(part.shape))))
        new[name] = full
    return replace(layer, **new)


def grid_for(variant: str, grams: dict, config):
    """The `grid` argument of `gptq.layer_choices` for a variant (None: the codec's)."""
    if variant not in ("weighted", "asymmetric"):
        return None
    ratios = codecs.CLIP_RATIOS
    clips = [(a, b) for a in ratios for b in ratios] if variant == "asymmetric" else None

    def grouped(t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(codecs._pad(t.contiguous().numpy().ravel(), codecs.GROUP, edge=True)
                                .reshape(-1, codecs.GROUP))

    def grid(name, pos, part, bits):
        weights = None
        if variant == "weighted":  # an element's input: its column (of the layer's input, for a column shard)
            energy = torch.diagonal(grams[gptq.INPUTS[name]])
            energy = energy[shard_slice(name, pos, config)] if split_dim(name) else energy
            weights = grouped(energy.expand(part.shape))
        codes, scale, zero = codecs.linear_grid(grouped(part.float()), bits, clips, weights)
        return codes.numpy().ravel()[:part.numel()].astype(np.uint8), scale.numpy(), zero.numpy()
    return grid


def rounded_model(model, batches, bits: int, variant: str):
    """The model with every layer GPTQ-rounded at `bits` the variant's way."""
    c = model.config
    kept = gptq.DAMP
    gptq.DAMP = damp_of(variant) or kept
    try:
        inputs = [(embed(model.embeddings, b.input_ids, c, token_type_ids=b.token_type_ids),
                   attention_keep(b.attention_mask), b.attention_mask.bool()) for b in batches]
        exact, rounded, layers = [x for x, _, _ in inputs], [x for x, _, _ in inputs], []
        for layer in model.layers:
            grams: dict = {}
            for x, (_, keep, real) in zip(rounded if variant == "sequential" else exact, inputs):
                layer_forward(x, keep, layer, c, observe=lambda **ins: gptq._add(grams, ins, real))
            q = decoded(layer, bits, gptq.layer_choices(layer, c, bits, grams, grid=grid_for(variant, grams, c)), c)
            layers.append(q)
            if variant == "sequential":
                rounded = [layer_forward(x, keep, q, c) for x, (_, keep, _) in zip(rounded, inputs)]
            else:
                exact = [layer_forward(x, keep, layer, c) for x, (_, keep, _) in zip(exact, inputs)]
        return replace(model, layers=layers)
    finally:
        gptq.DAMP = kept


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=default_model_dir("full"))
    ap.add_argument("--bits", default="2,3")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0, help="the draw of calibration texts (0: what `sti build` uses)")
    ap.add_argument("--out", type=Path, default=RESULTS / "rounding.json")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS and not (damp_of(v) or 0) > 0]
    if unknown:
        print(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)} or dampX (X > 0)", file=sys.stderr)
        return 1
    if not (args.model / "model.safetensors").exists():
        print(f"no fine-tuned model in {args.model}: run `sti finetune` first", file=sys.stderr)
        return 1
    torch.set_num_threads(2)
    model = load_model_dir(args.model)
    tok = Tokenizer(args.model, max_length=min(128, model.config.max_tokens))  # as `sti build` calibrates
    texts = calibration_texts(seed=args.seed)
    sample = kl_sample(set(texts))
    test, dev = load_split("test"), load_split("dev")
    batches = list(gptq.batches(tok, texts))
    with torch.no_grad():
        ref = predict_logits(model, tok, sample)
        fp32, fp32_dev = accuracy(model, tok, test), accuracy(model, tok, dev)
        rows = []
        for bits in map(int, args.bits.split(",")):
            for v in variants:
                t0 = time.perf_counter()
                m = rounded_model(model, batches, bits, v)
                kl, _ = fidelity(predict_logits(m, tok, sample), ref)
                acc, dev_acc = accuracy(m, tok, test), accuracy(m, tok, dev)
                rows.append({"bits": bits, "variant": v, "kl": kl, "test_accuracy": acc, "dev_accuracy": dev_acc,
                             "points_below_fp32": (fp32 - acc) * 100, "seconds": time.perf_counter() - t0})
                print(f"{bits} bits  {v:11} KL {kl:.4f}   test {acc:.4f} ({(acc - fp32) * 100:+.2f} points)   "
                      f"dev {dev_acc:.4f} ({(dev_acc - fp32_dev) * 100:+.2f})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model), "calibration_texts": len(texts), "seed": args.seed,
                                    "kl_sentences": len(sample), "fp32_test_accuracy": fp32,
                                    "fp32_dev_accuracy": fp32_dev, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
