"""Following the device (runtime/follow.py): the drift estimate's band and hysteresis with
injected paces, no replan storm under noise, plans swapped only between requests, and
new targets (resize) while callers keep sending requests."""

import dataclasses
import random
import threading

import pytest
import torch

from sti.errors import InputError
from sti.planning import PlanError, PlanSet, make_plan, make_plan_set
from sti.planning.lengths import plan_set_around
from sti.runtime import Engine
from sti.runtime.follow import Band, Follower, rescaled
from sti.store import Store
from tests.test_runtime import TEXTS, profiles, tiny_store  # noqa: F401 (a fixture)

BAND = Band()  # the default: 7%, a window of 15, patience 4


def feed(follower, levels):
    """Feed a compute lane running at `levels` (x the original profile) to the follower;
    each replan scales the profile by the drift it reports, so the paces measured after it
    are against the new profile. Returns (request index, drift) of each replan."""
    fired, scale = [], 1.0
    for i, level in enumerate(levels):
        drift = follower.add({"compute": level / scale, "read": None, "embed": None})
        if drift is not None:
            fired.append((i, drift))
            scale *= drift["compute"]
            follower.replanned(drift)
    return fired


def noisy(rng, level, n, amp):
    return [level * (1.0 + rng.uniform(-amp, amp)) for _ in range(n)]


def test_noise_and_single_outliers_never_replan():
    rng = random.Random(0)
    for amp in (0.03, 0.12, 0.2):   # each request off by up to 20%: the running median far less
        levels = noisy(rng, 1.0, 600, amp)
        levels[300] = levels[301] = 10.0  # a GC pause, a page fault
        assert feed(Follower(BAND), levels) == [], amp


def test_a_lasting_change_replans_within_a_window_and_its_correction_holds():
    rng = random.Random(1)
    fired = feed(Follower(BAND), noisy(rng, 1.0, 60, 0.05) + noisy(rng, 1.4, 300, 0.05))
    assert len(fired) == 1, fired
    at, drift = fired[0]
    assert 60 < at <= 60 + BAND.window // 2 + BAND.patience + 2  # a few requests after the change
    assert set(drift) == {"compute"} and drift["compute"] == pytest.approx(1.4, rel=0.06)


def test_recovery_plans_back_down():
    rng = random.Random(2)
    fired = feed(Follower(BAND), noisy(rng, 1.0, 40, 0.03) + noisy(rng, 1.5, 60, 0.03) + noisy(rng, 1.0, 60, 0.03))
    assert len(fired) == 2, fired
    (_, up), (_, down) = fired
    assert up["compute"] > 1.3 and down["compute"] < 0.8
    assert up["compute"] * down["compute"] == pytest.approx(1.0, rel=0.05)  # back where it started


def test_the_baseline_is_the_first_window_and_lanes_without_data_stay_out():
    f = Follower(BAND)
    for _ in range(2 * BAND.window):
        assert f.add({"compute": None, "read": 2.0, "embed": float("nan")}) is None
    assert f.baseline == {"read": 2.0} and f.drift() == {}  # the running window starts empty
    with pytest.raises(ValueError):
        Band(width=0.0)


def test_rescaled_scales_only_the_drifted_lanes(tiny_store):
    _, path = tiny_store
    with Store(path) as s:
        device, _ = profiles(s)
    d = rescaled(device, {"compute": 2.0})
    assert d.compute_coef == tuple(2 * c for c in device.compute_coef) and d.head_ms == 2 * device.head_ms
    assert d.shard_read_ms == device.shard_read_ms and d.embed_ms == device.embed_ms
    r = rescaled(device, {"read": 3.0, "embed": 0.5})
    assert r.shard_read_ms == {b: 3 * v for b, v in device.shard_read_ms.items()}
    assert r.embed_ms == tuple(0.5 * v for v in device.embed_ms) and r.compute_coef == device.compute_coef


