"""Quantization-aware training: a model's shards as the store will hold them.

`fake_quant(weights, bits)` returns the model with every shard matrix replaced by what the
linear codec decodes it to (sti.codec.linear_grid, the very function the store's encoder
calls: same groups, same clipping, same float16 rounding), at a bitwidth chosen per
(layer, shard); biases, LayerNorms, embeddings and the head stay float32, as in a store. In
the forward pass the weights are the quantized ones; the backward pass is the straight-through
estimator (the gradient of the quantized weight is passed to the float32 one unchanged), so
training moves the float32 weights toward values that still work after rounding.

Why by hand: the store's codec is ours (docs/CODECS.md), so no library fake-quantizes to it,
and a store must hold exactly what training saw.
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch

from . import codec
from .store import MATRICES  # the shard parts a store encodes
from .weights import COL_PARTS, LayerWeights, ModelWeights, shard_slice

# How often a shard is drawn at each bitwidth in training: the planner streams most shards
# at 2-3 bits under a tight deadline, so those are drawn most.
BIT_DRAWS = {2: 0.3, 3: 0.3, 4: 0.15, 5: 0.05, 6: 0.05, 32: 0.15}


def part_groups(w: torch.Tensor, part: str, shards: list[int], config) -> torch.Tensor:
    """The codec's groups of the given shards' parts of a layer matrix: each part as the
    store encodes it (rows x cols, row-major), padded with its last value to whole groups;
    [len(shards) * groups per part, GROUP]."""
    flat = torch.stack([(w[:, shard_slice(part, j, config)] if part in COL_PARTS else w[shard_slice(part, j, config)])
                        .reshape(-1) for j in shards])
    pad = -flat.shape[1] % codec.GROUP
    if pad:
        flat = torch.cat([flat, flat[:, -1:].expand(-1, pad)], 1)
    return flat.reshape(-1, codec.GROUP)


def quantized_parts(w: torch.Tensor, part: str, shards: list[int], bits: int, config) -> list[torch.Tensor]:
    """What the store decodes each of these shards' parts of `w` to at `bits` (no gradient)."""
    groups = part_groups(w.detach().float(), part, shards, config)
    values = codec.linear_values(*codec.linear_grid(groups, bits)).reshape(len(shards), -1)
    width = shard_slice(part, 0, config).stop
    shape = (w.shape[0], width) if part in COL_PARTS else (width, w.shape[1])
    return [v[:shape[0] * shape[1]].reshape(shape) for v in values]


def fake_quant_layer(layer: LayerWeights, bits: dict[int, int], config) -> LayerWeights:
    """The layer with shard j's matrices at bits[j] (32 or missing: float32), straight-through."""
    by_bits: dict[int, list[int]] = {}
    for j in layer.shard_ids:
        b = bits.get(j, 32)
        if b != 32:
            by_bits.setdefault(b, []).append(j)
    if not by_bits:
        return layer
    new = {}
    for part in MATRICES:
        w = getattr(layer, part)
        target = w.detach().clone()
        for b, shards in by_bits.items():
            positions = [layer.shard_ids.index(j) for j in shards]
            for pos, q in zip(positions, quantized_parts(w, part, positions, b, config)):
                idx = shard_slice(part, pos, config)
                if part in COL_PARTS:
                    target[:, idx] = q
                else:
                    target[idx] = q
        # straight-through: forward exactly the quantized values (w - w.detach() is exactly 0;
        # w + (target - w).detach() would round), gradient the identity
        new[part] = target + (w - w.detach())
    return replace(layer, **new)


def fake_quant(weights: ModelWeights, bits: dict[tuple[int, int], int]) -> ModelWeights:
    """The model with shard (layer, j) at bits[(layer, j)] (missing: float32)."""
    c = weights.config
    layers = [fake_quant_layer(layer, {j: b for (i2, j), b in bits.items() if i2 == i}, c)
              for i, layer in enumerate(weights.layers)]
    return replace(weights, layers=layers)


def draw_bits(layers, shards, rng: random.Random, draws: dict[int, float] = BIT_DRAWS) -> dict[tuple[int, int], int]:
    """A bitwidth per (layer, shard) of a submodel, drawn from `draws`."""
    choices, weights = list(draws), list(draws.values())
    return {(i, j): rng.choices(choices, weights)[0] for i, ids in zip(layers, shards) for j in ids}
