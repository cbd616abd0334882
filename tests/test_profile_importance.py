"""The importance profile on tiny stores: determinism and shapes, the cached-state degrade loop
against naive end-to-end reruns, the gradient method's probes against finite differences, both
methods finding a planted important shard, cancelling, and the small helpers."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sti.profile_importance as pi
from sti.config import PRESETS
from sti.data import Example
from sti.encoder import Submodel, encode, head_logits
from sti.errors import Cancelled, InputError
from sti.evaluate import accuracy
from sti.profiles import ImportanceProfile, load_profile, save_profile
from sti.store import MATRICES, Store, build_store
from sti.tokenizer import Tokenizer
from sti.weights import ModelWeights, shard_slice, split_dim
from tests.conftest import word_tokenizer

TEXTS = ["w1 w2 w3", "w5 w9 w33 w7", "w11 w12", "w4 w90 w3 w8 w8 w1", "w60 w61 w62", "w100 w101",
         "w7 w7 w7 w70", "w30 w2 w19 w18 w17", "w3", "w88 w87 w86 w85 w84 w83 w82", "w40 w41 w42 w43",
         "w50 w51 w52 w53 w54 w55 w56 w57 w58 w59"]
N, M = PRESETS["tiny"].num_layers, PRESETS["tiny"].num_shards


def fake_examples():
    return [Example(id=str(i), text=t, rating=1.0 if i % 3 else -1.0, label=int(i % 3 > 0))
            for i, t in enumerate(TEXTS)]


@pytest.fixture()
def fake_split(monkeypatch):
    monkeypatch.setattr(pi, "load_split", lambda name: fake_examples())


def make_store(weights, directory):
    return build_store(weights, directory / "store", bits=(2, 4, 32), tokenizer_from=word_tokenizer(directory / "tok"))


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return make_store(ModelWeights.random(PRESETS["tiny"], seed=1), tmp_path_factory.mktemp("imp"))


@pytest.fixture(scope="module")
def planted_path(tmp_path_factory):
    """Shard 2 of layer 1 gets attention-value/output and FFN weights 12 times larger than the rest."""
    w = ModelWeights.random(PRESETS["tiny"], seed=1)
    c, layer = w.config, w.layers[1]
    with torch.no_grad():
        for part in ("v_w", "o_w", "i_w", "f_w"):
            sl = shard_slice(part, 2, c)
            getattr(layer, part).narrow(split_dim(part), sl.start, sl.stop - sl.start).mul_(12.0)
    return make_store(w, tmp_path_factory.mktemp("planted"))


def mapped(obj, fn):
    """A copy of a weights dataclass (nested) with `fn` applied to every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, list):
        return [mapped(x, fn) for x in obj]
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: mapped(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)})
    return obj


def reference_logp(weights, batch):
    with torch.no_grad():
        logits = head_logits(weights.head, encode(weights, batch.input_ids, batch.attention_mask),
                             batch.attention_mask)
    return F.log_softmax(logits.double(), -1)


def test_shapes_determinism_and_invariants(store_path, fake_split):
    made = {}
    for method in pi.METHODS:
        a = made[method] = pi.measure_importance(store_path, method=method, batch_size=4, seed=3)
        b = pi.measure_importance(store_path, method=method, batch_size=4, seed=3)
        assert isinstance(a, ImportanceProfile) and a.method == method and a.seed == 3 and a.split == "dev"
        assert a.shard_kl == b.shard_kl and a.shard_acc_drop == b.shard_acc_drop
        assert a.bits_error == b.bits_error and a.kl_to_acc == b.kl_to_acc
        assert a.submodel_accuracy == b.submodel_accuracy and a.full_accuracy == b.full_accuracy
        assert len(a.shard_kl) == N and all(len(r) == M for r in a.shard_kl)
        assert all(v >= 0 for r in a.shard_kl for v in r) and max(map(max, a.shard_kl)) > 0
        assert a.bits_error == {2: 1.0, 4: a.bits_error[4], 32: 0.0} and 0.0 <= a.bits_error[4] <= 1.0
        assert a.kl_to_acc >= pi.KL_TO_ACC_FLOOR and a.lowest_bits == 2 and a.cost_s > 0 and a.created
        assert set(a.submodel_accuracy) == {f"{n},{m}" for n in (2, 3) for m in (1, 2, 3, 4)}
        assert a.submodel_acc(N, M) == a.full_accuracy
        if method == "degrade":
            assert len(a.shard_acc_drop) == N and all(len(r) == M for r in a.shard_acc_drop)
        else:
            assert a.shard_acc_drop is None
    # the batching changes nothing but float rounding
    for method in pi.METHODS:
        other = pi.measure_importance(store_path, method=method, batch_size=64)
        assert np.allclose(other.shard_kl, made[method].shard_kl, rtol=1e-4, atol=1e-12)


