"""Accuracy of a model (or submodel) on a list of examples."""

from __future__ import annotations

import torch

from .data import Example
from .encoder import Submodel, classify
from .tokenizer import Tokenizer
from .weights import ModelWeights


def batches_by_length(examples: list[Example], tokenizer: Tokenizer, batch_size: int):
    """Yield (indices, Batch) with similar-length texts together, so padding stays small."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].text))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, tokenizer.encode([examples[i].text for i in idx])


def predict_logits(weights: ModelWeights, tokenizer: Tokenizer, examples: list[Example],
                   submodel: Submodel | None = None, batch_size: int = 64) -> torch.Tensor:
    out = torch.empty(len(examples), weights.config.num_labels)
    for idx, batch in batches_by_length(examples, tokenizer, batch_size):
        out[idx] = classify(weights, batch.input_ids, batch.attention_mask, submodel)
    return out


def accuracy(weights: ModelWeights, tokenizer: Tokenizer, examples: list[Example],
             submodel: Submodel | None = None, batch_size: int = 64) -> float:
    logits = predict_logits(weights, tokenizer, examples, submodel, batch_size)
    labels = torch.tensor([e.label for e in examples])
    return (logits.argmax(1) == labels).float().mean().item()
