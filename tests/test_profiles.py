"""Profile schemas (JSON in and out, validated) and the device profiler on a tiny store."""

import json
import math
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sti.errors import Cancelled
from sti.profile_device import Background, compute_load, fit_compute, io_load, measure_device, measure_io
from sti.profiles import DeviceProfile, ImportanceProfile, ProfileError, load_profile, save_profile
from sti.store import Store, build_store
from tests.conftest import word_tokenizer


def device(**kw):
    d = dict(store_id="s" * 64, storage="warm", threads=1, seq_len=32,
             shard_bytes={2: 1000.0, 32: 9000.0}, shard_read_ms={2: 0.1, 32: 0.5},
             shard_decode_ms={2: 0.05, 32: 0.01}, layer_read_ms=0.01, compute_coef=(0.1, 0.01, 0.001, 1e-5),
             compute_fit_error=0.05, embed_ms=(0.2, 0.01), head_ms=0.05)
    d.update(kw)
    return DeviceProfile(**d)


def importance(**kw):
    d = dict(store_id="s" * 64, method="degrade", split="dev", seed=0, lowest_bits=2, full_accuracy=0.86,
             submodel_accuracy={"2,2": 0.8, "2,1": 0.7}, shard_kl=((0.1, 0.01), (0.2, 0.02)),
             shard_acc_drop=((0.01, 0.0), (0.02, 0.001)), bits_error={2: 1.0, 32: 0.0}, kl_to_acc=0.3)
    d.update(kw)
    return ImportanceProfile(**d)


@pytest.mark.parametrize("profile", [device(), importance(), importance(shard_acc_drop=None, method="gradient")])
def test_round_trip(profile, tmp_path):
    path = save_profile(profile, tmp_path / "p.json")
    assert load_profile(path) == profile
    assert load_profile(path, store_id="s" * 64) == profile


def test_models_of_the_device_profile():
    p = device()
    assert p.io_ms(2) == pytest.approx(0.15)
    assert p.compute_ms(4, 10) == pytest.approx(0.1 + 0.1 + 0.04 + 0.004)
    assert p.compute_ms(0, 10) == 0.0
    assert device(compute_coef=(0.1, 0.01, 0.001, 1e-5, 0.5)).compute_ms(4, 10) == pytest.approx(0.244 + 2.0)
    assert p.embed_read_ms(10) == pytest.approx(0.3)
    assert p.bits == (2, 32)
    i = importance()
    assert i.shard_penalty(1, 0, 2) == pytest.approx(0.3 * 0.2) and i.shard_penalty(1, 0, 32) == 0.0
    assert i.submodel_acc(2, 2) == 0.8 and i.submodel_acc(9, 9) == 0.0


def test_refusals(tmp_path):
    path = save_profile(device(), tmp_path / "p.json")
    with pytest.raises(ProfileError, match="measured for store"):
        load_profile(path, store_id="t" * 64)
    with pytest.raises(ProfileError, match="no profile"):
        load_profile(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ProfileError, match="JSON"):
        load_profile(tmp_path / "bad.json")
    d = json.loads(path.read_text())
    for key, value in [("version", 99), ("kind", "plan"), ("threads", -1), ("compute_coef", [1, 2]),
                       ("shard_read_ms", {"2": float("nan"), "32": 1}), ("shard_bytes", {"x": 1}),
                       ("seq_len", "long"), ("shard_decode_ms", {"2": 0.1})]:
        bad = dict(d, **{key: value})
        (tmp_path / "b.json").write_text(json.dumps(bad))
        with pytest.raises(ProfileError):
            load_profile(tmp_path / "b.json")
    (tmp_path / "huge.json").write_bytes(b" " * (5 << 20))
    with pytest.raises(ProfileError, match="larger"):
        load_profile(tmp_path / "huge.json")


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                       lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                       max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(which=st.sampled_from(["device", "importance"]), key=st.text(max_size=20), value=JSONISH,
       drop=st.booleans())
def test_fuzzed_profiles_raise_only_profile_error(tmp_path_factory, which, key, value, drop):
    base = (device() if which == "device" else importance()).to_dict()
    target = key if key in base and not drop else (next(iter(base)) if drop else key)
    if drop:
        base.pop(target, None)
    else:
        base[target] = value
    path = tmp_path_factory.mktemp("f") / "p.json"
    path.write_text(json.dumps(base))
    try:
        load_profile(path)
    except ProfileError:
        pass


def test_compute_fit_recovers_a_known_model():
    coef = (0.2, 0.01, 0.003, 2e-5, 0.05)
    pts = [(m, L, coef[0] + coef[1] * L + coef[2] * m * L + coef[3] * m * L * L + coef[4] * m)
           for m in (1, 3, 6, 12) for L in (8, 16, 32, 64, 128)]
    got, err = fit_compute(pts)
    assert err < 1e-6 and all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-9) for a, b in zip(got, coef))


