"""Calibration on the engine: the corrected profile's arithmetic, the timeline's first-layer
cost, and that a profile far off the engine comes back close to what the engine measures."""

from __future__ import annotations

import dataclasses
import statistics

import pytest

from sti.calibrate import Calibration, corrected, measure
from sti.planning import make_plan, simulate
from sti.profiles import DeviceProfile, load_profile, profile_id, save_profile
from sti.runtime import Engine
from sti.store import Store
from tests.test_planner import HAND_DEV, HAND_IMP, STORE
from tests.test_runtime import TEXTS, profiles, tiny_store  # noqa: F401 (fixture)


def test_corrected_scales_compute_and_records_how(tmp_path):
    cal = Calibration(compute_scale=1.5, first_layer_ms=0.4, requests=7)
    dev = corrected(HAND_DEV, cal)
    assert dev.compute_ms(2, 1) == pytest.approx(1.5 * HAND_DEV.compute_ms(2, 1))
    assert dev.first_layer_ms == 0.4 and dev.calibrated["raw_profile"] == profile_id(HAND_DEV)
    assert dev.calibrated["requests"] == 7 and profile_id(dev) != profile_id(HAND_DEV)
    path = save_profile(dev, tmp_path / "d.json")
    assert load_profile(path) == dev                         # the new fields round-trip


def test_the_first_layer_cost_is_in_the_timeline_and_the_plan():
    dev = dataclasses.replace(HAND_DEV, first_layer_ms=7.0)
    base = simulate((0, 1), 1, ((2,), (2,)), [(0, 0, 2)], HAND_DEV, 1)
    more = simulate((0, 1), 1, ((2,), (2,)), [(0, 0, 2)], dev, 1)
    assert more[0].compute_ms == base[0].compute_ms + 7.0 and more[1].compute_ms == base[1].compute_ms
    assert more[0].compute_end == base[0].compute_end + 7.0
    # layer 1's IO (10 ms from 5) is due 7 ms later: its slack grows by as much
    assert more[1].slack == base[1].slack + 7.0
    for planner in ("paper", "joint"):
        plan = make_plan(dev, HAND_IMP, STORE, 200.0, 250, planner=planner)
        assert plan.predicted.latency_ms <= 200.0
        assert plan.predicted.timeline[0].compute_ms == dev.compute_ms(plan.choice.m, 1) + 7.0


def test_the_requests_setup_delays_both_lanes_in_the_timeline_and_the_plan():
    """A request's setup (tokenizing, its report, starting its lanes) is on its clock before
    either lane starts: the whole timeline moves by it, and plans fit T with it counted."""
    dev = dataclasses.replace(HAND_DEV, setup_ms=3.0)
    base = simulate((0, 1), 1, ((2,), (2,)), [(0, 0, 2)], HAND_DEV, 1)
    later = simulate((0, 1), 1, ((2,), (2,)), [(0, 0, 2)], dev, 1)
    shift = lambda t, d: (t.io_start + d, t.io_end + d, t.compute_start + d, t.compute_end + d, t.stall, t.slack)  # noqa: E731
    assert [shift(t, 3.0) for t in base] == [shift(t, 0.0) for t in later]
    assert simulate((0, 1), 1, ((2,), (2,)), [(0, 0, 2)], dev, 1, setup_ms=0.0) == base
    for planner in ("paper", "joint"):
        plan = make_plan(dev, HAND_IMP, STORE, 200.0, 250, planner=planner)
        assert plan.predicted.latency_ms <= 200.0
        assert plan.predicted.embed_ms == pytest.approx(3.0 + HAND_DEV.embed_read_ms(1))
        assert plan.predicted.timeline[0].io_start == pytest.approx(3.0 + HAND_DEV.embed_read_ms(1))
        same = make_plan(HAND_DEV, HAND_IMP, STORE, 200.0, 250, planner=planner)
        assert same.choice == plan.choice   # (T leaves room for the setup: the same plan, 3 ms later)
        assert plan.predicted.latency_ms == pytest.approx(same.predicted.latency_ms + 3.0)
        # a T this plan met only without the setup: with it, a different plan or none
        tight = same.predicted.latency_ms + 1.0
        got = _plan_or_none(dev, tight, planner)
        assert got is None or (got.choice != same.choice and got.predicted.latency_ms <= tight)


