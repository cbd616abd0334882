"""The `sti` command: a thin layer over the Python API.

Every StiError becomes one readable line on stderr and a non-zero exit code; Ctrl-C
exits with 130 and no traceback.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import InputError, StiError
from .present import print_grid, print_inspect

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="sti: run BERT-family models within a latency target by streaming weight shards.")
console = Console()
notes = Console(stderr=True)   # progress notes of commands whose stdout may be JSON


@app.command()
def data() -> None:
    """Fetch the data (once) and print each split's size and label balance."""
    from .data import summary
    table = Table("split", "size", "positive", "negative", "positive share")
    for r in summary():
        table.add_row(r["split"], str(r["size"]), str(r["positive"]), str(r["negative"]),
                      f"{r['positive_share']:.3f}")
    console.print(table)


DATA_HELP = "a data file: .tsv or .csv with a header line, or .jsonl (columns text, text_pair, label)"
TEXT_COLUMN = typer.Option(None, help="the column (or JSON field) holding the text (default: text, sentence, ...)")
PAIR_COLUMN = typer.Option(None, help="the column holding a pair's second text (default: text_pair, sentence2, ...)")
LABEL_COLUMN = typer.Option(None, help="the column holding the label (default: label, labels, gold_label, target)")


def _columns(text: str | None, pair: str | None, label: str | None):
    from .datafile import Columns
    return Columns(text=text, pair=pair, label=label)


@app.command()
def finetune(out: Optional[Path] = typer.Option(None, help="output model directory (default: in $STI_HOME)"),
             preset: str = typer.Option("full", help="full (about 39 min on 2 cores) or quick (under 10 min)"),
             force: bool = typer.Option(False, help="retrain even if the model exists"),
             base: Optional[Path] = typer.Option(None, help="a BERT base model directory (default: the "
                                                 "registry's MiniLM-L6)"),
             train: Optional[Path] = typer.Option(None, help="your training data (" + DATA_HELP + ")"),
             dev: Optional[Path] = typer.Option(None, help="your dev data: rewiring and model selection"),
             test: Optional[Path] = typer.Option(None, help="your test data, reported on (default: the dev data)"),
             labels: Optional[str] = typer.Option(None, help="comma-separated label names in id order (default: "
                                                  "the training data's)"),
             max_length: Optional[int] = typer.Option(None, help="tokens a training example is cut to "
                                                      "(default: the preset's, 64 or 48)"),
             text_column: Optional[str] = TEXT_COLUMN, pair_column: Optional[str] = PAIR_COLUMN,
             label_column: Optional[str] = LABEL_COLUMN) -> None:
    """Fine-tune an elastic (width- and depth-adaptive) classifier: the built-in sentiment task,
    or your own (--train, --dev; sentence pairs too)."""
    from dataclasses import replace
    from .finetune import FinetuneConfig, default_model_dir, finetune as run, read_metrics, user_task
    cfg = FinetuneConfig.preset_named(preset)
    if max_length is not None:
        if max_length < 8:
            raise InputError(f"--max-length must be at least 8 tokens, got {max_length}")
        cfg = replace(cfg, max_length=max_length)
    task = None
    if (base or max_length) and not out:
        raise InputError("--base and --max-length make another model than the default one: give --out")
    if train or dev or test or labels:
        if not (train and dev and out):
            raise InputError("fine-tuning on your own data needs --train, --dev and --out")
        names = tuple(x.strip() for x in labels.split(",")) if labels else None
        task = user_task(train, dev, test, names, _columns(text_column, pair_column, label_column))
    target = out or default_model_dir(cfg.preset)
    if force or task is not None or not (target / "metrics.json").exists():
        run(out=target, cfg=cfg, base_dir=base, log=console.print, task=task)
    else:
        console.print(f"using the cached model in {target} (--force retrains)")
    print_grid(read_metrics(target), console)


def _bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise typer.BadParameter(f"--bits must be comma-separated integers, got {text!r}") from None


