"""Rewiring (DynaBERT): reorder each layer's heads and FFN neurons by importance, so that
"the first m shards" of a layer are its m most important ones.

Permuting heads (blocks of Q/K/V rows and of attention-output columns) and neurons (rows
of FFN-in, columns of FFN-out) does not change what the layer computes; it only changes
which shard holds what.

Importance is first-order Taylor (Michel et al. 2019; DynaBERT): the gradient of the loss
with respect to a gate on a head's (or neuron's) output. That gate gradient equals the sum
of weight x gradient over the columns of the output projection the head (neuron) feeds,
so it comes straight from ordinary weight gradients, with no gates in the encoder.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .data import Example
from .encoder import encode, head_logits
from .evaluate import batches_by_length
from .tokenizer import Tokenizer
from .weights import LayerWeights, ModelWeights


def taylor_importance(weights: ModelWeights, tokenizer: Tokenizer, examples: list[Example],
                      batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (head scores [num_heads], neuron scores [intermediate_size]), summed
    over batches of |gate gradient|."""
    c = weights.config
    work = weights.clone()
    params = work.parameters()
    for p in params:
        p.requires_grad_(True)
    heads = [torch.zeros(c.num_heads) for _ in range(c.num_layers)]
    neurons = [torch.zeros(c.intermediate_size) for _ in range(c.num_layers)]
    for idx, batch in batches_by_length(examples, tokenizer, batch_size):
        labels = torch.tensor([examples[i].label for i in idx])
        hidden = encode(work, batch.input_ids, batch.attention_mask, token_type_ids=batch.token_type_ids)
        loss = F.cross_entropy(head_logits(work.head, hidden, batch.attention_mask), labels)
        for p in params:
            p.grad = None
        loss.backward()
        for i, layer in enumerate(work.layers):
            o = (layer.o_w * layer.o_w.grad).sum(0)             # per attention-output column
            heads[i] += o.view(c.num_heads, c.head_dim).sum(1).abs()
            neurons[i] += (layer.f_w * layer.f_w.grad).sum(0).abs()
    return [(h, n) for h, n in zip(heads, neurons)]


def permute_layer(layer: LayerWeights, head_order: torch.Tensor, neuron_order: torch.Tensor,
                  config: ModelConfig) -> LayerWeights:
    """The same layer with heads in `head_order` and neurons in `neuron_order`."""
    d = config.head_dim
    rows = (head_order[:, None] * d + torch.arange(d)).reshape(-1)
    return replace(
        layer,
        q_w=layer.q_w[rows], q_b=layer.q_b[rows], k_w=layer.k_w[rows], k_b=layer.k_b[rows],
        v_w=layer.v_w[rows], v_b=layer.v_b[rows], o_w=layer.o_w[:, rows],
        i_w=layer.i_w[neuron_order], i_b=layer.i_b[neuron_order], f_w=layer.f_w[:, neuron_order])


def rewire(weights: ModelWeights, scores: list[tuple[torch.Tensor, torch.Tensor]]) -> ModelWeights:
    """Sort each layer's heads and neurons by descending importance."""
    layers = []
    for layer, (h, n) in zip(weights.layers, scores):
        layers.append(permute_layer(layer, torch.argsort(h, descending=True, stable=True),
                                    torch.argsort(n, descending=True, stable=True), weights.config))
    return replace(weights, layers=layers)
