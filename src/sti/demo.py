"""The main job: the end-to-end demo on the built-in defaults.

fetch model and data -> fine-tune the elastic model (cached) -> build the store (cached) ->
profile the device and the shards (cached) -> plan -> run -> a short benchmark table and plot.
Everything lands in $STI_HOME; with all of it cached a rerun takes about two minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

DEMO_STORAGE = "emulate:100MB/s"   # SD/eMMC-class storage, reproducible on any machine
DEMO_MEMORY_MB = 1.8               # ~2% of the fp32 model (90 MB)


def demo_store(model_dir: Path, console: Console) -> Path:
    """The store of `model_dir`, built once under $STI_HOME/stores."""
    from .assets import sti_home
    from .hf import checkpoint_sha256
    from .store import MANIFEST, VERSION, build_store
    path = sti_home() / "stores" / f"{model_dir.name}-linear"
    if (path / MANIFEST).exists():
        built_from, version, rounding = _built_from(path)
        same_model = built_from == checkpoint_sha256(model_dir)
        if same_model and version == VERSION and rounding == "gptq":
            return path
        why = (f"is in format version {version} (this sti writes {VERSION})" if version != VERSION else
               "records no model hash (built by an older sti)" if built_from is None else
               f"was built from another version of {model_dir.name}" if not same_model
               else "rounds every weight to its nearest code (this sti calibrates GPTQ rounding)")
        console.print(f"{path} {why}: rebuilding it (its profiles go with it and are measured again)")
    from rich.progress import Progress as Bar
    from .api import calibration_texts
    with Bar(console=console, transient=True) as bar:
        task = bar.add_task("building the store (GPTQ rounding, calibrated on the training split)", total=None)
        build_store(model_dir, path, calibration=calibration_texts(),
                    progress=lambda d, t: bar.update(task, completed=d, total=t) or True)
    return path


def demo_store_path() -> Path:
    """The store `sti demo` built and uses (of the full preset's model if one is cached,
    else of the quick preset's), ready for `sti.open_engine`."""
    from .assets import sti_home
    from .errors import InputError
    from .finetune import default_model_dir
    from .store import MANIFEST
    for name in ("full", "quick"):
        path = sti_home() / "stores" / f"{default_model_dir(name).name}-linear"
        if (path / MANIFEST).exists():
            return path
    raise InputError(f"no demo store in {sti_home() / 'stores'} yet: run `make demo` (or `sti demo`) first")


def _built_from(store: Path) -> tuple[str | None, object, object]:
    """(the sha256 of the model a store was built from, if its manifest says; its format
    version; its rounding method). Read loosely rather than through `Store`, whose
    validation refuses stores of an older format version: those should be rebuilt here,
    not stop the demo."""
    from .store import MANIFEST
    try:
        m = json.loads((store / MANIFEST).read_text())
        return m.get("source", {}).get("model_sha256"), m.get("version"), m.get("rounding", {}).get("method")
    except (OSError, ValueError, AttributeError):
        return None, None, None


def run_demo(preset: str = "quick", console: Console | None = None) -> None:
    from . import api, data
    from .assets import ensure_data, ensure_model, sti_home
    from .bench import BenchConfig, run_bench
    from .results import markdown, write_outputs
    from .present import print_grid, print_inspect
    from .finetune import default_model_dir, finetune, read_metrics
    from .planning import explain_set

    console = console or Console()
    log = console.print
    t0 = time.perf_counter()
    console.rule("1. assets: the real model and data (fetched once, checked by sha256)")
    log(f"model: {ensure_model(log)}")
    log(f"data:  {ensure_data(log)}")
    for r in data.summary():
        log(f"  {r['split']:>7}: {r['size']:5d} snippets, {r['positive_share']:.1%} positive")

    console.rule("2. the elastic model (fine-tuned once, then cached)")
    model_dir = _cached_model(default_model_dir, preset)
    if model_dir is None:
        model_dir = finetune(preset=preset, log=log)
    log(f"model: {model_dir}")
    print_grid(read_metrics(model_dir), console)

    console.rule("3. the shard store (built once)")
    store = demo_store(model_dir, console)
    print_inspect(store, console)

    console.rule(f"4. profiles: this device ({DEMO_STORAGE}) and shard importance (measured once)")
    warm = api.device_profile(store, "warm", log=log)
    device = api.device_profile(store, DEMO_STORAGE, log=log)
    importance = api.importance_profile(store, log=log)
    log(f"compute fit error {warm.compute_fit_error:.1%}; shard read at 4 bits {device.shard_read_ms.get(4, 0):.2f} ms; "
        f"importance measured in {importance.cost_s:.0f} s; dev accuracy {importance.full_accuracy:.4f}")

    console.rule("5. a plan and a few answers")
    target = 2.0 * _full_ms(store)
    log(f"T = 2 x the full model's resident compute = {target:.1f} ms, M = {DEMO_MEMORY_MB} MB, {DEMO_STORAGE}")
    with api.open_engine(store, target, DEMO_MEMORY_MB, storage=DEMO_STORAGE, log=log) as engine:
        log(explain_set(engine.plans), highlight=False)
        for text in ["a gripping, beautifully acted film", "tedious, overlong and utterly forgettable"]:
            r = engine.run(text)
            log(f"  {r.label:8} {max(r.probs):.3f}  {r.report.latency_ms:.1f} ms (T {target:.1f})  {text!r}")

    console.rule("6. benchmark (short version; the full sweep is `sti bench`)")
    out = sti_home() / "demo-bench"
    results = run_bench(store, model_dir, BenchConfig.quick(), log=log)
    paths = write_outputs(results, out)
    log(markdown(results), highlight=False)
    log("wrote " + ", ".join(str(p) for p in paths))
    console.rule(f"done in {time.perf_counter() - t0:.0f} s")


def _full_ms(store: Path) -> float:
    """The full fp32 model's resident latency on 40 test sentences (the T unit)."""
    from .bench import full_compute_ms
    from .data import load_split
    from .store import Store
    from .tokenizer import Tokenizer
    with Store(store) as s:
        weights = s.load_model(32)
    return full_compute_ms(weights, Tokenizer(store), [e.text for e in load_split("test")[:40]], None)


def _cached_model(default_model_dir, preset: str):
    """Prefer the full preset's model if it exists, then the requested preset's."""
    for name in ("full", preset):
        d = default_model_dir(name)
        if (d / "metrics.json").exists():
            return d
    return None
