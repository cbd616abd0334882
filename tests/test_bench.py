"""The benchmark's reporting (tables, plots, partial results) and its option parsing."""

import json
from dataclasses import asdict

import pytest

from sti.bench import BenchConfig, Row, markdown, save_results, write_outputs
from sti.cli import _numbers
from sti.errors import InputError


def results(partial=False):
    acc = {"test": 0.85, "tweets": 0.7, "amazon": 0.75, "nyt": 0.7}
    rows = [Row("sti-joint", "emulate:100MB/s", "own", 1.0, 14.0, 2.0, acc, 12.5, 13.9, 0.96, 11.8, 1.04, 0.0,
                0.1, 3_900_000, 200_000, 30),
            Row("sti-paper", "emulate:100MB/s", "own", 1.0, 14.0, 2.0, note="infeasible: no paper plan meets T"),
            Row("preload", "emulate:100MB/s", "own", 1.0, 14.0, None, acc, 13.0, 15.0, 0.6,
                peak_model_bytes=90_000_000, rss_growth_bytes=0, requests=30)]
    return {"config": asdict(BenchConfig.quick()), "partial": partial, "rows": [asdict(r) for r in rows],
            "conditions": {"machine": {"processor": "x86_64", "cpus": 2}, "threads": 1, "date": "today",
                           "model": "m", "fp32_model_bytes": 90e6, "test_size": 1057, "ood_sizes": {},
                           "latency_sample": 30, "full_compute_ms": {"own": 14.0}}}


def test_markdown_has_a_row_per_point_with_the_measured_figures():
    md = markdown(results())
    lines = [l for l in md.splitlines() if l.startswith("| sti-") or l.startswith("| preload")]
    assert len(lines) == 3
    joint = lines[0].split(" | ")
    assert "0.8500" in joint and "12.5" in joint and "1.04" in joint and "96%" in joint and "3.90" in joint
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
    from sti.bench import plot
    drawn = []
    real = matplotlib.axes.Axes.plot

    def spy(self, *args, **kw):
        drawn.append((kw.get("label"), kw.get("color")))
        return real(self, *args, **kw)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    r = results()
    acc = r["rows"][0]["accuracy"]
    r["rows"].append(asdict(Row("hf-disk-offload", "cold", "own", 1.0, 14.0, None, acc, 190.0, 240.0,
                                requests=10)))
    r["rows"].append(asdict(Row("preload", "cold", "own", 1.0, 14.0, None, acc, 13.0, 15.0, requests=30)))
    plot(r, tmp_path)
    colours = {}
    for label, colour in drawn:
        colours.setdefault(label, set()).add(colour)
    assert len(colours["preload"]) == 1 and colours["preload"] != colours["hf-disk-offload"]