def test_plans_around_a_kept_buffer_keep_it_and_meet_t_on_the_new_device(tiny_store):
    _, path = tiny_store
    with Store(path) as s:
        device, importance = profiles(s, read_ms=0.5, compute_ms=0.2)
        kept = make_plan_set(device, importance, s.store_id, 4.0, 20000, [3, 5, 9, 12, 14], 16, headroom=0.1)
    assert kept.buffer, "the case needs a preload buffer"
    slow, fast = rescaled(device, {"read": 1.5}), rescaled(device, {"read": 0.7})
    got = {name: plan_set_around(kept, d, importance, 0.1) for name, d in (("slow", slow), ("fast", fast))}
    for s in got.values():
        assert s.buffer == kept.buffer and s.rows == kept.rows and len(s.buckets) == len(kept.buckets)
        assert all(p.predicted.latency_ms <= 0.9 * 4.0 + 1e-9 for p in s.plans)
        assert all(set(p.choice.preload) <= set(kept.buffer) for p in s.plans)
    assert got["fast"].expected_accuracy >= got["slow"].expected_accuracy  # faster storage: never worse


def test_a_drifted_replan_takes_a_new_buffer_only_when_it_buys_accuracy(tiny_store):
    # around the kept buffer unless plans choosing the buffer afresh (around the same rows)
    # are predicted better by more than `gain`; both meet T on the drifted device
    from sti.planning.rows import plans_with, replan_drifted
    from sti.rowcache import RowCache
    _, path = tiny_store
    with Store(path) as s:
        device, importance = profiles(s, read_ms=0.2, compute_ms=0.2)
        tokens = [list(range(4, 4 + n)) for n in (3, 5, 9, 12, 14)]
        hidden, per_block = s.config.hidden_size, s.tables["position"][1]
        kept = plans_with(RowCache(hidden=hidden), device, importance, s.store_id, 2.0, 40000, tokens, 16, per_block,
                          headroom=0.1)
    assert kept.buffer and kept.rows is None, "the case needs a preload buffer"
    slow = rescaled(device, {"read": 3.0})
    near = plan_set_around(kept, slow, importance, 0.1)
    never = replan_drifted(kept, slow, importance, tokens, per_block, hidden, 0.1, gain=1.0)
    always = replan_drifted(kept, slow, importance, tokens, per_block, hidden, 0.1, gain=-1.0)
    assert never.buffer == kept.buffer and never.expected_accuracy == pytest.approx(near.expected_accuracy)
    assert always.buffer != kept.buffer, "a slower storage must change the best buffer, or this proves nothing"
    assert always.expected_accuracy > near.expected_accuracy + 0.01
    chosen = replan_drifted(kept, slow, importance, tokens, per_block, hidden, 0.1)
    assert chosen.buffer == always.buffer   # the gain is well above the default 0.2 points here
    for got in (never, always, chosen):
        assert got.rows == kept.rows and all(p.predicted.latency_ms <= 0.9 * 2.0 + 1e-9 for p in got.plans)


class Replans:
    """A replan function for the tiny store: plans as the api's would (single plans at 16
    tokens), and counts its calls."""

    def __init__(self, store, importance):
        self.store_id, self.importance, self.calls, self.new_buffer = store.store_id, importance, [], []

    def __call__(self, device, latency_ms, memory_mb, kept=None, new_buffer=False):
        self.calls.append((device, latency_ms, memory_mb, kept))
        self.new_buffer.append(new_buffer)
        if kept is not None:
            return plan_set_around(kept, device, self.importance)
        return PlanSet.single(make_plan(device, self.importance, self.store_id, latency_ms, int(memory_mb * 1e6),
                                        seq_len=16))


