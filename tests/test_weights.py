import dataclasses

import pytest
import torch

from sti.config import ModelConfig, PRESETS
from sti.errors import ConfigError
from sti.weights import ModelWeights, load_model_dir, save_model_dir


def test_save_load_round_trip_is_exact(tmp_path, tiny_weights):
    out = save_model_dir(tiny_weights, tmp_path / "m")
    back = load_model_dir(out)
    assert back.config == tiny_weights.config
    a, b = tiny_weights.tensors(), back.tensors()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_save_replaces_atomically(tmp_path, tiny_weights, tiny_config):
    save_model_dir(tiny_weights, tmp_path / "m")
    other = ModelWeights.random(tiny_config, seed=7)
    save_model_dir(other, tmp_path / "m")
    assert torch.equal(load_model_dir(tmp_path / "m").layers[0].q_w, other.layers[0].q_w)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_failed_save_leaves_old_model(tmp_path, tiny_weights, monkeypatch):
    save_model_dir(tiny_weights, tmp_path / "m")
    import sti.weights as w

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(w, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_model_dir(tiny_weights, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    load_model_dir(tmp_path / "m")


def test_truncated_checkpoint_is_refused(tmp_path, tiny_weights):
    out = save_model_dir(tiny_weights, tmp_path / "m")
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ConfigError, match="corrupt or truncated"):
        load_model_dir(out)


def test_shape_mismatch_and_missing_tensor(tiny_weights, tiny_config):
    t = tiny_weights.tensors()
    bad = dict(t)
    bad["encoder.layer.0.attention.self.query.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConfigError, match="shape"):
        ModelWeights.from_tensors(tiny_config, bad)
    del bad["encoder.layer.0.attention.self.query.weight"]
    with pytest.raises(ConfigError, match="missing"):
        ModelWeights.from_tensors(tiny_config, bad)


def test_shard_views_reassemble_the_layer(tiny_weights, tiny_config):
    layer = tiny_weights.layers[1]
    shards = {j: layer.shard(j, tiny_config) for j in range(tiny_config.num_shards)}
    assert shards[2].q_w.shape == (tiny_config.head_dim, tiny_config.hidden_size)
    assert shards[2].f_w.shape == (tiny_config.hidden_size, tiny_config.ffn_slice)
    assert torch.equal(shards[2].q_w, layer.q_w[2 * tiny_config.head_dim:3 * tiny_config.head_dim])
    assert torch.equal(shards[2].i_w, layer.i_w[2 * tiny_config.ffn_slice:3 * tiny_config.ffn_slice])
    again = type(layer).from_shards(layer.shared, shards)
    for part in ("q_w", "k_b", "o_w", "i_w", "f_w"):
        assert torch.equal(getattr(again, part), getattr(layer, part))


def test_config_validation_and_hf_round_trip(tmp_path):
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError, match=r"num_layers must be an integer in 1\.\.1024"):
        ModelConfig(num_layers=0)
    with pytest.raises(ConfigError, match="num_layers"):
        ModelConfig(num_layers=10**9)
    with pytest.raises(ConfigError, match="layer_norm_eps"):
        ModelConfig(layer_norm_eps=-1.0)
    with pytest.raises(ConfigError, match="pooling must be one of mean, cls"):
        ModelConfig(pooling="max")
    with pytest.raises(ConfigError, match="position_offset"):
        ModelConfig(position_offset=512)
    c = PRESETS["bert-base"]
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown fields"):
        ModelConfig.from_dict({"bogus": 1})
    # what sti writes (config.json with its "sti" entry) reads back as the same config
    odd = dataclasses.replace(PRESETS["tiny"], pooling="cls", head_act="tanh", elastic=True,
                              labels=("a", "b"))
    save_model_dir(ModelWeights.random(odd, seed=3), tmp_path / "m")
    assert load_model_dir(tmp_path / "m").config == odd
    (tmp_path / "nope").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model_dir(tmp_path / "nope")


@pytest.mark.real
def test_real_config_matches_brief(real_weights):
    c = real_weights.config
    assert (c.num_layers, c.num_heads, c.head_dim, c.hidden_size, c.intermediate_size, c.vocab_size) == \
        (6, 12, 32, 384, 1536, 30522)
    params = sum(t.numel() for k, t in real_weights.tensors().items() if not k.startswith("classifier"))
    assert params == c.embedding_params + c.num_layers * c.layer_params
    assert params + 384 * 384 + 384 == 22_713_216  # the brief's 22.7M includes the unused pooler
