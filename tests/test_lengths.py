"""Length-aware plans: every bucket's plan meets T at its length (re-simulated here), shares
the one buffer, does at least as well over the distribution as one plan for the longest
length, round-trips through JSON and is refused when malformed; the engine runs each
request with the plan of its length."""

from __future__ import annotations

import json

import pytest
from hypothesis import given

from sti.planning import Plan, PlanError, PlanSet, explain_set, make_plan, make_plan_set
from sti.planning.lengths import bucket_bounds, weights
from sti.runtime import Engine
from sti.store import Store
from tests.test_planner import SETTINGS, STORE, check_plan, device, importance, problems
from tests.test_runtime import TEXTS, profiles, reference_logits, tiny_store  # noqa: F401 (fixture)


def plan_set_or_none(dev, imp, T, M, fixed, lengths, max_tokens):
    try:
        return make_plan_set(dev, imp, STORE, T, M, lengths, max_tokens, fixed_bytes=fixed)
    except PlanError as exc:
        assert "smallest feasible" in str(exc) or "no T is feasible" in str(exc)
        return None


LENGTHS = [1, 3, 5, 8, 9, 12, 16, 17, 20, 24]


@SETTINGS
@given(problems())
def test_every_bucket_plan_meets_T_at_its_length_within_the_one_buffer(prob):
    dev, imp, T, M, fixed = prob
    s = plan_set_or_none(dev, imp, T, M, fixed, LENGTHS, 24)
    if s is None:
        return
    assert [b.max_tokens for b in s.buckets] == [8, 16, 24]
    buffer = {(layer, shard): bits for layer, shard, bits in s.buffer}
    assert sum(dev.shard_bytes[b] for b in buffer.values()) + fixed <= M + 1e-6
    for b in s.buckets:
        if b.plan is None:
            continue
        assert b.plan.request.seq_len == b.max_tokens and b.plan.request.target_ms == T
        check_plan(b.plan, dev, imp, T, M, fixed, stalls_anywhere=True)
        assert all(buffer[(layer, shard)] == bits for layer, shard, bits in b.plan.choice.preload)
        # a shard of the plan that the buffer holds is used from it, at the bitwidth held
        c = b.plan.choice
        assert all((layer, j) not in buffer or (layer, j, row[j]) in c.preload
                   for layer, row in zip(c.layers, c.bits) for j in range(c.m))
    assert PlanSet.from_json(s.to_json()) == s
    explain_set(s)


@SETTINGS
@given(problems())
def test_the_set_does_at_least_as_well_as_one_plan_for_the_longest_length(prob):
    """One plan for 24 tokens also meets T at every shorter length (compute and the
    embedding read only shrink), and its buffer is among those the set weighs."""
    dev, imp, T, M, fixed = prob
    try:
        single = make_plan(dev, imp, STORE, T, M, seq_len=24, fixed_bytes=fixed)
    except PlanError:
        return
    s = make_plan_set(dev, imp, STORE, T, M, LENGTHS, 24, fixed_bytes=fixed)
    assert s.covered == 1.0
    assert s.expected_accuracy >= single.predicted.accuracy - 1e-9


def test_short_requests_get_more_of_the_model_than_long_ones():
    # compute grows with length (2 ms a shard per token): at 8 tokens the whole 3 x 2 model
    # fits T, at 24 it does not
    dev = device(coef=(0.0, 0.0, 2.0, 0.0), embed=(1.0, 0.0), head=1.0, read={2: 1.0, 32: 2.0},
                 decode={2: 0.0, 32: 0.0})
    imp = importance([[0.4, 0.1], [0.3, 0.2], [0.25, 0.05]], {"3,2": 0.90, "2,2": 0.86, "3,1": 0.80, "2,1": 0.7})
    s = make_plan_set(dev, imp, STORE, 110.0, 10**6, [8] * 3 + [24], 24)
    short, long = s.plan_for(8), s.plan_for(24)
    assert (short.choice.n, short.choice.m) == (3, 2) and short.predicted.latency_ms <= 110.0
    assert (long.choice.n, long.choice.m) != (3, 2)        # 3 * 2 * 2 * 24 = 288 ms of compute alone
    assert s.expected_accuracy == pytest.approx(0.75 * short.predicted.accuracy + 0.25 * long.predicted.accuracy)


def test_buckets_and_weights():
    assert bucket_bounds(20) == [8, 16, 20] and bucket_bounds(16) == [8, 16] and bucket_bounds(5) == [5]
    assert weights([1, 8, 9, 30], [8, 16, 20]) == [0.5, 0.25, 0.25]   # longer than the last: the last
    with pytest.raises(PlanError, match="empty"):
        weights([], [8])