@app.command()
def build(model_dir: Path = typer.Argument(..., help="a Hugging Face model directory (BERT, RoBERTa, DistilBERT)"),
          store_dir: Path = typer.Argument(..., help="where to write the store"),
          bits: str = typer.Option("2,3,4,5,6,32", help="bitwidths to store every shard at"),
          codec: str = typer.Option("linear", help="linear (group-wise affine, fast decode) or gobo (the paper's)"),
          calibration: str = typer.Option("builtin", help="texts GPTQ rounding measures the model's inputs on "
                                          "(linear codec): builtin (the built-in training split), a data file "
                                          "(docs/DATA.md), or none (every weight to its nearest code)"),
          calibration_count: int = typer.Option(512, help="how many calibration texts")) -> None:
    """Cut a model into shards and write every shard at every bitwidth (docs/FORMAT.md)."""
    import time
    from rich.progress import Progress as Bar
    from .api import calibration_texts
    from .store import build_store
    t0 = time.perf_counter()
    if calibration == "builtin" and codec != "linear":
        calibration = "none"   # the default: GPTQ rounding is the linear codec's (build_store refuses a file)
    texts = None if calibration == "none" else \
        calibration_texts(None if calibration == "builtin" else Path(calibration), calibration_count)
    with Bar(console=console, transient=True) as bar:
        task = bar.add_task("building store", total=None)
        build_store(model_dir, store_dir, bits=_bits(bits), codec=codec, calibration=texts,
                    progress=lambda done, total: bar.update(task, completed=done, total=total) or True)
    console.print(f"wrote {store_dir} in {time.perf_counter() - t0:.1f} s")
    print_inspect(store_dir, console)


@app.command()
def inspect(store_dir: Path = typer.Argument(..., help="a store directory")) -> None:
    """Sizes per bitwidth and per part of a store, beside the fp32 model's size."""
    print_inspect(store_dir, console)


profile_app = typer.Typer(no_args_is_help=True, help="Measure the device and the shards' importance.")
app.add_typer(profile_app, name="profile")

STORAGE_HELP = "cold (O_DIRECT), warm (page cache) or emulate:BANDWIDTH[,LATENCY], e.g. emulate:100MB/s,1ms"


@profile_app.command("device")
def profile_device(store_dir: Path = typer.Argument(..., help="a store directory"),
                   storage: str = typer.Option("cold", help=STORAGE_HELP),
                   seq_len: int = typer.Option(64, help="sequence length the figures are centred on"),
                   compute_dtype: str = typer.Option("auto", help="auto (the faster here, timed), float32, or "
                                                     "bfloat16 (shard groups held and multiplied in bfloat16: "
                                                     "faster on CPUs with bfloat16 units, not exact)")) -> None:
    """Time reads, decodes and layer compute on this machine; save the profile beside the store."""
    from rich.progress import Progress as Bar
    from .api import device_profile_path
    from .profile_device import measure_device
    from .profiles import save_profile
    with Bar(console=console, transient=True) as bar:
        task = bar.add_task("profiling the device", total=None)
        p = measure_device(store_dir, storage=storage, seq_len=seq_len, compute_dtype=compute_dtype,
                           progress=lambda d, t: bar.update(task, completed=d, total=t) or True)
    path = save_profile(p, device_profile_path(store_dir, storage))
    table = Table("bits", "shard KB", "read ms", "read MB/s", "decode ms", "decode MB/s (out)")
    fp32 = p.shard_bytes.get(32, 0)
    for b in p.bits:
        table.add_row(str(b), f"{p.shard_bytes[b] / 1e3:.1f}", f"{p.shard_read_ms[b]:.3f}",
                      f"{p.shard_bytes[b] / max(p.shard_read_ms[b], 1e-9) / 1e3:.0f}", f"{p.shard_decode_ms[b]:.3f}",
                      f"{fp32 / max(p.shard_decode_ms[b], 1e-9) / 1e3:.0f}")
    console.print(table)
    console.print(f"layer compute (m shards, L tokens) = {' + '.join(f'{c:.4g}' for c in p.compute_coef)} "
                  f"x [1, L, mL, mL^2, m] ms; fit error (median) {p.compute_fit_error:.1%}")
    from .store import Store
    with Store(store_dir) as store:
        m = store.config.num_shards
    console.print(f"full layer at L={p.seq_len}: {p.compute_ms(m):.2f} ms; embedding rows "
                  f"{p.embed_ms[0]:.2f} + {p.embed_ms[1]:.3f}/token ms; head {p.head_ms:.3f} ms; {p.threads} threads")
    timed = ", ".join(f"{k} {v:.2f} ms" for k, v in p.dtype_layer_ms.items())
    console.print(f"computes in {p.compute_dtype}" + (f" (a whole layer: {timed})" if timed else ""))
    console.print(f"saved {path}")