def test_a_drifted_engine_replans_off_the_request_and_swaps_between_requests(tiny_store, monkeypatch):
    import sti.runtime.engine as rt
    _, path = tiny_store
    store = Store(path, "warm")
    device, importance = profiles(store)
    plan = make_plan(device, importance, store.store_id, 50.0, 0, seq_len=16)
    replans = Replans(store, importance)
    # injected: the compute lane runs 2x slower than profiled from the 40th request on
    levels = iter([1.0] * 40 + [2.0] * 100)
    monkeypatch.setattr(rt, "request_paces", lambda report, dev, *a: {
        "compute": next(levels) * device.compute_coef[0] / dev.compute_coef[0], "read": None, "embed": None})
    with Engine(store, plan, device, storage="warm", replan=replans, follow=BAND) as engine:
        reports, usual = [], []
        for i in range(80):
            reports.append(engine.run(TEXTS[i % len(TEXTS)]).report)
            usual.append(engine.positions)
        assert len(replans.calls) == 1 and len(engine.history) == 1
        new_device, latency, memory, kept = replans.calls[0]
        assert kept is not None and latency == 50.0 and memory == 0
        assert replans.new_buffer == [False]   # a compute drift keeps the buffer; only the storage's may not
        assert new_device.compute_coef == tuple(2 * c for c in device.compute_coef)
        swapped = [i for i, r in enumerate(reports) if r.replanned is not None]
        assert len(swapped) == 1 and 40 < swapped[0] <= 40 + 20  # within 20 requests of the change
        assert engine.device == new_device and engine.history[0]["kind"] == "drift"
        assert engine.history[0]["drift"] == {"compute": 2.0}
        # the usual compute paces were against the old profile: the new one starts afresh
        assert [k for k in range(1, 80) if usual[k] is not usual[k - 1]] == [swapped[0]]
        # the request after the swap answers exactly as a fresh engine with the new plans
        got = engine.run(TEXTS[1])
    with Engine(Store(path, "warm"), engine.plans, new_device, storage="warm") as fresh:
        assert torch.equal(fresh.run(TEXTS[1]).logits, got.logits)


def test_an_engine_without_a_planner_cannot_follow_or_resize(tiny_store):
    _, path = tiny_store
    store = Store(path, "warm")
    device, importance = profiles(store)
    plan = make_plan(device, importance, store.store_id, 50.0, 0, seq_len=16)
    with pytest.raises(InputError, match="plan again"):
        Engine(store, plan, device, follow=True)
    with Engine(store, plan, device) as engine, pytest.raises(InputError, match="cannot plan again"):
        engine.resize(1.0)


def test_resize_under_concurrent_callers_loses_no_request(tiny_store):
    _, path = tiny_store
    store = Store(path, "warm")
    device, importance = profiles(store, read_ms=0.2)
    big = int(2 * store.shard_record(0, 0, 32).length * store.config.num_shards * store.config.num_layers)
    plan = make_plan(device, importance, store.store_id, 50.0, big, seq_len=16)
    assert plan.choice.preload, "the case needs a preload buffer to shrink"
    engine = Engine(store, plan, device, storage="warm", replan=Replans(store, importance))
    errors, done = [], []

    def caller(k):
        try:
            for i in range(100):
                done.append(engine.run(TEXTS[(k + i) % len(TEXTS)]).label)
        except BaseException as exc:  # noqa: BLE001 (the test reports every failure)
            errors.append(exc)
    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    sizes = [0.0, big / 1e6 / 4, big / 1e6]
    usual = engine.positions   # a new M on the same device keeps the usual compute paces
    entries = [engine.resize(mb) for mb in sizes]
    for t in threads:
        t.join()
    assert not errors and len(done) == 8 * 100
    assert engine.positions is usual and len(usual.recent) == usual.recent.maxlen
    assert [e["new"]["memory_bytes"] for e in entries] == [int(mb * 1e6) for mb in sizes]
    engine.resize(sizes[1])
    small = engine.plans
    assert engine.preload_bytes <= int(sizes[1] * 1e6) and engine.bytes.now == engine.resident_bytes
    got = engine.run(TEXTS[3])
    assert got.report.peak_model_bytes <= engine.resident_bytes + engine.window.limit
    engine.close()
    with Engine(Store(path, "warm"), small, device, storage="warm") as fresh:
        assert torch.equal(fresh.run(TEXTS[3]).logits, got.logits)
        assert fresh.resident_bytes == engine.resident_bytes


def test_an_absolute_band_corrects_a_profile_that_was_off_from_the_start():
    rng = random.Random(3)
    levels = noisy(rng, 0.8, 200, 0.03)   # the profile was 25% pessimistic all along
    assert feed(Follower(Band(absolute=())), levels) == []  # against the first requests: nothing changed
    fired = feed(Follower(BAND), levels)   # compute is judged against the profile by default
    assert len(fired) == 1 and fired[0][1]["compute"] == pytest.approx(0.8, rel=0.03)
    assert fired[0][0] < 2 * BAND.window + BAND.window + BAND.patience


