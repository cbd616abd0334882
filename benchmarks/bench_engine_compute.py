"""Does the engine compute as fast as the resident model? (issue: engine compute)

For each model and bitwidth, the engine runs the whole model (every layer, every shard) from
the preload buffer (no IO: warm storage, everything preloaded, deadline guard off, 1 torch
thread), one request at a time, beside the fused resident model on the same sentence:
  - `sti fp32`: sti's own encoder (`sti.encoder.classify`) on the fp32 weights (the T unit);
  - `hf fp32` and `hf bf16`: transformers' BertModel forward, in float32 and in bfloat16.
The engine and the fused models take turns in blocks of 20 requests, and the ratio (engine
over `sti fp32`) is the median over blocks of each block's median ratio, so both sides of a
ratio ran under the same machine conditions.
Over the first --requests test sentences at their own lengths, and padded to 128 tokens.

Models: the real MiniLM store ($STI_HOME/stores/minilm-l6-rt-elastic-full-linear, or
--store) and a random-weight BERT-base store of bits 4 and 32 (built once under
$STI_HOME/scale/bert-base-compute; --no-bert-base skips it).

The engine runs in each compute dtype of --dtypes (float32 and bfloat16) and in the one its
device profile chooses ("auto", `sti.profile_device.choose_dtype`); the top-level ratios are
those of the chosen one. Writes benchmarks/results/engine_compute.json; top-level keys
`ratio_own_32bit`, `ratio_own_4bit`, `ratio_pad128_4bit` (MiniLM), `compute_dtype`. It uses only APIs that predate the grouped
compute path too, so the same file run against an older checkout (PYTHONPATH=OLD/src)
measures "before".

    .venv/bin/python benchmarks/bench_engine_compute.py [--requests 200] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from sti import api
from sti.assets import ensure_model, sti_home
from sti.bench import fixed_plan
from sti.config import PRESETS
from sti.data import load_split
from sti.encoder import classify
from sti.profile_device import machine, measure_device
from sti.runtime import Engine
from sti.store import Store, build_store
from sti.tokenizer import Tokenizer
from sti.weights import ModelWeights

OUT = Path(__file__).resolve().parent / "results" / "engine_compute.json"


def whole_plan(store_dir: Path, bits: int, device, seq_len: int):
    """Every layer and shard at `bits`, all of it preloaded (no IO, no planning)."""
    importance = api.importance_profile(store_dir, log=lambda *a: None) if _has_importance(store_dir) else None
    with Store(store_dir) as s:
        c, fixed = s.config, api.resident_bytes(s)
        store_id = s.store_id
    layers, m = tuple(range(c.num_layers)), c.num_shards
    importance = importance or _flat_importance(store_id, c, device)
    plan = fixed_plan(device, importance, store_id, layers, m, [[bits] * m for _ in layers], seq_len, fixed,
                      c.hidden_size, "whole")
    preload = tuple((layer, j, bits) for layer in layers for j in range(m))
    return dataclasses.replace(plan, choice=dataclasses.replace(plan.choice, preload=preload),
                               request=dataclasses.replace(plan.request, memory_bytes=1 << 40))


def _has_importance(store_dir: Path) -> bool:
    return any((store_dir / "profiles").glob("importance-*.json"))


def _flat_importance(store_id: str, c, device):
    from sti.profiles import ImportanceProfile
    return ImportanceProfile(store_id=store_id, method="degrade", split="dev", seed=0, lowest_bits=min(device.bits),
                             full_accuracy=0.5, submodel_accuracy={f"{c.num_layers},{c.num_shards}": 0.5},
                             shard_kl=tuple(tuple(0.0 for _ in range(c.num_shards)) for _ in range(c.num_layers)),
                             shard_acc_drop=None, bits_error={b: 0.0 for b in device.bits}, kl_to_acc=0.0)


def hf_models(model_dir: Path | None, weights: ModelWeights):
    """transformers' BertModel with these weights, float32 and bfloat16 (None without a model dir)."""
    if model_dir is None:
        return None
    import transformers
    fp32 = transformers.AutoModel.from_pretrained(model_dir).eval()
    bf16 = transformers.AutoModel.from_pretrained(model_dir, torch_dtype=torch.bfloat16).eval()
    return {"hf fp32": fp32, "hf bf16": bf16}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


BLOCK = 20  # requests per turn: engine and fused models take turns in blocks, not sentence by
            # sentence (the fused model sweeping 90 MB of weights between two engine requests
            # would evict the engine's preload buffer from the caches, which no user sees)