@profile_app.command("importance")
def profile_importance(store_dir: Path = typer.Argument(..., help="a store directory"),
                       split: str = typer.Option("dev", help="built-in split to measure on (dev: never test)"),
                       data: Optional[Path] = typer.Option(None, help="measure on your labelled data instead: "
                                                           + DATA_HELP),
                       limit: Optional[int] = typer.Option(None, help="use only the first N examples"),
                       method: str = typer.Option("degrade", help="degrade (the paper's) or gradient (cheap)"),
                       text_column: Optional[str] = TEXT_COLUMN, pair_column: Optional[str] = PAIR_COLUMN,
                       label_column: Optional[str] = LABEL_COLUMN) -> None:
    """Measure how much each shard matters; save the N x M table beside the store. Plans and
    calibration then use the same data's requests (their lengths) while the file is unchanged."""
    from .api import importance_profile_path
    from .profile_importance import measure_importance
    from .profiles import save_profile
    p = measure_importance(store_dir, method=method, split=split, limit=limit, data=data,
                           columns=_columns(text_column, pair_column, label_column))
    path = save_profile(p, importance_profile_path(store_dir, method, data=data is not None))
    import numpy as np
    kl = np.array(p.shard_kl)
    where = f"{data} ({p.data['examples']} examples)" if data else split
    console.print(f"{method} on {where}: {p.cost_s:.1f} s; full accuracy {p.full_accuracy:.4f}; shard KL min "
                  f"{kl.min():.2e} median {np.median(kl):.2e} max {kl.max():.2e}")
    console.print("bits error: " + ", ".join(f"{b}: {e:.3f}" for b, e in sorted(p.bits_error.items())))
    console.print(f"saved {path}")


HEADROOM_HELP = "share of T the plan keeps back for jitter (the deadline guard spends it)"
PRUNE_HELP = ("let the plan leave out layers and shards of a model not trained elastic (an elastic model, "
              "from sti finetune, always may)")


SEQ_LEN_HELP = ("one plan for requests of this many tokens (default: length-aware plans, one per 8 tokens of "
                "request length, for the joint planner; 48 tokens for the paper's)")


ROW_CACHE_HELP = ("let the plans hold frequent tokens' embedding rows resident, in M, where that buys more "
                  "accuracy than preloading shards")


@app.command()
def plan(store_dir: Path = typer.Argument(..., help="a store directory"),
         latency_ms: float = typer.Option(..., help="target latency T in ms"),
         memory_mb: float = typer.Option(..., help="preload buffer budget M in MB"),
         planner: str = typer.Option("joint", help="joint (ours) or paper (STI's two stages)"),
         storage: str = typer.Option("cold", help=STORAGE_HELP),
         seq_len: Optional[int] = typer.Option(None, help=SEQ_LEN_HELP),
         max_length: Optional[int] = typer.Option(None, help="the longest request to plan for (default 128)"),
         headroom: float = typer.Option(0.1, help=HEADROOM_HELP),
         allow_pruning: bool = typer.Option(False, help=PRUNE_HELP),
         show: Optional[int] = typer.Option(None, help="print the full plan for requests of this many tokens"),
         calibrate: bool = typer.Option(False, help="correct the device profile on the engine first, as sti run "
                                        "does (about a second)"),
         row_cache: bool = typer.Option(True, help=ROW_CACHE_HELP),
         json_out: bool = typer.Option(False, "--json", help="print the plans as JSON")) -> None:
    """Plan which shards to run at which bitwidths, and what to preload, for each request length."""
    from .api import calibrated_device, plan as make
    from .planning import explain_set
    log = notes.print if json_out else console.print
    args = (store_dir, latency_ms, memory_mb, planner, storage, seq_len, None, log, headroom, allow_pruning)
    device = calibrated_device(*args, max_length=max_length, row_cache=row_cache) if calibrate else None
    p = make(*args, max_length=max_length, device=device, row_cache=row_cache)
    print(p.to_json()) if json_out else console.print(explain_set(p, show), highlight=False)


MAX_LENGTH_HELP = "cut requests to this many tokens (default 128; at most the model's position limit)"


