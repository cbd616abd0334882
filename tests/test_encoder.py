"""Our encoder against Hugging Face transformers, and submodels against weight surgery."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
from transformers import BertConfig, BertModel

from sti.encoder import Submodel, depth_layers, encode
from sti.errors import ConfigError
from tests.conftest import random_ids


def hf_model(weights):
    """A transformers BertModel holding exactly our weights (the independent reference)."""
    c = weights.config
    cfg = BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                     num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
                     max_position_embeddings=c.max_position, type_vocab_size=c.type_vocab_size,
                     layer_norm_eps=c.layer_norm_eps, attn_implementation="eager")
    model = BertModel(cfg, add_pooling_layer=False).eval()
    state = {k: v for k, v in weights.tensors().items() if not k.startswith("classifier")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model


@pytest.mark.real
def test_matches_transformers_on_real_minilm(real_weights, real_tokenizer, real_data_dir):
    from sti.data import load_split
    texts = [e.text for e in load_split("test", real_data_dir)[:24]]
    batch = real_tokenizer.encode(texts)
    assert len(set(batch.lengths)) > 5  # mixed lengths, so padding is exercised
    ref = hf_model(real_weights)
    with torch.no_grad():
        ours = encode(real_weights, batch.input_ids, batch.attention_mask, all_hidden=True)
        theirs = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == 7
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() < 1e-4


def test_full_submodel_equals_full_model(tiny_weights, tiny_config):
    ids, mask = random_ids(tiny_config)
    with torch.no_grad():
        full = encode(tiny_weights, ids, mask)
        explicit = encode(tiny_weights, ids, mask, Submodel(
            layers=tuple(range(tiny_config.num_layers)),
            shards=tuple(tuple(range(tiny_config.num_shards)) for _ in range(tiny_config.num_layers))))
        shuffled = encode(tiny_weights, ids, mask, Submodel(
            layers=tuple(range(tiny_config.num_layers)),
            shards=tuple((3, 1, 0, 2) for _ in range(tiny_config.num_layers))))
    assert torch.equal(full, explicit)
    assert torch.allclose(full, shuffled, atol=1e-6)  # shard order is irrelevant


@pytest.mark.parametrize("keep", [(0,), (1, 3), (0, 2, 3), (2,)])
def test_dropping_shards_equals_zeroing_heads_and_neurons(tiny_weights, tiny_config, keep):
    c = tiny_config
    ids, mask = random_ids(c)
    layers = (0, 2)  # also drops layer 1
    ref = hf_model(tiny_weights)
    with torch.no_grad():
        for i, layer in enumerate(ref.encoder.layer):
            for j in set(range(c.num_shards)) - set(keep):
                layer.attention.output.dense.weight[:, j * c.head_dim:(j + 1) * c.head_dim] = 0
                layer.output.dense.weight[:, j * c.ffn_slice:(j + 1) * c.ffn_slice] = 0
        ref.encoder.layer = torch.nn.ModuleList([ref.encoder.layer[i] for i in layers])
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = encode(tiny_weights, ids, mask, Submodel(layers=layers, shards=(keep, keep)))
    assert (ours - expected).abs().max().item() < 1e-5
    with torch.no_grad():
        assert not torch.allclose(ours, encode(tiny_weights, ids, mask), atol=1e-3)


def test_depth_layers_follow_dynabert():
    assert depth_layers(6, 6) == (0, 1, 2, 3, 4, 5)
    assert depth_layers(6, 3) == (0, 2, 4)
    assert depth_layers(6, 4) == (0, 1, 3, 4)
    assert depth_layers(6, 5) == (0, 1, 2, 3, 4)
    assert depth_layers(12, 6) == (0, 2, 4, 6, 8, 10)
    for n in range(1, 13):
        assert len(depth_layers(12, n)) == n
    with pytest.raises(ConfigError):
        depth_layers(6, 0)


@pytest.mark.parametrize("sub", [
    Submodel(layers=(), shards=()),
    Submodel(layers=(0, 0), shards=((0,), (1,))),
    Submodel(layers=(1, 0), shards=((0,), (1,))),
    Submodel(layers=(0,), shards=((0,), (1,))),
    Submodel(layers=(5,), shards=((0,),)),
    Submodel(layers=(0,), shards=((),)),
    Submodel(layers=(0,), shards=((0, 0),)),
    Submodel(layers=(0,), shards=((4,),)),
])
def test_bad_submodels_are_refused(tiny_weights, tiny_config, sub):
    ids, mask = random_ids(tiny_config)
    with pytest.raises(ConfigError):
        encode(tiny_weights, ids, mask, sub)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_layer_by_groups_equals_the_stacked_layer_for_any_shards_sizes_and_order(tiny_weights, data):
    # the engine's compute path: shards packed into groups in arrival order, each group using
    # a prefix of its slots; equal to the reference layer on the same shards (any subset, any
    # order, any group size) to 1e-5 in float32, and within bfloat16's rounding in bfloat16
    from sti.encoder import attention_keep, layer_forward
    from sti.groups import ATTN, FFN, ShardGroup, layer_by_groups
    c = tiny_weights.config
    ids, mask = random_ids(c)
    x = torch.randn(ids.shape[0], ids.shape[1], c.hidden_size)
    keep = attention_keep(mask)
    layer_id = data.draw(st.integers(0, c.num_layers - 1))
    layer = tiny_weights.layers[layer_id]
    shards = data.draw(st.permutations(range(c.num_shards)).map(lambda p: p[:max(1, len(p) - 1)]))
    shards = shards[:data.draw(st.integers(1, len(shards)))]
    size = data.draw(st.integers(1, c.num_shards))
    spare = data.draw(st.integers(0, 1))       # a group may hold a dropped shard after its used ones
    ref = layer_forward(x, keep, tiny_weights.submodel_layer(layer_id, tuple(sorted(shards))), c)
    for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)):
        groups = {ATTN: [], FFN: []}
        order = list(shards) + [s for s in range(c.num_shards) if s not in shards][:spare]
        for k, j in enumerate(order):
            parts = vars(layer.shard(j, c))
            for phase in (ATTN, FFN):
                if k % size == 0:
                    groups[phase].append(ShardGroup(phase, size, c, dtype))
                groups[phase][-1].add(j, parts)
        used = [[(g, sum(1 for s in g.shards if s in shards)) for g in groups[p]] for p in (ATTN, FFN)]
        with torch.no_grad():
            got = layer_by_groups(x, keep, used[0], used[1], layer.shared, c)
        assert (ref - got).abs().max() < bound, dtype


def test_group_runs_cover_exactly_the_used_slots(tiny_config):
    from sti.groups import FFN, ShardGroup
    g = ShardGroup(FFN, 4, tiny_config)
    g.shards = [0, 1, 2, 3]
    assert g.runs(lambda s: True) == [(0, 4)]
    assert g.runs(lambda s: s < 2) == [(0, 2)]              # the guard's drops: the last to arrive
    assert g.runs(lambda s: s in (0, 3)) == [(0, 1), (3, 1)]
    assert g.runs(lambda s: False) == []
    g.shards = [5, 6]
    assert g.runs(lambda s: s != 5) == [(1, 1)]