def test_a_bucket_without_a_plan_runs_the_nearest_shorter_one():
    dev = device(coef=(0.0, 0.0, 2.0, 0.0), embed=(1.0, 0.0), head=1.0)
    imp = importance([[0.4, 0.1], [0.3, 0.2]], {"2,2": 0.9, "1,1": 0.6})
    s = make_plan_set(dev, imp, STORE, 40.0, 10**6, [4, 20], 24)
    assert [b.plan is not None for b in s.buckets] == [True, False, False]   # 1 layer x 1 shard x 16 tokens > 40 ms
    assert s.plan_for(20) is s.plan_for(8) is s.buckets[0].plan and s.plan_for(500) is s.buckets[0].plan
    assert s.covered == 0.5
    assert "none fits" in explain_set(s)
    with pytest.raises(PlanError, match="positive number of tokens"):
        explain_set(s, 0)
    with pytest.raises(PlanError, match="smallest feasible"):   # not even the shortest length: refused
        make_plan_set(dev, imp, STORE, 1.0, 10**6, [4, 20], 24)


def good_set() -> PlanSet:
    dev = device(coef=(0.0, 0.0, 2.0, 0.0), embed=(1.0, 0.0), head=1.0, read={2: 1.0, 32: 2.0},
                 decode={2: 0.0, 32: 0.0})
    imp = importance([[0.4, 0.1], [0.3, 0.2], [0.25, 0.05]], {"3,2": 0.90, "2,2": 0.86, "3,1": 0.80, "2,1": 0.7})
    return make_plan_set(dev, imp, STORE, 110.0, 10**4, [8, 16, 24], 24)


def test_plan_set_files_are_validated():
    s = good_set()
    d = json.loads(s.to_json())
    assert PlanSet.from_dict(json.loads(s.to_json())) == s
    bad = []
    bad.append({**d, "version": 99})
    bad.append({**d, "kind": "plan"})
    bad.append({**d, "buckets": d["buckets"][::-1]})                                # lengths must increase
    assert any(b["plan"]["choice"]["preload"] for b in d["buckets"])                   # the buffer is used
    bad.append({**d, "buffer": []})                                                   # preloads what it lacks
    bad.append({**d, "buffer": d["buffer"][::-1]} if len(d["buffer"]) > 1 else None)   # unsorted
    bad.append({**d, "buckets": [{**b, "weight": 0.9} for b in d["buckets"]]})        # weights over 1
    bad.append({**d, "buckets": [{**b, "plan": None} for b in d["buckets"]]})         # no plan at all
    other = json.loads(s.to_json())
    other["buckets"][1]["plan"]["request"]["target_ms"] = 500.0                          # another request
    bad.append(other)
    bad.append({**d, "extra": 1})
    short = json.loads(s.to_json())
    short["buckets"][-1]["plan"] = short["buckets"][0]["plan"]                           # an 8-token plan for 24
    bad.append(short)
    assert all(case is not None for case in bad[:-2]) and len(d["buffer"]) > 1
    for case in filter(None, bad):
        with pytest.raises(PlanError):
            PlanSet.from_dict(case)
    with pytest.raises(PlanError):
        PlanSet.from_json(b"{not json")


def test_engine_runs_each_request_with_the_plan_of_its_length(tiny_store):
    _, path = tiny_store
    store = Store(path, "warm")
    device_, importance_ = profiles(store, read_ms=0.05)
    # compute grows with length, so short and long requests get different plans
    import dataclasses
    device_ = dataclasses.replace(device_, compute_coef=(0.0, 0.0, 0.004, 0.0))
    lengths = [4] * 5 + [12] * 5
    s = make_plan_set(device_, importance_, store.store_id, 0.45, 2500, lengths, 16, bucket_tokens=4)
    short, long = s.plan_for(4), s.plan_for(16)
    assert (short.choice.n, short.choice.m, short.choice.bits) != (long.choice.n, long.choice.m, long.choice.bits)
    with Engine(store, s, device_, storage="warm", guard=False) as engine:
        held = sum(store.shard_record(layer, shard, bits).length for layer, shard, bits in s.buffer)
        assert engine.preload_bytes == held                           # one buffer, loaded once
        for text in TEXTS:
            got = engine.run(text)
            plan = s.plan_for(got.report.tokens)
            assert got.report.plan_tokens == plan.request.seq_len
            assert [r.layer for r in got.report.layers] == list(plan.choice.layers)
            assert [tuple(r.bits) for r in got.report.layers] == list(plan.choice.bits)
            assert got.report.planned_ms == plan.predicted.latency_ms
            ref = reference_logits(engine.store, got.report, text, engine.tokenizer)
            assert (got.logits - ref).abs().max() < 1e-5


def test_engine_takes_a_single_plan_as_a_set_of_one(tiny_store):
    _, path = tiny_store
    store = Store(path, "warm")
    device_, importance_ = profiles(store)
    plan = make_plan(device_, importance_, store.store_id, 5.0, 10**6, seq_len=16)
    with Engine(store, plan, device_, storage="warm") as engine:
        assert engine.plans.plans == (plan,) and engine.run("w1 w2").report.plan_tokens == 16
    assert isinstance(PlanSet.single(plan).first, Plan)
