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
