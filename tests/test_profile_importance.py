"""The importance profile on a tiny store: determinism, shapes, the cached-state shortcut
against a naive end-to-end rerun, and the two methods agreeing on a planted important shard."""

import pytest
import torch
import torch.nn.functional as F

import sti.profile_importance as pi
from sti.data import Example
from sti.encoder import encode, head_logits
from sti.errors import Cancelled, InputError
from sti.profiles import ImportanceProfile
from sti.store import Store, build_store
from tests.conftest import word_tokenizer

TEXTS = ["w1 w2 w3", "w5 w9 w33 w7", "w11 w12", "w4 w90 w3 w8 w8 w1", "w60 w61 w62", "w100 w101",
         "w7 w7 w7 w70", "w30 w2 w19 w18 w17", "w3", "w88 w87 w86 w85 w84 w83 w82"]


@pytest.fixture()
def fake_split(monkeypatch):
    examples = [Example(id=str(i), text=t, rating=1.0 if i % 2 else -1.0, label=i % 2) for i, t in enumerate(TEXTS)]
    monkeypatch.setattr(pi, "load_split", lambda name: examples)
    return examples


def make_store(weights, tmp_path, name="store"):
    return build_store(weights, tmp_path / name, bits=(2, 4, 32), tokenizer_from=word_tokenizer(tmp_path / "tok"))


def test_profile_shape_and_determinism(tiny_weights, tmp_path, fake_split):
    path = make_store(tiny_weights, tmp_path)
    a = pi.measure_importance(path, batch_size=4)
    b = pi.measure_importance(path, batch_size=4)
    c = tiny_weights.config
    assert isinstance(a, ImportanceProfile) and a.shard_kl == b.shard_kl and a.shard_acc_drop == b.shard_acc_drop
    assert len(a.shard_kl) == c.num_layers and all(len(r) == c.num_shards for r in a.shard_kl)
    assert all(v >= 0 for r in a.shard_kl for v in r) and max(map(max, a.shard_kl)) > 0
    assert a.bits_error[2] == 1.0 and a.bits_error[32] == 0.0 and a.bits_error[4] <= 1.0
    assert a.kl_to_acc >= pi.KL_TO_ACC_FLOOR and a.lowest_bits == 2
    assert set(a.submodel_accuracy) == {f"{n},{m}" for n in (2, 3) for m in (2, 3, 4)}
    assert a.submodel_acc(3, 4) == a.full_accuracy


def test_cached_states_equal_a_naive_rerun(tiny_weights, tmp_path, fake_split):
    path = make_store(tiny_weights, tmp_path)
    prof = pi.measure_importance(path, batch_size=3)
    tok = pi.Tokenizer(path)
    batch = tok.encode(TEXTS)
    with Store(path) as s:
        full = s.load_model(32)
        with torch.no_grad():
            ref = F.log_softmax(head_logits(full.head, encode(full, batch.input_ids, batch.attention_mask),
                                            batch.attention_mask), -1)
            for layer, shard in [(0, 1), (2, 3)]:
                w = s.load_model(32)
                bits = [32] * 4
                bits[shard] = 2
                w.layers[layer] = s.layer(layer, range(4), bits)
                logp = F.log_softmax(head_logits(w.head, encode(w, batch.input_ids, batch.attention_mask),
                                                 batch.attention_mask), -1)
                kl = F.kl_div(logp, ref, log_target=True, reduction="sum").item() / len(TEXTS)
                assert abs(kl - prof.shard_kl[layer][shard]) < 1e-6 + 1e-4 * kl


def test_both_methods_rank_a_planted_shard_first(tiny_weights, tmp_path, fake_split):
    c = tiny_weights.config
    layer = tiny_weights.layers[1]
    d, f = c.head_dim, c.ffn_slice
    with torch.no_grad():  # shard 2 of layer 1 gets weights far larger than the rest
        for part, width, dim in (("v_w", d, 0), ("o_w", d, 1), ("i_w", f, 0), ("f_w", f, 1)):
            t = getattr(layer, part)
            t.narrow(dim, 2 * width, width).mul_(12.0)
    path = make_store(tiny_weights, tmp_path)
    deg = pi.measure_importance(path, method="degrade", batch_size=5)
    grad = pi.measure_importance(path, method="gradient", batch_size=5)
    flat = lambda p: [v for r in p.shard_kl for v in r]  # noqa: E731
    assert flat(deg).index(max(flat(deg))) == 1 * c.num_shards + 2
    assert flat(grad).index(max(flat(grad))) == 1 * c.num_shards + 2
    assert pi.rank_correlation(deg, grad) > 0.2
    assert grad.shard_acc_drop is None


def test_cancel_and_bad_arguments(tiny_weights, tmp_path, fake_split):
    path = make_store(tiny_weights, tmp_path)
    with pytest.raises(Cancelled):
        pi.measure_importance(path, progress=lambda done, total: done < 3)
    with pytest.raises(InputError, match="method"):
        pi.measure_importance(path, method="magic")
    with pytest.raises(InputError, match="test split"):
        pi.measure_importance(path, split="test")


def test_bits_error_and_kl_to_acc():
    assert pi.bits_error_of({2: 0.5, 4: 0.1, 5: 0.2, 32: 0.0}, 2) == {2: 1.0, 4: 0.2, 5: 0.2, 32: 0.0}
    assert pi.kl_to_acc_of([[1.0, 1.0]], {2: 1.0, 4: 0.5, 32: 0.0}, {2: 0.6, 4: 0.7, 32: 0.8}, 0.8) == \
        pytest.approx((2 * 0.2 + 1 * 0.1) / (4 + 1))
    assert pi.kl_to_acc_of([[0.0]], {2: 1.0, 32: 0.0}, {2: 0.9, 32: 0.8}, 0.8) == pi.KL_TO_ACC_FLOOR
    assert pi.grid_sizes(12) == [3, 6, 9, 12] and pi.grid_sizes(6) == [3, 4, 5, 6] and pi.grid_sizes(24) == [6, 12, 18, 24]