def test_degrade_equals_naive_end_to_end_reruns(store_path, fake_split):
    prof = pi.measure_importance(store_path, batch_size=3)
    batch = Tokenizer(store_path).encode(TEXTS)
    labels = torch.tensor([e.label for e in fake_examples()])
    with Store(store_path) as s:
        full = s.load_model(32)
        ref = reference_logp(full, batch)
        assert prof.full_accuracy == pytest.approx(float((ref.argmax(-1) == labels).double().mean()))
        for layer, shard in [(0, 1), (1, 0), (2, 3)]:
            w = s.load_model(32)
            bits = [32] * M
            bits[shard] = 2
            w.layers[layer] = s.layer(layer, range(M), bits)
            logp = reference_logp(w, batch)
            kl = F.kl_div(logp, ref, log_target=True, reduction="sum").item() / len(TEXTS)
            assert kl > 0 and prof.shard_kl[layer][shard] == pytest.approx(kl, rel=1e-4, abs=1e-9)
            acc = float((logp.argmax(-1) == labels).double().mean())
            assert prof.shard_acc_drop[layer][shard] == pytest.approx(prof.full_accuracy - acc)


def test_gradient_probes_match_finite_differences(store_path, fake_split):
    """The per-sentence Fisher form dl' F dl from the probes, against dl by central differences
    of the logits along each shard's weight change (in float64)."""
    with Store(store_path) as store:
        s = pi._Session(store, "dev", 0, None, 64, 128, lambda: None)
        w = s.weights
        deltas = {}
        for i in range(N):
            low = store.layer(i, range(M), 2)
            for part in MATRICES:
                deltas[(i, part)] = (getattr(w.layers[i], part), getattr(low, part) - getattr(w.layers[i], part))
        _, batch = s.data.batches[0]
        got = s._fisher(batch, deltas)
        wd = mapped(w, lambda t: t.double())
        p = torch.softmax(reference_logp(wd, batch), -1)
        fisher = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        for layer, shard in [(0, 2), (2, 0)]:
            def logits_at(t):
                moved = mapped(wd, lambda t: t.clone())
                for part in MATRICES:
                    sl = shard_slice(part, shard, w.config)
                    d = deltas[(layer, part)][1].double().narrow(split_dim(part), sl.start, sl.stop - sl.start)
                    getattr(moved.layers[layer], part).narrow(split_dim(part), sl.start, sl.stop - sl.start).add_(t * d)
                return head_logits(moved.head, encode(moved, batch.input_ids, batch.attention_mask),
                                   batch.attention_mask)
            with torch.no_grad():
                eps = 1e-4
                dl = (logits_at(eps) - logits_at(-eps)) / (2 * eps)
            want = float(torch.einsum("bk,bkl,bl->", dl, fisher, dl))
            assert want > 0 and got[layer, shard] == pytest.approx(want, rel=1e-3)


def test_both_methods_rank_a_planted_shard_first(planted_path, fake_split):
    deg, grad, rho = pi.compare(planted_path, batch_size=5)
    for prof in (deg, grad):
        flat = np.asarray(prof.shard_kl).ravel()
        assert int(flat.argmax()) == 1 * M + 2
    assert rho > 0.3 and rho == pytest.approx(pi.rank_correlation(grad, deg))
    assert grad.shard_acc_drop is None and deg.shard_acc_drop is not None
    # compare shares the whole-model evaluations but gives the same tables as separate runs
    alone = pi.measure_importance(planted_path, method="gradient", batch_size=5)
    assert alone.shard_kl == grad.shard_kl and alone.kl_to_acc == grad.kl_to_acc
    # the gradient table is scaled to the KL of the whole model at the lowest bitwidth
    m = pi.measure(planted_path, method="gradient", batch_size=5)
    assert float(np.sum(m.profile.shard_kl)) == pytest.approx(m.kl_by_bits[2], rel=1e-9)
    assert set(m.seconds) == {"common", "gradient"}


def test_accuracy_by_bits_and_measurement(store_path, fake_split):
    m = pi.measure(store_path, batch_size=4)
    with Store(store_path) as s:
        full = s.load_model(32)
        for n, k in [(2, 1), (2, 4), (3, 2)]:
            want = accuracy(full, Tokenizer(store_path), fake_examples(), Submodel.of(full.config, n, k))
            assert m.profile.submodel_acc(n, k) == pytest.approx(want)
    acc = pi.accuracy_by_bits(store_path, batch_size=4)
    assert acc == pytest.approx(m.accuracy_by_bits) and acc[32] == m.profile.full_accuracy
    assert m.kl_by_bits[32] == 0.0 and m.kl_by_bits[2] > 0
    assert m.profile.bits_error[4] == pytest.approx(min(1.0, m.kl_by_bits[4] / m.kl_by_bits[2]))


