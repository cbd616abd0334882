"""Measuring which shards matter: the importance profile (an N x M table) and the numbers
that turn it into a predicted accuracy for any plan.

Two methods:
  - `degrade` (the paper's): for every shard alone, drop it to the store's lowest bitwidth
    (everything else at 32 bits) and measure, over the split, the mean KL divergence of the
    output distribution from the full-precision one, and the accuracy drop. The hidden
    states entering layer i do not depend on layer i's shards, so they are computed once and
    only layers i.. are rerun (about half the work of naive reruns).
  - `gradient` (cheap): one backward pass of the task loss; a shard's score is the Fisher
    estimate sum over batches of (g . dw)^2, with dw the change of its weights at the lowest
    bitwidth, rescaled so all scores sum to the measured KL of the all-lowest model.
Both also measure, with whole-model evaluations: the accuracy of every (n, m) submodel of the
elastic grid, how the output KL grows as the bitwidth falls (`bits_error`), and `kl_to_acc`,
the accuracy lost per unit of summed shard KL (profiles.py gives the resulting model).
"""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .data import load_split
from .encoder import Submodel, attention_keep, encode, head_logits, layer_forward
from .errors import Cancelled, InputError
from .evaluate import batches_by_length
from .profiles import ImportanceProfile
from .store import Store
from .tokenizer import Tokenizer
from .weights import SHARD_PARTS, ModelWeights, shard_slice, split_dim

Progress = Callable[[int, int], bool]
METHODS = ("degrade", "gradient")
KL_TO_ACC_FLOOR = 1e-3


def grid_sizes(total: int, parts: int = 4) -> list[int]:
    """The elastic grid along one axis: for 12 shards 3, 6, 9, 12; for 6 layers 3..6."""
    if total >= 2 * parts:
        return sorted({max(1, round(total * k / parts)) for k in range(1, parts + 1)})
    return list(range(max(1, math.ceil(total / 2)), total + 1))


class _Data:
    """The split as length-sorted batches, with labels and the full model's outputs."""

    def __init__(self, weights: ModelWeights, tokenizer: Tokenizer, examples, batch_size: int):
        self.batches = [(torch.tensor([examples[i].label for i in idx]), b)
                        for idx, b in batches_by_length(examples, tokenizer, batch_size)]
        self.size = len(examples)
        with torch.inference_mode():
            self.states = [self._states(weights, b) for _, b in self.batches]  # per batch: input of each layer
            self.logp = [F.log_softmax(head_logits(weights.head, s[-1], b.attention_mask), -1)
                         for s, (_, b) in zip(self.states, self.batches)]

    @staticmethod
    def _states(weights: ModelWeights, batch) -> list[torch.Tensor]:
        return encode(weights, batch.input_ids, batch.attention_mask, all_hidden=True)


def _score(data: _Data, logits_of) -> tuple[float, float]:
    """(mean KL(full || this), accuracy) of `logits_of(batch index)` over the split."""
    kl, correct = 0.0, 0
    for k, (labels, _) in enumerate(data.batches):
        logp = F.log_softmax(logits_of(k), -1)
        kl += F.kl_div(logp, data.logp[k], log_target=True, reduction="sum").item()
        correct += int((logp.argmax(-1) == labels).sum())
    return kl / data.size, correct / data.size


def _from_layer(weights: ModelWeights, data: _Data, k: int, start: int, first) -> torch.Tensor:
    """Logits of batch k running layer `start` as `first`, then the rest unchanged."""
    c = weights.config
    _, batch = data.batches[k]
    keep = attention_keep(batch.attention_mask)
    x = layer_forward(data.states[k][start], keep, first, c)
    for i in range(start + 1, c.num_layers):
        x = layer_forward(x, keep, weights.layers[i], c)
    return head_logits(weights.head, x, batch.attention_mask)


def degrade_table(store: Store, weights: ModelWeights, data: _Data, lowest: int, tick) -> tuple[list, list]:
    c = weights.config
    kl = [[0.0] * c.num_shards for _ in range(c.num_layers)]
    acc = [[0.0] * c.num_shards for _ in range(c.num_layers)]
    for i in range(c.num_layers):
        for j in range(c.num_shards):
            bits = [32] * c.num_shards
            bits[j] = lowest
            layer = store.layer(i, range(c.num_shards), bits)
            kl[i][j], acc[i][j] = _score(data, lambda k: _from_layer(weights, data, k, i, layer))
            tick()
    return kl, acc


def gradient_table(store: Store, weights: ModelWeights, data: _Data, lowest: int, tick) -> list:
    """Fisher estimate per shard: sum over batches of (grad . (w_lowest - w))^2."""
    c = weights.config
    low = at_bits(store, weights, lowest)
    w = weights.clone()
    params = [(i, p) for i in range(c.num_layers) for p in SHARD_PARTS]
    for i, p in params:
        getattr(w.layers[i], p).requires_grad_(True)
    score = np.zeros((c.num_layers, c.num_shards))
    for labels, batch in data.batches:
        logits = head_logits(w.head, encode(w, batch.input_ids, batch.attention_mask), batch.attention_mask)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        grads = torch.autograd.grad(loss, [getattr(w.layers[i], p) for i, p in params])
        dot = np.zeros_like(score)
        for (i, p), g in zip(params, grads):
            delta = getattr(low.layers[i], p) - getattr(weights.layers[i], p)
            prod = (g * delta).sum(dim=1 - split_dim(p)) if g.dim() == 2 else g * delta
            for j in range(c.num_shards):
                dot[i, j] += prod[shard_slice(p, j, c)].sum().item()
        score += dot ** 2
        tick()
    return score.tolist()


