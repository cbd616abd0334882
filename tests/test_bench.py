"""The benchmark's reporting (tables, plots, partial results) and its option parsing."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from sti.bench import BenchConfig, Row
from sti.results import markdown, save_results, write_outputs
from sti.cli import _numbers
from sti.errors import InputError


def results(partial=False):
    acc = {"test": 0.85, "tweets": 0.7, "amazon": 0.75, "nyt": 0.7}
    served = {"test": 0.83, "tweets": 0.69, "amazon": 0.74, "nyt": 0.68}
    rows = [Row("sti-joint", "emulate:100MB/s", "own", 1.0, 14.0, 2.0, accuracy=acc, served_accuracy=served,
                served_accuracy_no_guard=0.845, latency_median_ms=12.5, latency_p95_ms=13.9, latency_p99_ms=14.5,
                hit_rate=0.96, hit_rate_ci=(0.94, 0.97), planned_ms=11.8, predicted_ratio=1.04, stall_median_ms=0.0,
                guard_rate=0.1, guard_skipped_mean=0.25, guard_lowered_mean=0.5, peak_model_bytes=3_900_000,
                rss_growth_bytes=200_000, requests=1057),
            Row("sti-paper", "emulate:100MB/s", "own", 1.0, 14.0, 2.0, note="infeasible: no paper plan meets T"),
            Row("preload", "emulate:100MB/s", "own", 1.0, 14.0, None, accuracy=acc, served_accuracy=acc,
                latency_median_ms=13.0, latency_p95_ms=15.0, hit_rate=0.6, peak_model_bytes=90_000_000,
                rss_growth_bytes=0, requests=1057)]
    return {"config": asdict(BenchConfig.quick()), "partial": partial, "rows": [asdict(r) for r in rows],
            "conditions": {"machine": {"processor": "x86_64", "cpus": 2}, "threads": 1, "date": "today",
                           "model": "m", "fp32_model_bytes": 90e6, "test_size": 1057, "ood_sizes": {},
                           "latency_sample": 1057, "full_compute_ms": {"own": 14.0}}}


def test_markdown_has_a_row_per_point_with_the_measured_figures():
    md = markdown(results())
    lines = [l for l in md.splitlines() if l.startswith("| sti-") or l.startswith("| preload")]
    assert len(lines) == 3
    joint = lines[0].split(" | ")
    assert "0.8300" in joint and "0.8500" in joint and "12.5" in joint and "14.5" in joint and "1.04" in joint
    assert "96.0% (94.0%-97.0%)" in joint and "0.25 / 0.50" in joint and "3.90" in joint and "1057" in joint
    assert "infeasible" in lines[1]
    assert "## storage emulate:100MB/s, own lengths" in md


def test_outputs_are_written_and_partial_results_reload(tmp_path):
    paths = write_outputs(results(), tmp_path / "out")
    names = {p.name for p in paths}
    assert {"results.json", "results.md", "accuracy_latency.png", "memory.png"} <= names
    assert all(p.stat().st_size > 0 for p in paths)
    path = save_results(results(partial=True), tmp_path / "out")
    assert json.loads(path.read_text())["partial"] is True
    assert not list((tmp_path / "out").glob(".results.*"))  # no temporary file left behind


def test_sweep_options_are_parsed_or_refused():
    assert _numbers("0.5, 1,2", "--targets-x") == (0.5, 1.0, 2.0)
    for bad in ("", "1,a", "0", "-1", "nan", "inf"):
        with pytest.raises(InputError, match="--targets-x"):
            _numbers(bad, "--targets-x")


def test_a_system_keeps_its_colour_in_every_panel(tmp_path, monkeypatch):
    # a panel without some system's points must not shift the others' colours (the legend
    # is drawn once, from the first panel)
    import matplotlib.axes
    from sti.results import plot
    drawn = []
    real = matplotlib.axes.Axes.plot

    def spy(self, *args, **kw):
        drawn.append((kw.get("label"), kw.get("color")))
        return real(self, *args, **kw)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    r = results()
    acc = r["rows"][0]["accuracy"]
    r["rows"].append(asdict(Row("hf-disk-offload", "cold", "own", 1.0, 14.0, None, accuracy=acc,
                                latency_median_ms=190.0, latency_p95_ms=240.0, requests=10)))
    r["rows"].append(asdict(Row("preload", "cold", "own", 1.0, 14.0, None, accuracy=acc, latency_median_ms=13.0,
                                latency_p95_ms=15.0, requests=30)))
    plot(r, tmp_path)
    colours = {}
    for label, colour in drawn:
        colours.setdefault(label, set()).add(colour)
    assert len(colours["preload"]) == 1 and colours["preload"] != colours["hf-disk-offload"]


# --- the harness on a tiny model: what is served is what is reported -------------------------
WORDS_TEXTS = ["w1 w2 w3", "w5 w9 w33 w7 w100 w2", "w11", "w4 w4 w90 w3 w8", "w60 w61", "w7 w70 w7",
               "w30 w2 w19 w18", "w3 w3", "w88 w87 w86 w85", "w40 w41 w42 w43", "w50 w51 w52"]


@pytest.fixture()
def tiny_bench(tmp_path, monkeypatch, tiny_weights):
    """A tiny store with saved profiles, fake splits, and a device profile that is not timed."""
    import sti.bench as bench
    from sti import api
    from sti.data import OOD_SETS, Example
    from sti.profiles import save_profile
    from sti.store import Store, build_store
    from tests.conftest import word_tokenizer
    from tests.test_runtime import profiles
    store = build_store(tiny_weights, tmp_path / "store", bits=(2, 4, 32), tokenizer_from=word_tokenizer(tmp_path / "t"))
    with Store(store) as s:
        device, importance = profiles(s)
    save_profile(importance, api.importance_profile_path(store, "degrade"))
    splits = {"test": [Example(str(i), t, i % 2, 1.0) for i, t in enumerate(WORDS_TEXTS)]}
    splits["dev"] = splits["test"][::-1]
    splits.update({name: [Example(f"{name}{i}", t, 1 - i % 2, 1.0) for i, t in enumerate(WORDS_TEXTS[:4])]
                   for name in OOD_SETS})
    monkeypatch.setattr(bench, "load_split", lambda name: splits[name])
    monkeypatch.setattr(bench, "measure_device", lambda *a, **k: device)
    cfg = bench.BenchConfig(targets_x=(1000.0,), memories_mb=(1.0,), storages=("warm",), seq_modes=("own",),
                            systems=("sti-joint", "preload"), requests=7, ood_limit=4, slow_requests=2,
                            no_guard_points=((1000.0, 1.0),), calibrate=False)   # the profile is made up
    return store, cfg, splits


def test_served_accuracy_is_that_of_the_labels_the_engine_returned(tiny_bench, monkeypatch):
    import sti.runtime as runtime
    from sti.bench import run_bench
    store, cfg, splits = tiny_bench
    honest = run_bench(store, store, cfg, log=lambda *a: None)
    joint = next(r for r in honest["rows"] if r["system"] == "sti-joint")
    assert joint["requests"] == 7 and honest["conditions"]["latency_sample"] == 7  # --requests honoured
    assert set(joint["served_accuracy"]) == {"test", "tweets", "amazon", "nyt"}
    assert joint["served_accuracy_no_guard"] is not None and 0 <= joint["hit_rate_ci"][0] <= joint["hit_rate"]

    # an engine whose answers are always the first label, as a guard cutting every shard might
    # make them: served accuracy follows the answers, the plan's accuracy does not move
    real_run = runtime.Engine.run

    def always_first(self, text):
        result = real_run(self, text)
        result.label = self.config.labels[0]
        return result
    monkeypatch.setattr(runtime.Engine, "run", always_first)
    forced = run_bench(store, store, cfg, log=lambda *a: None)
    fj = next(r for r in forced["rows"] if r["system"] == "sti-joint")
    assert fj["accuracy"] == joint["accuracy"]
    want = sum(e.label == 0 for e in splits["test"][:7]) / 7
    assert fj["served_accuracy"]["test"] == pytest.approx(want)
    assert fj["served_accuracy"]["tweets"] == pytest.approx(sum(e.label == 0 for e in splits["tweets"]) / 4)
    preload = next(r for r in forced["rows"] if r["system"] == "preload")
    assert preload["served_accuracy"] == next(r for r in honest["rows"] if r["system"] == "preload")["served_accuracy"]


def test_the_report_reproduces_the_results_file(tiny_bench, tmp_path):
    from typer.testing import CliRunner
    from sti.bench import run_bench
    from sti.results import write_outputs
    from sti.cli import app
    store, cfg, _ = tiny_bench
    out = tmp_path / "res"
    results = run_bench(store, store, dataclass_replace(cfg, targets_x=(1.0, 3.0), memories_mb=(2.0,)),
                        log=lambda *a: None)
    write_outputs(results, out)
    doc = tmp_path / "docs" / "RESULTS.md"
    r = CliRunner().invoke(app, ["report", str(out), "--out", str(doc)])
    assert r.exit_code == 0, r.output
    text = doc.read_text()
    joint = next(x for x in results["rows"] if x["system"] == "sti-joint" and x["served_accuracy"])
    line = next(l for l in text.splitlines() if l.startswith(f"| warm | sti-joint | {joint['target_x']:g}x"))
    assert f"{joint['served_accuracy']['test']:.4f}" in line and f"{joint['accuracy']['test']:.4f}" in line
    assert f"{joint['latency_median_ms']:.1f} / {joint['latency_p95_ms']:.1f}" in line
    assert "](../res/accuracy_latency.png)" in text  # the plots, linked from where the document is
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert bad.exit_code != 0 and "no results.json" in str(bad.exception)


def dataclass_replace(cfg, **kw):
    from dataclasses import replace
    return replace(cfg, **kw)


def test_length_aware_plan_accuracy_scores_each_example_with_the_plan_of_its_length(tiny_bench):
    """The batch accuracy of length-aware plans against a per-example reference: each example
    classified by the reference encoder on the weights of the plan its length selects."""
    import dataclasses
    import torch
    from sti.bench import Harness
    from sti.encoder import classify
    from sti.planning import make_plan_set
    from sti.store import Store
    from tests.test_runtime import profiles
    store, cfg, splits = tiny_bench
    h = Harness(store, store, cfg, log=lambda *a: None)
    with Store(store) as s:
        device, importance = profiles(s, read_ms=0.05)
        device = dataclasses.replace(device, compute_coef=(0.0, 0.0, 0.004, 0.0))
        plans = make_plan_set(device, importance, s.store_id, 0.45, 2500, [4, 4, 12, 12], 16, bucket_tokens=4)
        assert len({id(p) for p in plans.plans}) > 1 and len({plans.index_for(n) for n in h.lengths("test")}) > 1
        hits = 0
        for e, n in zip(splits["test"], h.lengths("test")):
            plan = plans.plan_for(n)
            w = s.load_model(32)
            for layer, row in zip(plan.choice.layers, plan.choice.bits):
                w.layers[layer] = s.layer(layer, list(range(plan.choice.m)), list(row))
            batch = h.tokenizer.encode([e.text])
            with torch.no_grad():
                logits = classify(w, batch.input_ids, batch.attention_mask, plan.submodel)
            hits += int(logits[0].argmax()) == e.label
    assert h.plan_accuracy(plans)["test"] == pytest.approx(hits / len(splits["test"]))


def test_bench_cli_plans_with_the_headroom_given_and_refuses_a_bad_one(tiny_bench, tmp_path):
    """`sti bench --headroom H` runs the sweep with that headroom (the planners keep it back:
    tests/test_planner.py) and says so in its results; a headroom that is not a share of T
    is refused before anything runs."""
    import json
    from typer.testing import CliRunner
    from sti.cli import app
    store, _, _ = tiny_bench
    out = tmp_path / "res"
    args = ["bench", str(store), str(store), "--systems", "sti-joint", "--storages", "warm", "--seq-modes", "own",
            "--targets-x", "1000", "--memories-mb", "1", "--requests", "3", "--ood-limit", "2", "--no-calibrate",
            "--out", str(out)]
    r = CliRunner().invoke(app, args + ["--headroom", "0.3"])
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["headroom"] == 0.3
    bad = CliRunner().invoke(app, args + ["--headroom", "1.5"])
    assert bad.exit_code != 0 and "--headroom" in str(bad.exception)


def test_a_run_can_plan_with_an_earlier_runs_conditions(tiny_bench, tmp_path, tiny_weights, monkeypatch):
    """With `conditions_from`, a run takes the earlier run's T units and device profiles (as
    its own store's) instead of measuring them: the same plans for a store of the same shape;
    a store whose shards have other sizes is refused, naming why."""
    import sti.bench as bench
    from sti.bench import run_bench
    from sti.results import write_outputs
    from sti.store import build_store
    store, cfg, _ = tiny_bench
    first = run_bench(store, store, cfg, log=lambda *a: None)
    write_outputs(first, tmp_path / "first")
    from sti.weights import ModelWeights
    # the same shapes and record sizes, other weights (another store id)
    twin = build_store(ModelWeights.random(tiny_weights.config, seed=11), tmp_path / "twin", bits=(2, 4, 32),
                       tokenizer_from=store)
    (tmp_path / "twin" / "profiles").mkdir(exist_ok=True)
    for f in (Path(store) / "profiles").glob("importance-*.json"):   # its importance, re-keyed
        d = json.loads(f.read_text())
        d["store_id"] = json.loads((tmp_path / "twin" / "manifest.json").read_text())["store_id"]
        (tmp_path / "twin" / "profiles" / f.name).write_text(json.dumps(d))
    monkeypatch.setattr(bench, "measure_device", lambda *a, **k: pytest.fail("measured a profile it was given"))
    monkeypatch.setattr(bench, "full_compute_ms", lambda *a, **k: pytest.fail("measured a T unit it was given"))
    second = run_bench(twin, twin, dataclass_replace(cfg, conditions_from=str(tmp_path / "first")), log=lambda *a: None)
    assert second["conditions"]["full_compute_ms"] == first["conditions"]["full_compute_ms"]
    mine, theirs = (r["conditions"]["device_profiles"][-1]["profile"] for r in (second, first))
    assert mine["store_id"] != theirs["store_id"]
    assert {k: v for k, v in mine.items() if k != "store_id"} == {k: v for k, v in theirs.items() if k != "store_id"}
    joint = lambda r: [x["planned_ms"] for x in r["rows"] if x["system"] == "sti-joint"]  # noqa: E731
    assert joint(second) == joint(first)
    other = build_store(tiny_weights, tmp_path / "other", bits=(3, 32), tokenizer_from=store)
    with pytest.raises(InputError, match="other sizes"):
        run_bench(other, other, dataclass_replace(cfg, conditions_from=str(tmp_path / "first")), log=lambda *a: None)


def test_each_point_is_calibrated_for_its_own_targets_as_a_users_engine_is(tiny_bench, tmp_path, monkeypatch):
    """With calibration on, the planned systems plan and run at each (T, M) with the profile
    corrected under that point's joint plans (as `sti.open_engine` corrects a user's), probed
    once per point; an earlier run's point profiles are reused, not probed again."""
    import dataclasses
    import sti.calibrate as calibrate
    from sti.bench import run_bench
    from sti.results import write_outputs
    store, cfg, _ = tiny_bench
    probed = []

    def fake_calibrated(engine, texts, log=print, source=""):
        req = engine.plans.first.request
        probed.append((req.target_ms, req.memory_bytes))
        return dataclasses.replace(engine.device, first_layer_ms=len(probed) * 0.001,
                                   calibrated={"probe_target_ms": req.target_ms})
    monkeypatch.setattr(calibrate, "calibrated", fake_calibrated)
    cfg = dataclass_replace(cfg, targets_x=(1000.0, 2000.0), memories_mb=(1.0,), calibrate=True,
                            systems=("sti-joint", "sti-paper"), no_guard_points=())
    first = run_bench(store, store, cfg, log=lambda *a: None)
    unit = next(iter(first["conditions"]["full_compute_ms"].values()))
    assert probed == [(pytest.approx(1000.0 * unit), 1_000_000), (pytest.approx(2000.0 * unit), 1_000_000)]
    used = {p["used_for"]: p["profile"]["calibrated"] for p in first["conditions"]["device_profiles"]}
    assert used["warm / own, calibrated on the engine at T = 1000x, M = 1 MB"]["probe_target_ms"] == \
        pytest.approx(1000.0 * unit)
    assert used["warm / own, calibrated on the engine at T = 2000x, M = 1 MB"]["probe_target_ms"] == \
        pytest.approx(2000.0 * unit)
    write_outputs(first, tmp_path / "first")
    probed.clear()
    second = run_bench(store, store, dataclass_replace(cfg, conditions_from=str(tmp_path / "first")),
                       log=lambda *a: None)
    assert probed == []
    planned = lambda r: [(x["system"], x["planned_ms"]) for x in r["rows"]]  # noqa: E731
    assert planned(second) == planned(first)