def measure(store_dir: Path, bits: int, texts: list[str], pad_to: int | None, weights, hf, device) -> dict:
    plan = whole_plan(store_dir, bits, device, 48)
    tok = Tokenizer(store_dir)
    batches = [tok.encode([t], pad_to=pad_to) for t in texts]
    runs = {"engine": [], "sti fp32": [], **{k: [] for k in (hf or {})}}
    peaks, turns, logits = [], [], {}
    with Engine(Store(store_dir, "warm"), plan, device, storage="warm", guard=False, threads=1, pad_to=pad_to) as e:
        e.run(texts[0])
        for start in range(0, len(texts), BLOCK):
            block = range(start, min(start + BLOCK, len(texts)))
            turn = {}
            for name in runs:
                if name == "engine":
                    def serve(i):
                        result = e.run(texts[i])
                        peaks.append(result.report.peak_model_bytes)
                        logits[i] = result.logits
                    reports = [timed(lambda i=i: serve(i)) for i in block]
                    turn[name] = reports
                    continue
                model = weights if name == "sti fp32" else hf[name]
                with torch.inference_mode():
                    for i in list(block)[:2]:  # warm the caches with this model's weights
                        _forward(name, model, batches[i])
                    turn[name] = [timed(lambda i=i: _forward(name, model, batches[i])) for i in block]
            for name, ms in turn.items():
                runs[name].extend(ms)
            turns.append(statistics.median(turn["engine"]) / statistics.median(turn["sti fp32"]))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"bits": bits, "seq": "own" if pad_to is None else f"pad{pad_to}", "requests": len(texts),
            "engine_median_ms": med.pop("engine"), "fused_median_ms": med,
            "ratio": statistics.median(turns), "ratio_per_block": [round(t, 3) for t in turns],
            "ratio_vs_hf_bf16": (statistics.median(runs["engine"]) / med["hf bf16"]) if "hf bf16" in med else None,
            "peak_model_bytes": max(peaks), "compute_dtype": getattr(device, "compute_dtype", "float32"),
            "logits": [logits[i].tolist() for i in range(len(texts))]}


def dtype_agreement(rows: list[dict]) -> list[dict]:
    """bfloat16 against float32, for each (model, bits, lengths) run in both: how many
    answers agree and how far apart the logits are (the cost of bfloat16's arithmetic)."""
    out = []
    for r in rows:
        twin = next((t for t in rows if t["compute_dtype"] == "float32" and r["compute_dtype"] == "bfloat16"
                     and (t["model"], t["bits"], t["seq"]) == (r["model"], r["bits"], r["seq"])), None)
        if twin is None:
            continue
        a, b = torch.tensor(r["logits"]), torch.tensor(twin["logits"])
        d = (a - b).abs()
        out.append({"model": r["model"], "bits": r["bits"], "seq": r["seq"], "requests": len(a),
                    "labels_agree": int((a.argmax(-1) == b.argmax(-1)).sum()),
                    "max_abs_logit_diff": d.max().item(), "median_abs_logit_diff": d.median().item()})
    return out


def _forward(name: str, model, batch):
    if name == "sti fp32":
        return classify(model, batch.input_ids, batch.attention_mask)
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)


def bert_base_store() -> Path:
    path = sti_home() / "scale" / "bert-base-compute"
    if not (path / "manifest.json").exists():
        weights = ModelWeights.random(PRESETS["bert-base"], seed=0)
        print(f"building {path} (random BERT-base, bits 4 and 32) ...", flush=True)
        build_store(weights, path, bits=(4, 32), tokenizer_from=ensure_model(lambda *a: None))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=sti_home() / "stores" / "minilm-l6-rt-elastic-full-linear")
    ap.add_argument("--model", type=Path, default=sti_home() / "models" / "minilm-l6-rt-elastic-full")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--no-bert-base", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="the engine's compute dtypes to run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    texts = [e.text for e in load_split("test")[:args.requests]]
    rows = []
    with Store(args.store) as s:
        weights = s.load_model(32)
    hf = hf_models(args.model if args.model.exists() else None, weights)
    device = measure_device(args.store, storage="warm", seq_len=48, threads=1, samples=8, repeat=5)
    chosen = {"minilm": device.compute_dtype}
    for dtype in dict.fromkeys([*args.dtypes, device.compute_dtype]):
        dev = dataclasses.replace(device, compute_dtype=dtype)
        for bits, pad in ((32, None), (4, None), (32, 128), (4, 128)):
            rows.append({"model": "minilm", **measure(args.store, bits, texts, pad, weights, hf, dev)})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "logits"}), flush=True)
    if not args.no_bert_base:
        store = bert_base_store()
        with Store(store) as s:
            weights = s.load_model(32)
        device = measure_device(store, storage="warm", seq_len=48, threads=1, samples=8, repeat=5)
        chosen["bert-base (random)"] = device.compute_dtype
        for bits in (32, 4):
            rows.append({"model": "bert-base (random)", **measure(store, bits, texts[:60], None, weights, None, device)})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "logits"}), flush=True)
    # the top-level ratios are of the dtype the device profile chose ("auto"), as users run it
    key = {(r["model"], r["bits"], r["seq"]): r["ratio"] for r in rows if r["compute_dtype"] == chosen[r["model"]]}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result = {"compute_dtype": chosen, "ratio_own_32bit": key[("minilm", 32, "own")], "ratio_own_4bit": key[("minilm", 4, "own")],
              "ratio_pad128_4bit": key[("minilm", 4, "pad128")],
              "ratio_bert_base_4bit": key.get(("bert-base (random)", 4, "own")),
              "bf16_vs_fp32": dtype_agreement(rows),
              "rows": [{k: v for k, v in r.items() if k != "logits"} for r in rows], "conditions": {"machine": machine(), "torch_threads": 1, "storage": "warm, all preloaded",
                                           "guard": False, "sti_source": str(Path(sys.modules["sti"].__file__).parent),
                                           "commit": commit,
                                           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for d in result["bf16_vs_fp32"]:
        print(f"bf16 vs fp32, {d['model']} {d['bits']}-bit {d['seq']}: {d['labels_agree']}/{d['requests']} labels agree, "
              f"max |logit diff| {d['max_abs_logit_diff']:.4f}")
    print(f"ratios (engine / sti fp32, median per sentence): own 32-bit {result['ratio_own_32bit']:.2f}, "
          f"own 4-bit {result['ratio_own_4bit']:.2f}, pad128 4-bit {result['ratio_pad128_4bit']:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
