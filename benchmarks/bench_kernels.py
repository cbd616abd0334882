"""Which arithmetic is fast on this CPU? One linear of MiniLM's fused QKV size, per kernel.

Issue 19's plan for an engine faster than the resident fp32 model rests on a kernel that
multiplies faster than float32 here: bfloat16 weights and activations, or torch's packed
int4 kernel (`_weight_int4pack_mm_for_cpu`, which computes on 4-bit codes without a decode),
or its int8 one. This times each on one 384 -> 1152 linear (MiniLM's q, k and v together),
1 torch thread, median of --repeat calls after a warm-up, at 26 tokens (the test split's
median request) and 128 (the paper's padding), and prints each kernel's time as a ratio to
float32's measured in the same run. The device profile makes the same choice for the engine
by timing whole layers (`sti.profile_device.choose_dtype`); this isolates the kernels.

    .venv/bin/python benchmarks/bench_kernels.py [--repeat 200]

Writes benchmarks/results/kernels.json (with the CPU's flags that matter: avx512*, amx*).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_groups import median_ms

OUT = Path(__file__).resolve().parent / "results" / "kernels.json"
IN, OUT_FEATURES, GROUP = 384, 1152, 128


def kernels(w: torch.Tensor):
    """name -> (activation dtype, function of x, the float32 weights it stands for): the
    linear by each kernel."""
    out = {"float32": (torch.float32, lambda x: F.linear(x, w), w)}
    wb = w.bfloat16()
    out["bfloat16"] = (torch.bfloat16, lambda x: F.linear(x, wb), wb.float())
    # int4: asymmetric per-group codes, as the linear codec's (scale and zero per GROUP inputs)
    groups = w.reshape(OUT_FEATURES, IN // GROUP, GROUP)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    codes = torch.clamp(torch.round((groups - lo[..., None]) / scale[..., None]), 0, 15)
    decoded = (codes * scale[..., None] + lo[..., None]).reshape(OUT_FEATURES, IN)
    codes = codes.to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.reshape(OUT_FEATURES, IN), 1)
    # torch's int4 kernel decodes (code - 8) * scale + zero: its zero is the value of code 8
    sz = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().bfloat16()
    out["int4pack (bf16 activations)"] = (
        torch.bfloat16, lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, IN), packed, GROUP, sz),
        decoded)
    # int8: symmetric per-row codes
    s8 = w.abs().amax(1) / 127
    q8 = torch.round(w / s8[:, None]).to(torch.int8)
    out["int8pack (fp32 activations)"] = (
        torch.float32, lambda x: torch.ops.aten._weight_int8pack_mm(x.reshape(-1, IN), q8, s8),
        q8.float() * s8[:, None])
    return out


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma", "avx_vnni"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = torch.randn(OUT_FEATURES, IN) * 0.05
    rows = []
    with torch.inference_mode():
        for tokens in (26, 128):
            x = torch.randn(tokens, IN)
            base = None
            for name, (dtype, fn, weights) in kernels(w).items():
                xd = x.to(dtype)
                ms = median_ms(lambda: fn(xd), args.repeat)
                base = ms if base is None else base
                # the kernel computes what it should: against float32 arithmetic on its own weights
                ref = F.linear(xd.float(), weights)
                err = ((fn(xd).float() - ref).abs().max() / ref.abs().max()).item()
                if err > 2e-2:  # a wrong packing or scale convention, not a timing to publish
                    raise SystemExit(f"{name} is {err:.1e} of the output's range off its own weights")
                rows.append({"tokens": tokens, "kernel": name, "median_ms": ms, "ratio_to_float32": ms / base,
                             "max_error_vs_its_weights": err})
                print(f"{tokens:4} tokens  {name:30} {ms:7.3f} ms  {ms / base:5.2f}x float32  "
                      f"(max error {err:.1e} of the output's range)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                    "cpu_flags": cpu_flags(), "machine": platform.machine(), "threads": 1,
                                    "shape": [IN, OUT_FEATURES], "repeat": args.repeat, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