def test_measure_device_on_a_tiny_store(tiny_weights, tmp_path):
    path = build_store(tiny_weights, tmp_path / "s", bits=(2, 4, 32), tokenizer_from=word_tokenizer(tmp_path / "t"))
    p = measure_device(path, storage="emulate:50MB/s", seq_len=16, samples=6, repeat=3)
    assert p.storage.startswith("emulate:50MB/s") and set(p.bits) == {2, 4, 32}
    for b in p.bits:  # the emulated reader's bandwidth shows in the read times (within 10%)
        assert p.shard_read_ms[b] >= 0.9 * p.shard_bytes[b] / 50e6 * 1e3
    assert p.shard_bytes[2] < p.shard_bytes[4] < p.shard_bytes[32]
    warm = measure_device(path, storage="warm", seq_len=16, samples=6, repeat=3, compute_from=p)
    assert warm.compute_coef == p.compute_coef and warm.shard_read_ms[32] < p.shard_read_ms[32]
    with pytest.raises(Cancelled):
        measure_device(path, storage="warm", samples=2, repeat=1, progress=lambda d, t: False)
    assert p.io_under_load and not measure_device(path, "warm", 16, samples=2, repeat=1, under_load=False).io_under_load
    assert DeviceProfile.from_dict(json.loads(json.dumps(p.to_dict()))).io_under_load


def test_background_load_runs_beside_a_measurement_and_stops(tiny_weights, tmp_path):
    path = build_store(tiny_weights, tmp_path / "s", bits=(2, 32), tokenizer_from=word_tokenizer(tmp_path / "t"))
    calls, seen = [], []
    with Store(path) as store:
        load = Background(lambda: calls.append(threading.current_thread().name) or time.sleep(1e-4))
        sizes, _, _ = measure_io(store, 4, load)
        assert set(sizes) == {2, 32} and calls and set(calls) == {"sti-profile-load"}
        assert not load._thread.is_alive()
        count = len(calls)
        time.sleep(0.01)
        assert len(calls) == count  # stopped with the measurement
        for make in (lambda: compute_load(store, 8, "float32"), lambda: io_load(store, "bfloat16")):
            with make() as bg:  # the real loads run the real work without error
                time.sleep(0.05)
                seen.append(bg._thread.is_alive())
    assert seen == [True, True]
    with pytest.raises(ZeroDivisionError), Background(lambda: 1 / 0):
        time.sleep(0.01)  # a failing load is not swallowed


@pytest.mark.parametrize("r", [1, 2, 5])
def test_embedding_read_model_for_padded_requests(r):
    d = device(embed_ms=(0.5, 0.1))
    for n in (1, 7, 48, 128):  # unpadded: every token distinct, as profiled
        assert d.embed_rows_ms(n, n, r) == pytest.approx(d.embed_read_ms(n))
        assert d.embed_tokens(n, n, r) == n
    for width, distinct in ((128, 20), (128, 48), (64, 3)):
        e = d.embed_tokens(width, distinct, r)
        assert distinct <= e <= width  # fewer rows than the padded width, never fewer than read
        assert d.embed_read_ms(e) >= d.embed_rows_ms(width, distinct, r) - 1e-9
        assert d.embed_read_ms(e - 1) < d.embed_rows_ms(width, distinct, r)


def test_the_default_importance_profile_is_the_best_saved_else_the_cheap_one(tiny_weights, tmp_path, monkeypatch):
    # the demo's first run measures the cheap gradient profile; a saved degrade profile (the
    # paper's method) wins whenever there is one; an explicit method is always that method
    import dataclasses
    import sti.profile_importance as pi
    from sti import api
    from tests.test_runtime import profiles
    store = build_store(tiny_weights, tmp_path / "store", bits=(2, 32), tokenizer_from=word_tokenizer(tmp_path / "t"))
    with Store(store) as s:
        _, degrade = profiles(s)
    gradient = dataclasses.replace(degrade, method="gradient", kl_to_acc=0.25)
    measured = []
    monkeypatch.setattr(pi, "measure_importance", lambda path, method: measured.append(method) or gradient)
    assert api.importance_profile(store, log=lambda *a: None) == gradient and measured == ["gradient"]
    assert api.importance_profile(store) == gradient and measured == ["gradient"]  # saved, not measured again
    save_profile(degrade, api.importance_profile_path(store, "degrade"))
    assert api.importance_profile(store) == degrade
    assert api.importance_profile(store, "gradient") == gradient
    api.importance_profile_path(store, "degrade").unlink()
    api.importance_profile_path(store, "gradient").unlink()
    with pytest.raises(ProfileError, match="no profile"):
        api.importance_profile(store, measure=False)
