"""Quantization-aware training's fake quantization against the store it must match."""

import dataclasses
import random

import pytest
import torch

from sti import qat
from sti.codec import CodecError
from sti.config import PRESETS
from sti.encoder import Submodel, classify, encode, head_logits
from sti.store import Store, build_store
from sti.weights import ModelWeights


def test_fake_quant_equals_the_store_decode_bit_for_bit(tmp_path):
    # the store quantizes exactly what training saw: same function, groups and rounding
    weights = ModelWeights.random(PRESETS["tiny"], seed=3)
    c = weights.config
    with Store(build_store(weights, tmp_path / "s", bits=(2, 3, 5, 32))) as store:
        draws = {(i, j): (2, 3, 5, 32)[(i + j) % 4] for i in range(c.num_layers) for j in range(c.num_shards)}
        faked = qat.fake_quant(weights, draws)
        for i in range(c.num_layers):
            for j in range(c.num_shards):
                stored, seen = store.shard(i, j, draws[(i, j)]), faked.layers[i].shard(j, c)
                for part in qat.MATRICES:
                    assert torch.equal(getattr(stored, part), getattr(seen, part)), (i, j, part)
        # and a submodel's layer made of some shards, in another order, too
        sub = weights.submodel_layer(1, (3, 0, 2))
        bits = {3: 2, 0: 32, 2: 5}
        got = qat.fake_quant_layer(sub, bits, c)
        for j, b in bits.items():
            for part in qat.MATRICES:
                assert torch.equal(getattr(got.shard(j, c), part), getattr(store.shard(1, j, b), part))


def test_straight_through_gradients_reach_the_float32_weights():
    weights = ModelWeights.random(PRESETS["tiny"], seed=4)
    c = weights.config
    for p in weights.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, c.vocab_size, (2, 7))
    mask = torch.ones_like(ids)

    def logits(w):
        return head_logits(w.head, encode(w, ids, mask), mask)

    faked = qat.fake_quant(weights, {(i, j): 2 for i in range(c.num_layers) for j in range(c.num_shards)})
    assert not torch.allclose(logits(faked), logits(weights))
    logits(faked).sum().backward()
    g = weights.layers[0].q_w.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # the gradient is the one of the quantized weights, passed straight through
    q = faked.layers[0].q_w.detach().requires_grad_(True)
    layers = [dataclasses.replace(faked.layers[0], q_w=q)] + faked.layers[1:]
    logits(dataclasses.replace(faked, layers=layers)).sum().backward()
    assert torch.allclose(q.grad, g, atol=1e-6)


def test_draws_follow_the_weights_and_a_seed():
    a = qat.draw_bits([0, 1], [range(100), range(100)], random.Random(5))
    assert a == qat.draw_bits([0, 1], [range(100), range(100)], random.Random(5))
    share = sum(b in (2, 3) for b in a.values()) / len(a)
    assert 0.45 < share < 0.75  # drawn at 0.6
    assert set(a.values()) <= set(qat.BIT_DRAWS)


def test_weights_beyond_float16_are_refused_in_training_as_in_the_store():
    weights = ModelWeights.random(PRESETS["tiny"], seed=5)
    weights.layers[0].q_w[0, 0] = 1e5
    with pytest.raises(CodecError, match="gobo"):
        qat.fake_quant(weights, {(0, 0): 2})
