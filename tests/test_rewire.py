import torch

from sti.encoder import Submodel, encode
from sti.rewire import permute_layer, rewire
from tests.conftest import random_ids


def test_rewiring_does_not_change_the_output(tiny_weights, tiny_config):
    ids, mask = random_ids(tiny_config)
    gen = torch.Generator().manual_seed(3)
    scores = [(torch.rand(tiny_config.num_heads, generator=gen), torch.rand(tiny_config.intermediate_size, generator=gen))
              for _ in range(tiny_config.num_layers)]
    rewired = rewire(tiny_weights, scores)
    with torch.no_grad():
        assert torch.allclose(encode(rewired, ids, mask), encode(tiny_weights, ids, mask), atol=1e-5)
    assert not torch.equal(rewired.layers[0].q_w, tiny_weights.layers[0].q_w)


def test_rewired_first_shard_is_the_most_important_head(tiny_weights, tiny_config):
    c = tiny_config
    scores = [(torch.tensor([0.1, 0.9, 0.5, 0.2]), torch.arange(c.intermediate_size, dtype=torch.float))
              for _ in range(c.num_layers)]
    rewired = rewire(tiny_weights, scores)
    d = c.head_dim
    assert torch.equal(rewired.layers[0].q_w[:d], tiny_weights.layers[0].q_w[d:2 * d])      # head 1 first
    assert torch.equal(rewired.layers[0].o_w[:, d:2 * d], tiny_weights.layers[0].o_w[:, 2 * d:3 * d])
    last = c.intermediate_size - 1
    assert torch.equal(rewired.layers[0].i_w[0], tiny_weights.layers[0].i_w[last])
    assert torch.equal(rewired.layers[0].f_w[:, 0], tiny_weights.layers[0].f_w[:, last])
    # a submodel of the first shard of the rewired model = head 1 + top neurons of the original
    ids, mask = random_ids(c)
    top_neurons = torch.arange(last, last - c.ffn_slice, -1)
    manual = [permute_layer(l, torch.tensor([1, 2, 3, 0]), torch.cat([top_neurons, torch.arange(c.intermediate_size - c.ffn_slice)]), c)
              for l in tiny_weights.layers]
    from dataclasses import replace
    with torch.no_grad():
        a = encode(rewired, ids, mask, Submodel.of(c, 3, 1))
        b = encode(replace(tiny_weights, layers=manual), ids, mask, Submodel.of(c, 3, 1))
    assert torch.allclose(a, b, atol=1e-6)