def test_with_follow_the_planned_engines_plan_again_when_the_device_drifts(tiny_bench, monkeypatch):
    """`--follow`: the planned systems' engines follow the device as `sti.open_engine`'s do;
    a drift the follower reports makes the engine plan again (the joint planner around its
    kept buffer), and the row counts the plans swapped in."""
    import sti.bench as bench
    from sti.runtime import follow
    from sti.runtime.follow import rescaled
    store, cfg, _ = tiny_bench
    engines = []

    class Recorded(bench.Engine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            engines.append(self)
    monkeypatch.setattr(bench, "Engine", Recorded)
    cfg = dataclass_replace(cfg, systems=("sti-joint", "sti-paper"), no_guard_points=())
    plain = bench.run_bench(store, store, cfg, log=lambda *a: None)
    assert [r["replans"] for r in plain["rows"]] == [None, None] and all(e.follower is None for e in engines)

    engines.clear()
    calls = []
    real_add = follow.Follower.add

    def drifts_once(self, paces):   # the compute lane 2x slower, reported once per engine
        real_add(self, paces)
        calls.append(self)
        return {"compute": 2.0} if calls.count(self) == 3 else None
    monkeypatch.setattr(follow.Follower, "add", drifts_once)
    followed = bench.run_bench(store, store, dataclass_replace(cfg, follow=True), log=lambda *a: None)
    assert followed["config"]["follow"] is True
    assert [r["replans"] for r in followed["rows"]] == [1, 1]
    assert [len(r["replan_history"]) for r in followed["rows"]] == [1, 1]
    assert followed["rows"][0]["replan_history"][0]["drift"] == {"compute": 2.0}
    assert all("followed the device: 1 replans" in r["note"] for r in followed["rows"])
    joint = engines[0]
    assert joint.follower is not None and joint.history[0]["kind"] == "drift"
    # the joint engine's replans keep its preload buffer; a new target plans afresh
    kept, slow = joint.plans, rescaled(joint.device, {"read": 2.0})
    target = kept.first.request.target_ms
    assert joint.replan(slow, target, 1.0, kept, False).buffer == kept.buffer
    assert joint.replan(joint.device, target / 2, 1.0).first.request.target_ms == pytest.approx(target / 2)


def test_ood_limit_zero_serves_the_test_split_only_and_a_negative_one_is_refused(tiny_bench):
    from sti.bench import run_bench
    from sti.errors import InputError
    store, cfg, _ = tiny_bench
    got = run_bench(store, store, dataclass_replace(cfg, ood_limit=0, systems=("sti-joint",), no_guard_points=()),
                    log=lambda *a: None)
    assert set(got["rows"][0]["served_accuracy"]) == {"test"} and got["conditions"]["ood_sizes"] == {}
    with pytest.raises(InputError, match="ood-limit"):
        run_bench(store, store, dataclass_replace(cfg, ood_limit=-1), log=lambda *a: None)