def _plan_or_none(dev, target, planner):
    from sti.planning import PlanError
    try:
        return make_plan(dev, HAND_IMP, STORE, target, 250, planner=planner)
    except PlanError:
        return None


def test_a_profile_far_off_the_engine_is_corrected_towards_it(tiny_store):
    _, path = tiny_store
    store = Store(path, "warm")
    device, importance = profiles(store, compute_ms=0.0005)     # claims near-free compute
    plan = make_plan(device, importance, store.store_id, 1e4, 10**8, seq_len=16)
    with Engine(store, plan, device, storage="warm") as engine:
        engine.run(TEXTS[0])
        cal = measure(engine, TEXTS * 4)
        assert engine.guard                                        # given back
        busy = [r.layers[k].end_ms - r.layers[k].start_ms - r.layers[k].stall_ms
                for r in (engine.run(t).report for t in TEXTS) for k in range(1, 3)]
    fixed = corrected(device, cal)
    assert cal.requests == len(TEXTS * 4) and cal.compute_scale > 5     # the engine is far slower
    # the corrected profile predicts the later layers' busy time within 3x, the raw one not within
    # 5x (the calibration and the requests after it are timed at different moments: on a loaded
    # 2-core machine 2x was seen at 2.05)
    ratio = statistics.median(busy) / fixed.compute_ms(plan.choice.m, 16)
    assert 1 / 3 < ratio < 3.0
    assert statistics.median(busy) / device.compute_ms(plan.choice.m, 16) > 5


def test_corrected_scales_the_io_lane_and_the_embedding_read():
    cal = Calibration(compute_scale=1.0, first_layer_ms=0.0, requests=3, io_scale=2.0, embed_scale=1.5)
    dev = corrected(HAND_DEV, cal)
    assert all(dev.io_ms(b) == pytest.approx(2.0 * HAND_DEV.io_ms(b)) for b in HAND_DEV.bits)
    assert dev.embed_read_ms(20) == pytest.approx(1.5 * HAND_DEV.embed_read_ms(20))
    assert dev.calibrated["io_scale"] == 2.0 and dev.calibrated["embed_scale"] == 1.5


def test_storage_slower_than_profiled_is_measured_on_the_engine(tiny_store):
    from tests.test_runtime import SlowReader
    _, path = tiny_store
    store = Store(path, "warm", reader=SlowReader(path / "store.bin", 0.002))   # 2 ms a read
    device, importance = profiles(store, read_ms=0.3)           # claims 0.3 ms for an fp32 shard
    plan = make_plan(device, importance, store.store_id, 1e4, 0, seq_len=16)  # nothing preloaded
    with Engine(store, plan, device, storage="warm") as engine:
        engine.run(TEXTS[0])
        cal = measure(engine, TEXTS * 3)
    assert cal.io_scale >= 4.0 and cal.embed_scale >= 4.0    # (bounded at 5: the profile is far off)
    with Engine(Store(path, "warm"), plan, device, storage="warm") as engine:
        engine.run(TEXTS[0])
        fair = measure(engine, TEXTS * 3)
    assert fair.io_scale < cal.io_scale