def measure_importance(store: str | Path | Store, method: str = "degrade", split: str = "dev", seed: int = 0,
                       limit: int | None = None, batch_size: int = 64, max_length: int = 128,
                       progress: Progress | None = None) -> ImportanceProfile:
    """The importance profile of a store's shards, measured on `split` (never test)."""
    if method not in METHODS:
        raise InputError(f"unknown importance method {method!r}: choose {' or '.join(METHODS)}")
    if split == "test":
        raise InputError("importance is measured on dev (or train): the test split is kept for reporting")
    own = not isinstance(store, Store)
    store = Store(store) if own else store
    try:
        return _measure(store, method, split, seed, limit, batch_size, max_length, progress)
    finally:
        if own:
            store.close()


def _measure(store: Store, method, split, seed, limit, batch_size, max_length, progress) -> ImportanceProfile:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    c = store.config
    examples = load_split(split)[:limit]
    tokenizer = Tokenizer(store.path, max_length=min(max_length, c.max_position))
    weights = store.load_model(32)
    lowest = min(b for b in store.bits)
    ns, ms = grid_sizes(c.num_layers), grid_sizes(c.num_shards)
    main = c.num_layers * c.num_shards if method == "degrade" else -(-len(examples) // batch_size)
    total, done = main + len(ns) * len(ms) + len(store.bits), 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None and progress(done, total) is False:
            raise Cancelled("importance profiling cancelled; nothing was saved")

    data = _Data(weights, tokenizer, examples, batch_size)
    full_kl, full_acc = _score(data, lambda k: data.logp[k])
    with torch.inference_mode():
        sub_acc = {}
        for n in ns:
            for m in ms:
                sub = Submodel.of(c, n, m)
                sub_acc[f"{n},{m}"] = _score(data, lambda k: _logits(weights, data, k, sub))[1]
                tick()
        by_bits = {}
        for b in store.bits:
            wb = at_bits(store, weights, b)
            by_bits[b] = _score(data, lambda k: _logits(wb, data, k, None))
            tick()
    if method == "degrade":
        with torch.inference_mode():
            kl, drop_acc = degrade_table(store, weights, data, lowest, tick)
        drop = [[full_acc - a for a in row] for row in drop_acc]
    else:
        kl = gradient_table(store, weights, data, lowest, tick)
        total_kl = sum(map(sum, kl))
        kl = [[v * by_bits[lowest][0] / total_kl if total_kl > 0 else 0.0 for v in row] for row in kl]
        drop = None
    bits_error = bits_error_of({b: v[0] for b, v in by_bits.items()}, lowest)
    return ImportanceProfile(
        store_id=store.store_id, method=method, split=split, seed=seed, lowest_bits=lowest,
        full_accuracy=full_acc, submodel_accuracy=sub_acc,
        shard_kl=tuple(tuple(max(0.0, v) for v in row) for row in kl),
        shard_acc_drop=tuple(tuple(max(-1.0, v) for v in row) for row in drop) if drop else None,
        bits_error=bits_error, kl_to_acc=kl_to_acc_of(kl, bits_error, {b: v[1] for b, v in by_bits.items()},
                                                      full_acc),
        cost_s=time.perf_counter() - t0,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def at_bits(store: Store, weights: ModelWeights, bits: int) -> ModelWeights:
    """`weights` with every layer's shards read from the store at `bits` (embeddings and head
    are always float32, so they are shared, not reread)."""
    c = store.config
    return ModelWeights(config=c, embeddings=weights.embeddings, head=weights.head,
                        layers=[store.layer(i, range(c.num_shards), bits) for i in range(c.num_layers)])


def _logits(weights: ModelWeights, data: _Data, k: int, sub) -> torch.Tensor:
    _, batch = data.batches[k]
    return head_logits(weights.head, encode(weights, batch.input_ids, batch.attention_mask, sub),
                       batch.attention_mask)


def bits_error_of(kl_by_bits: dict[int, float], lowest: int) -> dict[int, float]:
    """Output KL at b bits relative to the lowest: 1 there, 0 at 32, never rising with b."""
    base = kl_by_bits[lowest]
    out, running = {}, 1.0
    for b in sorted(kl_by_bits):
        v = 1.0 if b == lowest else 0.0 if b == 32 else (kl_by_bits[b] / base if base > 0 else 0.0)
        running = min(running, max(0.0, v))
        out[b] = running
    return out


def kl_to_acc_of(kl, bits_error: dict, acc_by_bits: dict, full_acc: float) -> float:
    """Least squares through the origin of the whole-model accuracy drop at b bits against
    (sum of shard KL) * bits_error[b], over the packed bitwidths."""
    total = sum(map(sum, kl))
    xs = np.array([total * bits_error[b] for b in acc_by_bits if b != 32])
    ys = np.array([full_acc - acc_by_bits[b] for b in acc_by_bits if b != 32])
    fit = float(xs @ ys / (xs @ xs)) if xs.size and (xs @ xs) > 0 else 0.0
    return max(KL_TO_ACC_FLOOR, fit)


def rank_correlation(a: ImportanceProfile, b: ImportanceProfile) -> float:
    """Spearman correlation of two profiles' shard_kl tables (ties get average ranks)."""
    def ranks(v):
        v = np.asarray(v, dtype=float).ravel()
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):
            tie = v == value
            r[tie] = r[tie].mean()
        return r
    ra, rb = ranks(a.shard_kl), ranks(b.shard_kl)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])