@app.command()
def run(store_dir: Path = typer.Argument(..., help="a store directory"),
        texts: Optional[list[str]] = typer.Argument(None, help="texts to classify"),
        pair: Optional[list[str]] = typer.Option(None, help="a second text (sentence pairs): once per text"),
        input_file: Optional[Path] = typer.Option(None, "--input", help="read the texts from a file, or - for "
                                                  "standard input: one per line, or JSONL (text, text_pair), "
                                                  "or a .tsv/.csv with a header (a label column is scored)"),
        latency_ms: Optional[float] = typer.Option(None, help="target latency T in ms (not with --exact)"),
        memory_mb: Optional[float] = typer.Option(None, help="preload buffer budget M in MB (not with --exact)"),
        exact: bool = typer.Option(False, help="the whole model at full precision, no plan or deadline (for checking)"),
        planner: str = typer.Option("joint", help="joint (ours) or paper (STI's two stages)"),
        storage: str = typer.Option("cold", help=STORAGE_HELP),
        seq_len: Optional[int] = typer.Option(None, help=SEQ_LEN_HELP),
        max_length: Optional[int] = typer.Option(None, help=MAX_LENGTH_HELP),
        headroom: float = typer.Option(0.1, help=HEADROOM_HELP),
        allow_pruning: bool = typer.Option(False, help=PRUNE_HELP),
        guard: bool = typer.Option(True, help="lower bits / skip shards when IO runs late"),
        calibrate: bool = typer.Option(True, help="correct the device profile on the engine first (about a second)"),
        row_cache: bool = typer.Option(True, help=ROW_CACHE_HELP),
        trace: Optional[Path] = typer.Option(None, help="write a Chrome trace (Perfetto) of the last request"),
        timeline: Optional[Path] = typer.Option(None, help="draw the last request's IO/compute lanes as a PNG"),
        text_column: Optional[str] = TEXT_COLUMN, pair_column: Optional[str] = PAIR_COLUMN,
        label_column: Optional[str] = LABEL_COLUMN,
        json_out: bool = typer.Option(False, "--json", help="print one JSON object per text (the summary goes "
                                      "to stderr)")) -> None:
    """Classify texts within the latency target, streaming shards from the store. One engine
    answers them all, each as soon as it is read; the end prints a summary."""
    import json
    from .inputs import Tally, requests
    reqs = requests(texts or [], pair or [], input_file, _columns(text_column, pair_column, label_column))
    say = notes.print if json_out else console.print
    if exact:
        if latency_ms is not None or memory_mb is not None or trace or timeline:
            raise InputError("--exact runs without a plan: leave out --latency-ms, --memory-mb, --trace, --timeline")
        from .api import exact_answers
        for req, r in exact_answers(store_dir, reqs, max_length):
            if json_out:
                print(json.dumps({**req.fields(), **r}), flush=True)
            else:
                console.print(f"[bold]{r['label']}[/bold] ({max(r['probs']):.3f})  exact, full precision"
                              + (" (truncated)" if r["truncated"] else "") + f"  {req.text[:60]!r}", highlight=False)
        return
    if latency_ms is None or memory_mb is None:
        raise InputError("give --latency-ms and --memory-mb (or --exact for the whole model at full precision)")
    from .api import open_engine
    with open_engine(store_dir, latency_ms, memory_mb, storage=storage, planner=planner, seq_len=seq_len,
                     guard=guard, log=say, headroom=headroom, allow_pruning=allow_pruning,
                     max_length=max_length, calibrate=calibrate, row_cache=row_cache) as engine:
        tally, result = Tally(engine.config.labels), None
        try:
            for req in reqs:
                result = engine.run(req.text, req.pair)
                if json_out:
                    print(json.dumps(answer_json(req, result)), flush=True)
                else:
                    print_answer(req, result)
                tally.add(req, result)  # (after the answer is out: a bad label loses nothing)
        except KeyboardInterrupt:
            say("interrupted: the summary is of the answers given so far")
        except StiError:
            say(tally.summary(), highlight=False)  # what was answered before the bad input
            raise
        say(tally.summary(), highlight=False)
        if result is not None and trace:
            from .trace import write_trace
            say(f"trace: {write_trace(result.report, trace)}")
        if result is not None and timeline:
            from .trace import draw_timeline
            say(f"timeline: {draw_timeline(result.report, timeline)}")


def answer_json(req, result) -> dict:
    r = result.report
    return {**req.fields(), "label": result.label, "probs": result.probs, "logits": result.logits.tolist(),
            "latency_ms": r.latency_ms, "report": {k: v for k, v in r.to_dict().items() if k != "spans"}}