def test_a_slow_compute_lane_is_not_taken_for_slow_storage(tiny_store, monkeypatch):
    """The decoder waits for the compute lane to free a group; those waits are the compute
    lane's pace, not the storage's, and must not inflate the IO scale (they did: the plans
    then streamed too little)."""
    import time
    from sti.groups import ShardGroup
    from tests.test_runtime import SlowReader
    _, path = tiny_store

    def io_scale() -> tuple[float, float]:
        store = Store(path, "warm", reader=SlowReader(path / "store.bin", 0.001))   # 1 ms a read
        device, importance = profiles(store, read_ms=1.0)                           # as profiled
        plan = make_plan(device, importance, store.store_id, 1e4, 0, seq_len=16)  # nothing preloaded
        with Engine(store, plan, device, storage="warm") as engine:
            engine.run(TEXTS[0])
            reports = [engine.run(t).report for t in TEXTS]
            cal = measure(engine, TEXTS * 3)
        return cal.io_scale, statistics.median(sum(lr.group_wait_ms for lr in r.layers) for r in reports)

    fair, fair_wait = io_scale()
    compute = ShardGroup.accumulate

    def slow(self, *args, **kw):
        time.sleep(0.004)   # 4 ms a group: the decoder soon has no free group to fill
        return compute(self, *args, **kw)

    monkeypatch.setattr(ShardGroup, "accumulate", slow)
    slowed, slowed_wait = io_scale()
    assert slowed_wait > fair_wait + 5.0          # the decoder did wait for groups
    assert slowed < 1.3 * fair + 0.1, (slowed, fair)


def test_a_slow_setup_is_measured_as_setup_not_as_slow_storage(tiny_store, monkeypatch):
    """Tokenizing is on the request's clock before the lanes start: calibration measures it
    as the request's setup (which the corrected profile carries, so plans count it), and
    the IO lane's pace is measured from where its lane started, not inflated by it."""
    import time
    from sti.tokenizer import Tokenizer
    from tests.test_runtime import SlowReader
    _, path = tiny_store

    def calibrate():
        store = Store(path, "warm", reader=SlowReader(path / "store.bin", 0.001))   # 1 ms a read
        device, importance = profiles(store, read_ms=1.0)                           # as profiled
        plan = make_plan(device, importance, store.store_id, 1e4, 0, seq_len=16)  # nothing preloaded
        with Engine(store, plan, device, storage="warm") as engine:
            engine.run(TEXTS[0])
            return measure(engine, TEXTS * 3), engine.device

    fair, device = calibrate()
    encode = Tokenizer.encode

    def slow(self, *args, **kw):
        time.sleep(0.006)   # 6 ms to tokenize
        return encode(self, *args, **kw)

    monkeypatch.setattr(Tokenizer, "encode", slow)
    slowed, _ = calibrate()
    assert slowed.setup_ms >= 6.0 > fair.setup_ms >= 0.0
    assert slowed.io_scale < 1.3 * fair.io_scale + 0.1, (slowed, fair)
    dev = corrected(device, slowed)
    assert dev.setup_ms == slowed.setup_ms and dev.calibrated["setup_ms"] == slowed.setup_ms


def test_the_time_after_the_last_layer_is_measured_into_the_head(tiny_store, monkeypatch):
    """What a request costs after its last layer (the head, the answer) is on its clock:
    calibration measures it, and the corrected head is at least that long."""
    import time
    from sti.runtime import engine as engine_module
    _, path = tiny_store
    store = Store(path, "warm")
    device, importance = profiles(store)
    plan = make_plan(device, importance, store.store_id, 1e4, 0, seq_len=16)
    head = engine_module.head_logits

    def slow_head(*args, **kw):
        time.sleep(0.005)
        return head(*args, **kw)
    monkeypatch.setattr(engine_module, "head_logits", slow_head)
    with Engine(store, plan, device, storage="warm") as engine:
        engine.run(TEXTS[0])
        cal = measure(engine, TEXTS * 3)
    assert cal.tail_ms >= 5.0 and cal.embed_step_ms >= 0.0
    assert corrected(device, cal).head_ms == cal.tail_ms + cal.embed_step_ms > device.head_ms
    assert corrected(device, dataclasses.replace(cal, tail_ms=0.0, embed_step_ms=0.0)).head_ms == device.head_ms
