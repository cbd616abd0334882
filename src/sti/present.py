"""What the CLI and the demo print about a model and a store (shared, so that neither
imports the other)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_grid(metrics: dict, console: Console) -> None:
    """The fine-tuned model's accuracy per submodel, its training time and target checks."""
    on = metrics.get("split", "test")
    console.print(f"teacher (full model, plain fine-tune) accuracy on {on}: {metrics['teacher_test_accuracy']:.4f}"
                  f"  [{metrics['test_size']} examples]")
    table = Table("n layers", "m shards", "rewired only", "elastic", title=f"accuracy on {on} per submodel")
    for row in metrics["grid"]:
        table.add_row(str(row["n"]), str(row["m"]), f"{row['rewired_only']:.4f}", f"{row['elastic']:.4f}")
    console.print(table)
    t = metrics["train_seconds"]
    console.print("training time: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in t.items())
                  + f" (total {metrics['total_train_seconds'] / 60:.1f} min, {metrics['torch_threads']} threads)")
    from .finetune import target_checks
    if metrics.get("data"):
        return  # the targets are the built-in task's
    for line, met in target_checks(metrics):
        console.print(f"  {'met' if met else 'MISSED':6} {line}")


def print_inspect(store_dir: Path, console: Console) -> None:
    """Sizes per bitwidth and per part of a store, beside the fp32 model's size."""
    from .store import Store
    with Store(store_dir) as s:
        sizes, c = s.sizes(), s.config
        fp32_layers = c.num_layers * c.layer_params * 4
        head_params = (c.hidden_size + 1) * (c.num_labels + (c.hidden_size if c.head_act != "none" else 0))
        fp32_total = fp32_layers + c.embedding_params * 4 + head_params * 4
        r = s.rounding
        rounding = f"GPTQ on {r['texts']} texts" if r["method"] == "gptq" else "nearest"
        console.print(f"store {store_dir}  id {s.store_id[:12]}  codec {s.codec} ({rounding} rounding)  "
                      f"bits {list(s.bits)}")
        console.print(f"model: {c.family}, {c.num_layers} layers x {c.num_shards} shards, hidden {c.hidden_size}, "
                      f"FFN {c.intermediate_size}, vocab {c.vocab_size}, up to {c.max_tokens} tokens")
        dense = f" -> dense + {c.head_act}" if c.head_act != "none" else ""
        console.print(f"head: {'mean of the tokens' if c.pooling == 'mean' else 'first token'}{dense} -> "
                      f"{c.num_labels} labels ({', '.join(c.labels)}); "
                      + ("elastic (submodels may run)" if c.elastic else "not elastic (runs whole; --allow-pruning "
                                                                          "lets plans drop shards)"), highlight=False)
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


def print_served(served, console: Console) -> None:
    """`sti eval`'s figures (an `evaluate.Served`)."""
    s = served
    title = f"{s.requests} of {s.total} requests served" + (" (interrupted)" if s.interrupted else "")
    table = Table("", "served (engine)", "full model (resident)", title=title)
    table.add_row("accuracy", f"{s.served_accuracy:.4f}", f"{s.full_accuracy:.4f}")
    if len(s.labels) > 2:
        table.add_row("macro-F1", f"{s.served_macro_f1:.4f}", f"{s.full_macro_f1:.4f}")
    console.print(table)
    lo, hi = s.hit_rate_ci
    console.print(f"latency median {s.latency_median_ms:.1f} ms, p95 {s.latency_p95_ms:.1f}, p99 "
                  f"{s.latency_p99_ms:.1f} (T = {s.target_ms:.1f} ms); within T {s.hit_rate:.1%} "
                  f"[{lo:.1%}, {hi:.1%}]; deadline guard acted on {s.guard_rate:.1%}")
    console.print(f"model bytes: peak {s.peak_model_bytes / 1e6:.2f} MB (preload buffer {s.preload_bytes / 1e6:.2f} MB)")
    for c in s.changes:
        at = f"from request {c['from_request']}" if "from_request" in c else f"at request {c['request']}"
        console.print(f"{at}: {describe_change(c)}", highlight=False)


def describe_change(c: dict) -> str:
    """One line for an engine history entry (Engine.history)."""
    if "error" in c:
        return f"replan for {c.get('drift')} failed, plans kept: {c['error']}"
    old, new = c["old"], c["new"]
    why = ("device drifted: " + ", ".join(f"{k} x{v:.2f}" for k, v in c["drift"].items())) if c["kind"] == "drift" \
        else f"new targets: T {new['target_ms']:g} ms, M {new['memory_bytes'] / 1e6:g} MB"
    return (f"{why}; replanned in {c['plan_ms']:.0f} ms, swapped in {c['swap_ms']:.0f} ms; expected accuracy "
            f"{old['expected_accuracy']:.4f} -> {new['expected_accuracy']:.4f}, preload buffer "
            f"{old['preload_bytes'] / 1e6:.2f} -> {new['preload_bytes'] / 1e6:.2f} MB")