def print_answer(req, result) -> None:
    r = result.report
    flag = "" if r.met_deadline else " [red]MISSED[/red]"
    console.print(f"[bold]{result.label}[/bold] ({max(result.probs):.3f})  {r.latency_ms:.1f} ms of "
                  f"{r.target_ms:.0f}{flag} (planned {r.planned_ms:.1f} at {r.plan_tokens} tokens, "
                  f"stall {r.stall_ms:.1f})  model bytes peak {r.peak_model_bytes / 1e6:.2f} MB  {r.tokens} tokens"
                  + (" (truncated)" if r.truncated else "") + f"  {req.text[:60]!r}", highlight=False)
    if r.guard_changes:
        console.print(f"  deadline guard changed {len(r.guard_changes)} shards: "
                      + ", ".join(f"L{l}.S{s} {a}->{b if b else 'skip'}" for l, s, a, b in r.guard_changes[:8]))


@app.command("eval")
def eval_(store_dir: Path = typer.Argument(..., help="a store directory"),
          data: Path = typer.Option(..., help="your labelled data: " + DATA_HELP),
          latency_ms: float = typer.Option(..., help="target latency T in ms"),
          memory_mb: float = typer.Option(..., help="preload buffer budget M in MB"),
          storage: str = typer.Option("cold", help=STORAGE_HELP),
          planner: str = typer.Option("joint", help="joint (ours) or paper (STI's two stages)"),
          limit: Optional[int] = typer.Option(None, help="serve only the first N examples"),
          max_length: Optional[int] = typer.Option(None, help=MAX_LENGTH_HELP),
          calibrate: bool = typer.Option(True, help="correct the device profile on the engine first"),
          row_cache: bool = typer.Option(True, help=ROW_CACHE_HELP),
          follow: bool = typer.Option(False, help="follow the device: replan when it runs slower or faster "
                                      "than its profile"),
          slow_after: Optional[int] = typer.Option(None, help="demonstration: halve the emulated storage's "
                                                   "bandwidth before request N"),
          resize_after: Optional[str] = typer.Option(None, help="demonstration: N:MB resizes the preload budget "
                                                     "to MB before request N"),
          text_column: Optional[str] = TEXT_COLUMN, pair_column: Optional[str] = PAIR_COLUMN,
          label_column: Optional[str] = LABEL_COLUMN,
          json_out: bool = typer.Option(False, "--json", help="print the figures as JSON")) -> None:
    """Serve every example of your data through the engine: served accuracy, latency, hit and
    guard rates, peak model bytes, beside the full model's accuracy. Ctrl-C stops early and
    prints what was measured."""
    import json
    from rich.progress import Progress as Bar
    from .api import evaluate_file
    from .present import print_served
    out = notes if json_out else console
    with Bar(console=notes, transient=True) as bar:
        task = bar.add_task("serving", total=None)
        served = evaluate_file(store_dir, data, latency_ms, memory_mb, storage=storage, planner=planner, limit=limit,
                               columns=_columns(text_column, pair_column, label_column), log=out.print,
                               progress=lambda d, t: bar.update(task, completed=d, total=t) or True,
                               max_length=max_length, calibrate=calibrate, row_cache=row_cache, follow=follow,
                               slow_after=slow_after, resize_after=_resize_after(resize_after))
    if json_out:
        print(json.dumps(served.to_dict(), indent=1))
    else:
        print_served(served, console)


def _resize_after(spec: str | None) -> tuple[int, float] | None:
    if spec is None:
        return None
    try:
        n, mb = spec.split(":")
        out = int(n), float(mb)
    except ValueError:
        raise InputError(f"--resize-after takes N:MB (e.g. 200:0.5), got {spec!r}") from None
    if out[0] < 0 or not out[1] >= 0:
        raise InputError(f"--resize-after needs N >= 0 and MB >= 0, got {spec!r}")
    return out


