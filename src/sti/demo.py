"""The main job: the end-to-end demo on the built-in defaults."""

from __future__ import annotations

import time

from rich.console import Console


def run_demo(preset: str = "quick", console: Console | None = None) -> None:
    from . import data
    from .assets import ensure_data, ensure_model
    from .finetune import default_model_dir, finetune, read_metrics

    console = console or Console()
    t0 = time.perf_counter()
    console.rule("1. assets: the real model and data (fetched once, checked by sha256)")
    console.print(f"model: {ensure_model(console.print)}")
    console.print(f"data:  {ensure_data(console.print)}")
    for r in data.summary():
        console.print(f"  {r['split']:>7}: {r['size']:5d} snippets, {r['positive_share']:.1%} positive")

    console.rule("2. the elastic model (fine-tuned once, then cached)")
    model_dir = _cached_model(default_model_dir, preset)
    if model_dir is None:
        model_dir = finetune(preset=preset, log=console.print)
    from .cli import print_grid
    console.print(f"model: {model_dir}")
    print_grid(read_metrics(model_dir))
    console.rule(f"done in {time.perf_counter() - t0:.0f} s")


def _cached_model(default_model_dir, preset: str):
    """Prefer the full preset's model if it exists, then the requested preset's."""
    for name in ("full", preset):
        d = default_model_dir(name)
        if (d / "metrics.json").exists():
            return d
    return None