def test_memory_pressure_reads_psi_and_cgroup_events(tmp_path):
    from sti.runtime.pressure import MemoryPressure
    psi, events = tmp_path / "memory", tmp_path / "memory.events"
    psi.write_text("some avg10=25.50 avg60=3.00 avg300=1.00 total=99\nfull avg10=1.00 avg60=0 avg300=0 total=9\n")
    assert MemoryPressure(psi, tmp_path / "none").pressed() is True
    psi.write_text("some avg10=0.00 avg60=30.00 avg300=1.00 total=99\n")  # pressed a minute ago, not now
    assert MemoryPressure(psi, tmp_path / "none").pressed() is False
    assert MemoryPressure(tmp_path / "none", tmp_path / "none").pressed() is None  # the system tells neither
    events.write_text("low 0\nhigh 3\nmax 0\noom 0\n")
    p = MemoryPressure(tmp_path / "none", events)
    assert p.pressed() is False
    events.write_text("low 0\nhigh 5\nmax 0\noom 0\n")
    assert p.pressed() is True and p.pressed() is False  # throttled since the last look, then not


def test_memory_pressure_polls_at_most_once_a_period_and_grows_after_calm(tmp_path):
    from sti.runtime.pressure import MemoryPressure
    psi, t = tmp_path / "memory", [0.0]
    psi.write_text("some avg10=50.00 avg60=0 avg300=0 total=1\n")
    p = MemoryPressure(psi, tmp_path / "none", poll_s=1.0, calm_s=10.0, clock=lambda: t[0])
    assert p.poll() == "shrink" and p.poll() is None   # the same second: not read again
    psi.write_text("some avg10=0.00 avg60=0 avg300=0 total=1\n")
    got = []
    for step in range(1, 25):
        t[0] = float(step)
        got.append(p.poll())
    assert got.count("grow") == 2 and got[9] == "grow" and got[19] == "grow" and set(got) <= {None, "grow"}


class Scripted:
    """A memory pressure source whose polls say what the test says."""

    def __init__(self, actions):
        self.actions = iter(actions)

    def poll(self):
        return next(self.actions, None)


def test_pressure_shrinks_the_buffer_between_requests_and_grows_it_back_to_the_budget(tiny_store):
    _, path = tiny_store
    store = Store(path, "warm")
    device, importance = profiles(store, read_ms=0.2)
    big = int(store.shard_record(0, 0, 32).length * store.config.num_shards * store.config.num_layers)
    plan = make_plan(device, importance, store.store_id, 50.0, big, seq_len=16)
    actions = [None, "shrink", None, None, "shrink", None, None, "grow", None, None, "grow", None, None, "grow"]
    with Engine(store, plan, device, storage="warm", replan=Replans(store, importance),
                memory_pressure=Scripted(actions)) as engine:
        budgets = []
        for i in range(len(actions) + 3):
            engine.run(TEXTS[i % len(TEXTS)])
            budgets.append(engine.plans.first.request.memory_bytes)
            assert engine.preload_bytes <= budgets[-1] and engine.bytes.now == engine.resident_bytes
        kinds = {e["kind"] for e in engine.history}
    halvings = sorted(set(budgets), reverse=True)
    assert halvings[0] == big and kinds == {"memory pressure"}
    assert big // 4 - 1 <= min(budgets) <= big // 4 + 1          # halved twice
    assert budgets[-1] == big and max(budgets) == big             # grown back, never past the budget
    assert len(engine.history) == 4                               # the third grow had nothing to do


def test_pressure_never_shrinks_below_what_meets_t(tiny_store):
    _, path = tiny_store
    store = Store(path, "warm")
    device, importance = profiles(store, read_ms=500.0)   # slow storage: T needs a preload buffer
    big = int(store.shard_record(0, 0, 32).length * store.config.num_shards * store.config.num_layers)
    plan = make_plan(device, importance, store.store_id, 20.0, big, seq_len=16)
    with Engine(store, plan, device, storage="warm", replan=Replans(store, importance),
                memory_pressure=Scripted(["shrink"] * 30)) as engine:
        for i in range(30):
            engine.run(TEXTS[i % len(TEXTS)])
        least = engine.plans.first.request.memory_bytes
        with pytest.raises(PlanError):
            make_plan(device, importance, store.store_id, 20.0, least - 1, seq_len=16)
    assert 0 < least < big
    assert len([e for e in engine.history if "error" in e]) <= 1   # refused once, then not asked again
