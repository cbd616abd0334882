"""The `sti` command: a thin layer over the Python API.

Every StiError becomes one readable line on stderr and a non-zero exit code; Ctrl-C
exits with 130 and no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import StiError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="sti: run BERT-family models within a latency target by streaming weight shards.")
console = Console()


@app.command()
def data() -> None:
    """Fetch the data (once) and print each split's size and label balance."""
    from .data import summary
    table = Table("split", "size", "positive", "negative", "positive share")
    for r in summary():
        table.add_row(r["split"], str(r["size"]), str(r["positive"]), str(r["negative"]),
                      f"{r['positive_share']:.3f}")
    console.print(table)


@app.command()
def finetune(out: Optional[Path] = typer.Option(None, help="output model directory (default: in $STI_HOME)"),
             preset: str = typer.Option("full", help="full (about 30 min on 2 cores) or quick (under 10 min)"),
             force: bool = typer.Option(False, help="retrain even if the model exists")) -> None:
    """Fine-tune the elastic (width- and depth-adaptive) sentiment model."""
    from .finetune import FinetuneConfig, default_model_dir, finetune as run, read_metrics
    cfg = FinetuneConfig.preset_named(preset)
    target = out or default_model_dir(cfg.preset)
    if force or not (target / "metrics.json").exists():
        run(out=target, cfg=cfg, log=console.print)
    else:
        console.print(f"using the cached model in {target} (--force retrains)")
    print_grid(read_metrics(target))


def print_grid(metrics: dict) -> None:
    console.print(f"teacher (full model, plain fine-tune) test accuracy: {metrics['teacher_test_accuracy']:.4f}"
                  f"  [{metrics['test_size']} test snippets]")
    table = Table("n layers", "m shards", "rewired only", "elastic", title="test accuracy per submodel")
    for row in metrics["grid"]:
        table.add_row(str(row["n"]), str(row["m"]), f"{row['rewired_only']:.4f}", f"{row['elastic']:.4f}")
    console.print(table)
    t = metrics["train_seconds"]
    console.print("training time: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in t.items())
                  + f" (total {metrics['total_train_seconds'] / 60:.1f} min, {metrics['torch_threads']} threads)")


def _bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise typer.BadParameter(f"--bits must be comma-separated integers, got {text!r}") from None


@app.command()
def build(model_dir: Path = typer.Argument(..., help="a Hugging Face-style BERT model directory"),
          store_dir: Path = typer.Argument(..., help="where to write the store"),
          bits: str = typer.Option("2,3,4,5,6,32", help="bitwidths to store every shard at"),
          codec: str = typer.Option("linear", help="linear (group-wise affine, fast decode) or gobo (the paper's)")) -> None:
    """Cut a model into shards and write every shard at every bitwidth (docs/FORMAT.md)."""
    import time
    from rich.progress import Progress as Bar
    from .store import build_store
    t0 = time.perf_counter()
    with Bar(console=console, transient=True) as bar:
        task = bar.add_task("building store", total=None)
        build_store(model_dir, store_dir, bits=_bits(bits), codec=codec,
                    progress=lambda done, total: bar.update(task, completed=done, total=total) or True)
    console.print(f"wrote {store_dir} in {time.perf_counter() - t0:.1f} s")
    _print_inspect(store_dir)


@app.command()
def inspect(store_dir: Path = typer.Argument(..., help="a store directory")) -> None:
    """Sizes per bitwidth and per part of a store, beside the fp32 model's size."""
    _print_inspect(store_dir)


def _print_inspect(store_dir: Path) -> None:
    from .store import Store
    with Store(store_dir) as s:
        sizes, c = s.sizes(), s.config
        fp32_layers = c.num_layers * c.layer_params * 4
        fp32_total = fp32_layers + c.embedding_params * 4 + (c.hidden_size + 1) * c.num_labels * 4
        console.print(f"store {store_dir}  id {s.store_id[:12]}  codec {s.codec}  bits {list(s.bits)}")
        console.print(f"model: {c.num_layers} layers x {c.num_shards} shards, hidden {c.hidden_size}, "
                      f"FFN {c.intermediate_size}, vocab {c.vocab_size}")
        table = Table("part", "bytes", "MB", "vs fp32 of the part")
        shard_fp32 = sizes["shards_by_bits"].get(32)
        for b, n in sizes["shards_by_bits"].items():
            ratio = f"{n / shard_fp32:.3f}" if shard_fp32 else "-"
            table.add_row(f"encoder shards at {b} bits", f"{n:,}", f"{n / 1e6:.2f}", ratio)
        for key in ("layer_shared", "embeddings_word", "embeddings_other", "head"):
            table.add_row(key.replace("_", " "), f"{sizes[key]:,}", f"{sizes[key] / 1e6:.2f}", "1.000")
        table.add_row("store.bin (all, with 4 KiB alignment)", f"{sizes['data_file']:,}",
                      f"{sizes['data_file'] / 1e6:.2f}", f"{sizes['data_file'] / fp32_total:.2f} x whole fp32 model")
        console.print(table)
        console.print(f"fp32 model for comparison: {fp32_total / 1e6:.2f} MB "
                      f"(encoder layers {fp32_layers / 1e6:.2f} MB)")


@app.command()
def demo(preset: str = typer.Option("quick", help="fine-tuning preset when no model is cached")) -> None:
    """The end-to-end demo on the built-in defaults (real model, real data)."""
    from .demo import run_demo
    run_demo(preset=preset, console=console)


def main() -> None:
    try:
        app()  # click's standalone mode handles usage errors (exit 2) itself
    except StiError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