@app.command()
def bench(store_dir: Path = typer.Argument(..., help="a store directory (of the model below)"),
          model_dir: Path = typer.Argument(..., help="the model directory the store was built from"),
          out: Path = typer.Option(Path("bench-results"), help="where to write results.json/.md and plots"),
          quick: bool = typer.Option(False, help="the demo's short sweep instead of the full one"),
          systems: Optional[str] = typer.Option(None, help="comma-separated subset of systems"),
          storages: Optional[str] = typer.Option(None, help="comma-separated storages (cold, emulate:..., skew3.6)"),
          seq_modes: Optional[str] = typer.Option(None, help="comma-separated length modes (own, pad128)"),
          targets_x: Optional[str] = typer.Option(None, help="comma-separated T as multiples of the full model's time"),
          memories_mb: Optional[str] = typer.Option(None, help="comma-separated preload budgets M in MB"),
          requests: Optional[int] = typer.Option(None, help="latency sample size per point"),
          ood_limit: Optional[int] = typer.Option(None, help="sentences per out-of-domain set for accuracy, 0 for none "
                                                  "(default 200)"),
          one_plan: bool = typer.Option(False, help="sti-joint with one plan for 48 tokens, not a plan per length"),
          calibrate: bool = typer.Option(True, help="correct the device profile on the engine at each point before planning"),
          row_cache: bool = typer.Option(True, help=ROW_CACHE_HELP),
          follow: bool = typer.Option(False, help="the planned systems' engines follow the device: they plan "
                                      "again when it runs slower or faster than its profile"),
          headroom: Optional[float] = typer.Option(None, help=HEADROOM_HELP + " (default 0.1)"),
          same_conditions_as: Optional[Path] = typer.Option(
              None, help="an earlier run's results (its directory or results.json): plan with its T units and "
              "device profiles instead of measuring new ones, to compare two stores of one shape (e.g. two "
              "roundings) on equal terms")) -> None:
    """Measure sti against the baselines and peers: accuracy, latency, deadline hits, memory."""
    from dataclasses import replace
    from .bench import BenchConfig, run_bench
    from .results import markdown, save_results, write_outputs
    cfg = BenchConfig.quick() if quick else BenchConfig()
    if systems:
        cfg = replace(cfg, systems=tuple(s.strip() for s in systems.split(",")))
    if storages:
        cfg = replace(cfg, storages=tuple(s.strip() for s in storages.split(",")))
    if seq_modes:
        cfg = replace(cfg, seq_modes=tuple(s.strip() for s in seq_modes.split(",")))
    if targets_x:
        cfg = replace(cfg, targets_x=_numbers(targets_x, "--targets-x"))
    if memories_mb:
        cfg = replace(cfg, memories_mb=_numbers(memories_mb, "--memories-mb"))
    if requests:
        cfg = replace(cfg, requests=requests)
    if ood_limit is not None:
        cfg = replace(cfg, ood_limit=ood_limit)
    if one_plan:
        cfg = replace(cfg, length_aware=False)
    if not calibrate:
        cfg = replace(cfg, calibrate=False)
    if not row_cache:
        cfg = replace(cfg, row_cache=False)
    if follow:
        cfg = replace(cfg, follow=True)
    if headroom is not None:
        if not 0.0 <= headroom < 1.0:  # (before a sweep of many minutes, not at its first plan)
            raise InputError(f"--headroom is a share of T, at least 0 and below 1, not {headroom:g}")
        cfg = replace(cfg, headroom=headroom)
    if same_conditions_as is not None:
        cfg = replace(cfg, conditions_from=str(same_conditions_as))
    # results.json is rewritten after every step, so an interrupted sweep keeps what it measured
    command = "sti " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("sti") else ""
    results = run_bench(store_dir, model_dir, cfg, log=console.print, checkpoint=lambda r: save_results(r, out),
                        command=command)
    paths = write_outputs(results, out)
    console.print(markdown(results), highlight=False)
    console.print("wrote " + ", ".join(map(str, paths)))


@app.command()
def report(results_dir: Path = typer.Argument(..., help="a directory `sti bench` wrote (results.json and plots)"),
           out: Optional[Path] = typer.Option(None, help="where to write the document (default RESULTS_DIR/RESULTS.md)")
           ) -> None:
    """Write the results document (headline table, served against planned accuracy, plots) from results.json."""
    import json
    from .atomic import atomic_write_text
    from .results import report as make_report
    f = results_dir / "results.json"
    try:
        results = json.loads(f.read_text())
    except FileNotFoundError:
        raise InputError(f"no results.json in {results_dir}: run `sti bench ... --out {results_dir}` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{f} is not valid JSON ({exc}); rerun the benchmark") from None
    out = out or results_dir / "RESULTS.md"
    try:
        text = make_report(results, results_dir, out)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{f} is not a results file of this sti (missing or odd field: {exc}); rerun the "
                         "benchmark") from None
    atomic_write_text(out, text)
    console.print(f"wrote {out}")


def _numbers(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{option}: expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"{option}: expected positive numbers, got {text!r}")
    return values


@app.command()
def demo(preset: str = typer.Option("quick", help="fine-tuning preset when no model is cached")) -> None:
    """The end-to-end demo on the built-in defaults (real model, real data)."""
    from .demo import run_demo
    run_demo(preset=preset, console=console)


def main() -> None:
    try:
        app()  # click's standalone mode handles usage errors (exit 2) itself
    except StiError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