def test_limit_cancel_and_bad_arguments(store_path, fake_split, tmp_path):
    seen = []
    prof = pi.measure_importance(store_path, limit=5, batch_size=2, progress=lambda d, t: seen.append((d, t)) or True)
    assert seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == list(range(1, len(seen) + 1))
    assert len({t for _, t in seen}) == 1  # the total is known from the start
    assert save_profile(prof, tmp_path / "imp.json") and load_profile(tmp_path / "imp.json").shard_kl == prof.shard_kl
    for method in pi.METHODS:
        with pytest.raises(Cancelled):
            pi.measure_importance(store_path, method=method, progress=lambda done, total: done < total - 1)
    with pytest.raises(InputError, match="method"):
        pi.measure_importance(store_path, method="magic")
    with pytest.raises(InputError, match="test split"):
        pi.measure_importance(store_path, split="test")
    for bad in ({"limit": 0}, {"batch_size": 0}, {"seed": -1}):
        with pytest.raises(InputError):
            pi.measure_importance(store_path, **bad)


def test_helpers():
    assert pi.bits_error_of({2: 0.5, 4: 0.1, 5: 0.2, 32: 0.0}, 2) == {2: 1.0, 4: 0.2, 5: 0.2, 32: 0.0}
    assert pi.bits_error_of({2: 0.0, 3: 0.0, 32: 0.0}, 2) == {2: 1.0, 3: 0.0, 32: 0.0}
    assert pi.kl_to_acc_of([[1.0, 1.0]], {2: 1.0, 4: 0.5, 32: 0.0}, {2: 0.6, 4: 0.7, 32: 0.8}, 0.8) == \
        pytest.approx((2 * 0.2 + 1 * 0.1) / (4 + 1))
    assert pi.kl_to_acc_of([[0.0]], {2: 1.0, 32: 0.0}, {2: 0.9, 32: 0.8}, 0.8) == pi.KL_TO_ACC_FLOOR
    assert pi.kl_to_acc_of([[1.0]], {2: 1.0, 32: 0.0}, {2: 0.9, 32: 0.8}, 0.8) == pi.KL_TO_ACC_FLOOR
    assert pi.grid_layers(6) == [3, 4, 5, 6] and pi.grid_layers(3) == [2, 3]
    assert pi.grid_layers(12) == list(range(6, 13))
    assert pi.grid_shards(12) == [3, 6, 9, 12] and pi.grid_shards(4) == [1, 2, 3, 4] and pi.grid_shards(2) == [1, 2]

    def prof(kl):
        return ImportanceProfile(store_id="s", method="degrade", split="dev", seed=0, lowest_bits=2, full_accuracy=0.9,
                                 submodel_accuracy={}, shard_kl=kl, shard_acc_drop=None,
                                 bits_error={2: 1.0, 32: 0.0}, kl_to_acc=0.1)
    a = prof(((1.0, 2.0), (3.0, 4.0)))
    assert pi.rank_correlation(a, prof(((10.0, 20.0), (30.0, 40.0)))) == pytest.approx(1.0)
    assert pi.rank_correlation(a, prof(((4.0, 3.0), (2.0, 1.0)))) == pytest.approx(-1.0)
    assert pi.rank_correlation(a, prof(((1.0, 1.0), (1.0, 1.0)))) == 0.0
    assert pi._ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    with pytest.raises(InputError):
        pi.rank_correlation(a, prof(((1.0,),)))


def test_a_store_of_32_bit_shards_only_is_profiled_and_planned(tmp_path, fake_split):
    """No bitwidth to degrade to: every shard's importance is zero, the submodel grid is still
    measured, and the planner plans the whole model at 32 bits for a model that is not elastic."""
    from sti.planning import make_plan
    from sti.profiles import DeviceProfile
    path = build_store(ModelWeights.random(PRESETS["tiny"], seed=5), tmp_path / "store", bits=(32,),
                       tokenizer_from=word_tokenizer(tmp_path / "tok"))
    for method in ("degrade", "gradient"):
        p = pi.measure_importance(path, method=method)
        assert np.all(np.array(p.shard_kl) == 0.0) and p.bits_error == {32: 0.0}
        assert len(p.submodel_accuracy) > 1 and 0.0 <= p.full_accuracy <= 1.0
    with Store(path) as s:
        size = float(s.shard_record(0, 0, 32).length)
        device = DeviceProfile(store_id=s.store_id, storage="warm", threads=1, seq_len=8, shard_bytes={32: size},
                               shard_read_ms={32: 0.01}, shard_decode_ms={32: 0.0}, layer_read_ms=0.0,
                               compute_coef=(0.05, 0.0, 0.0, 0.0), compute_fit_error=0.0, embed_ms=(0.01, 0.0),
                               head_ms=0.01)
        plan = make_plan(device, p, s.store_id, 10.0, 10**6, seq_len=8, prune=False)
    assert (plan.choice.n, plan.choice.m) == (N, M) and {b for row in plan.choice.bits for b in row} == {32}
