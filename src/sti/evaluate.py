"""Accuracy of a model (or submodel) on a list of examples, in batches; and of the answers
an engine serves, request by request, with their latency (`serve`)."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .data import Example
from .encoder import Submodel, classify
from .tokenizer import Tokenizer
from .weights import ModelWeights


def batches_by_length(examples: list[Example], tokenizer: Tokenizer, batch_size: int):
    """Yield (indices, Batch) with similar-length texts together, so padding stays small."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].text) + len(examples[i].text_pair or ""))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, encode_examples(tokenizer, [examples[i] for i in idx])


def encode_examples(tokenizer: Tokenizer, examples: list[Example], pad_to: int | None = None):
    """The batch of some examples, with their second texts when they are pairs."""
    return tokenizer.encode([e.text for e in examples], pad_to=pad_to, pairs=[e.text_pair for e in examples])


def predict_logits(weights: ModelWeights, tokenizer: Tokenizer, examples: list[Example],
                   submodel: Submodel | None = None, batch_size: int = 64) -> torch.Tensor:
    out = torch.empty(len(examples), weights.config.num_labels)
    for idx, batch in batches_by_length(examples, tokenizer, batch_size):
        out[idx] = classify(weights, batch.input_ids, batch.attention_mask, submodel, batch.token_type_ids)
    return out


def accuracy(weights: ModelWeights, tokenizer: Tokenizer, examples: list[Example],
             submodel: Submodel | None = None, batch_size: int = 64) -> float:
    logits = predict_logits(weights, tokenizer, examples, submodel, batch_size)
    labels = torch.tensor([e.label for e in examples])
    return (logits.argmax(1) == labels).float().mean().item()


# --- scores and latency figures -----------------------------------------------------------------
def macro_f1(predicted: list[int], gold: list[int], num_labels: int) -> float:
    """The mean over labels of F1 (a label neither predicted nor present scores 0)."""
    scores = []
    for k in range(num_labels):
        tp = sum(p == k and g == k for p, g in zip(predicted, gold))
        fp = sum(p == k and g != k for p, g in zip(predicted, gold))
        fn = sum(p != k and g == k for p, g in zip(predicted, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / num_labels


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else math.nan


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate of `hits` in `n` (sound near 0 and 1, unlike p +- 2se)."""
    if n == 0:
        return (math.nan, math.nan)
    p = hits / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n)))


def latency_stats(lat: list[float], target: float | None) -> dict:
    out = {"latency_median_ms": statistics.median(lat), "latency_p95_ms": percentile(lat, 95),
           "latency_p99_ms": percentile(lat, 99)}
    if target is not None:
        hits = sum(v <= target for v in lat)
        out.update(hit_rate=hits / len(lat), hit_rate_ci=wilson(hits, len(lat)))
    return out


# --- served answers ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Served:
    """What an engine answered for examples, request by request (`serve`), beside the fused
    full model's answers for the same examples."""
    labels: tuple[str, ...]          # the model's label names
    total: int                       # examples given
    requests: int                    # examples served (fewer than total: interrupted)
    served_accuracy: float
    served_macro_f1: float
    full_accuracy: float             # the whole model at full precision, resident, in batches
    full_macro_f1: float
    target_ms: float
    latency_median_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    hit_rate: float                  # share of requests answered within target_ms
    hit_rate_ci: tuple[float, float]
    guard_rate: float                # share of requests whose shards the deadline guard changed
    peak_model_bytes: int
    preload_bytes: int
    interrupted: bool = False
    data: dict | None = None         # the data file: path, sha256, size, examples
    changes: tuple = ()              # the engine's replans and new targets while serving (Engine.history,
                                     # requests counted from the first example)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return d


def serve(engine, examples: list[Example], full: ModelWeights | None = None, progress=None,
          before=None) -> Served:
    """Every example through `engine`, one request at a time: the labels it returned scored
    against the examples' labels, latency over every request. `full` (the whole model at full
    precision) answers the same examples in batches for comparison. `progress(done, total)`
    returning False, or Ctrl-C, stops early: the figures are then of the requests served.
    `before(i, engine)`, if given, runs before request i (demonstrations change the device)."""
    names = engine.config.labels
    predicted, reports, interrupted = [], [], False
    history, first = len(engine.history), engine.requests
    try:
        for i, e in enumerate(examples):
            if before is not None:
                before(i, engine)
            result = engine.run(e.text, e.text_pair)
            predicted.append(names.index(result.label))
            reports.append(result.report)
            if progress is not None and progress(i + 1, len(examples)) is False:
                interrupted = i + 1 < len(examples)
                break
    except KeyboardInterrupt:
        interrupted = True
    if not reports:
        from .errors import Cancelled
        raise Cancelled("interrupted before the first answer: nothing was measured")
    done = examples[:len(reports)]
    gold = [e.label for e in done]
    full_acc = full_f1 = math.nan  # (no full model given: nothing to compare with)
    if full is not None:
        full_pred = predict_logits(full, engine.tokenizer, done).argmax(1).tolist()
        full_acc, full_f1 = _share(full_pred, gold), macro_f1(full_pred, gold, len(names))
    target = reports[0].target_ms
    return Served(
        labels=tuple(names), total=len(examples), requests=len(reports),
        served_accuracy=_share(predicted, gold), served_macro_f1=macro_f1(predicted, gold, len(names)),
        full_accuracy=full_acc, full_macro_f1=full_f1,
        target_ms=target, **latency_stats([r.latency_ms for r in reports], target),
        guard_rate=sum(bool(r.guard_changes) for r in reports) / len(reports),
        peak_model_bytes=max(r.peak_model_bytes for r in reports), preload_bytes=engine.preload_bytes,
        interrupted=interrupted,
        changes=tuple({**c, "request": c["request"] - first, **({"from_request": c["from_request"] - first}
                                                                  if "from_request" in c else {})}
                      for c in engine.history[history:]))


def _share(predicted, gold) -> float:
    return sum(p == g for p, g in zip(predicted, gold)) / len(gold)
