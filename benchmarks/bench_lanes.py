"""How the engine's IO threads slow its compute lane (the figures in docs/PROFILES.md).

    .venv/bin/python benchmarks/bench_lanes.py [--store DIR] [--storage emulate:100MB/s]

Three measurements, in one run, one torch thread:
  0. how late a 0.3 ms sleep ends, with Linux's default 50 us timer slack and with the 1 ns
     the emulated storage asks for (each in a fresh thread: the setting is per thread);
  1. one layer (6 shards at 4 bits, 28 tokens, cycling through 4 layers) timed alone and
     beside a background thread doing Python work of different shapes: a plain sleep loop,
     0.1 ms of Python spin before each 0.5 ms sleep (what the emulated reader once did), a
     shard-head decode before each 0.5 ms sleep (what the decoder does), and a tight decode
     loop, in a thread and in another process; and a loop copying a 42 MB buffer a 1.5 MB
     slab at a time into one slab (what the decoder does with 32-bit preloaded shards), in a
     thread and in another process.
     The compute lane takes the GIL back after every torch op; a thread that holds it then,
     or must be woken for it, costs the layer time, while another process shares only the
     cores and the memory (what an IO process, issue 19's open option, would cost; the copy
     shows what sharing the memory alone costs);
  2. the engine at T = 18.4 and 40 ms (M = 2 MB, 40 test sentences, guard off, a profile
     measured in the same run): each layer's compute-lane time over the profile's
     prediction, per layer position (median over requests). The IO lane is busiest during
     the first layers and done before the last.
Writes benchmarks/results/lanes.json and prints both tables.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import threading
import time
from pathlib import Path

import numpy as np
import torch

from sti import api
from sti.atomic import atomic_write_json
from sti.data import load_split
from sti.encoder import attention_keep
from sti.groups import layer_by_groups
from sti.planning import PlanError, make_plan
from sti.profile_device import Background, first_shards, layer_groups, machine, measure_device, median_ms
from sti.runtime import Engine
from sti.storage import _fine_timer_slack
from sti.store import Store
from sti.weights import ATTN_PARTS

OUT = Path(__file__).parent / "results" / "lanes.json"


def default_store() -> Path:
    from sti.assets import sti_home
    return sti_home() / "stores" / "minilm-l6-rt-elastic-full-linear"


def spin(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def sleep_overshoot_us(fine: bool, count: int = 300) -> float:
    """Median microseconds a 0.3 ms sleep overruns, in a new thread (fine: 1 ns timer slack)."""
    out = []

    def run() -> None:
        if fine:
            _fine_timer_slack()
        for _ in range(count):
            t = time.perf_counter()
            time.sleep(3e-4)
            out.append((time.perf_counter() - t - 3e-4) * 1e6)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return float(np.median(out))


def _decode_until(store_dir: str, ready, stop) -> None:
    """The tight head-decode loop, in a process of its own, until `stop` is set (`ready` set
    after the first decode)."""
    with Store(store_dir) as s:
        rec = s.shard_record(5, 0, 4)
        buf = s.read(rec)
        s.decode_parts(rec, buf, ATTN_PARTS)
        ready.set()
        while not stop.is_set():
            s.decode_parts(rec, buf, ATTN_PARTS)


MODEL_BYTES = 42 << 20   # about the fp32 MiniLM encoder: the preload buffer at 32 bits
SLAB_BYTES = 3 << 19     # about one shard group's slab


class Copier:
    """What the decoder does with 32-bit shards: copy the preload buffer, a slab at a time,
    into a slab (the buffer streams from memory, the slab stays in cache)."""

    def __init__(self):
        self.src, self.dst = np.ones(MODEL_BYTES, np.uint8), np.zeros(SLAB_BYTES, np.uint8)
        self.at = 0

    def __call__(self) -> None:
        np.copyto(self.dst, self.src[self.at:self.at + SLAB_BYTES])
        self.at = (self.at + SLAB_BYTES) % (MODEL_BYTES - SLAB_BYTES)


def _copy_until(_, ready, stop) -> None:
    """The copy loop, in a process of its own, until `stop` is set."""
    copy = Copier()
    copy()
    ready.set()
    while not stop.is_set():
        copy()


class BackgroundProcess:
    """A background loop in another process for the span of a `with` block: the tight
    head-decode loop (`store_dir`) or the preload buffer's copy (`copy`); a loop that never
    started or died is an error, not a quiet "no load"."""

    def __init__(self, store_dir: Path | None = None, copy: bool = False):
        ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no torch threads forked
        self._ready, self._stop = ctx.Event(), ctx.Event()
        target, arg = (_copy_until, None) if copy else (_decode_until, str(store_dir))
        self._proc = ctx.Process(target=target, args=(arg, self._ready, self._stop), daemon=True)

    def __enter__(self) -> "BackgroundProcess":
        self._proc.start()
        if not self._ready.wait(120):
            self._proc.terminate()
            raise RuntimeError("the background process did not start its loop within 120 s")
        return self

    def __exit__(self, *exc) -> None:
        alive = self._proc.is_alive()
        self._stop.set()
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.terminate()
        if exc[0] is None and (not alive or self._proc.exitcode != 0):
            raise RuntimeError(f"the background process died during the timing (exit code {self._proc.exitcode})")


def beside_loads(store: Store, repeat: int = 40) -> dict[str, float]:
    """Median ms of one layer alone and beside each background load."""
    x, keep = torch.randn(1, 28, store.config.hidden_size), attention_keep(torch.ones(1, 28))
    layers = layer_groups(store, range(4), "float32")
    turn = itertools.cycle(layers)

    def layer() -> None:
        with torch.inference_mode():
            attn, ffn, shared = next(turn)
            layer_by_groups(x, keep, first_shards(attn, 6, len(attn[0].shards)), first_shards(ffn, 6, len(ffn[0].shards)),
                            shared, store.config)
    rec = store.shard_record(5, 0, 4)
    buf = store.read(rec)
    decode = lambda: store.decode_parts(rec, buf, ATTN_PARTS)  # noqa: E731
    loads = {"alone": None,
             "sleep 0.5 ms loop": lambda: time.sleep(5e-4),
             "0.1 ms spin + 0.5 ms sleep": lambda: (spin(0.1), time.sleep(5e-4)),
             "head decode + 0.5 ms sleep": lambda: (decode(), time.sleep(5e-4)),
             "tight head-decode loop": decode,
             "tight head-decode loop, another process": "process",
             "32-bit copy loop": Copier(),
             "32-bit copy loop, another process": "copy process",
             "alone, again last": None}
    out = {}
    for name, work in loads.items():
        layer()
        if work is None:
            out[name] = median_ms(layer, repeat)
        else:
            procs = {"process": lambda: BackgroundProcess(store.path),
                     "copy process": lambda: BackgroundProcess(copy=True)}
            with procs[work]() if isinstance(work, str) else Background(work):
                out[name] = median_ms(layer, repeat)
    return out


def per_layer(store_dir: Path, storage: str, target_ms: float, texts: list[str]) -> dict:
    """The engine's compute-lane time over the profile's, per layer position."""
    with Store(store_dir) as s:
        store_id, fixed = s.store_id, api.resident_bytes(s)
    device = measure_device(store_dir, storage=storage, seq_len=48)
    try:
        plan = make_plan(device, api.importance_profile(store_dir, log=lambda *a: None), store_id, target_ms,
                         int(2e6), seq_len=48, fixed_bytes=fixed, headroom=api.DEFAULT_HEADROOM)
    except PlanError as exc:  # the machine is slower now than T allows: say so, keep the rest
        return {"target_ms": target_ms, "note": f"no plan: {exc}"}
    ratios = []
    with Engine(Store(store_dir, storage), plan, device, storage=storage, guard=False) as engine:
        engine.run(texts[0])
        for text in texts:
            r = engine.run(text).report
            ratios.append([lr.compute_ms / max(1e-6, device.compute_ms(len(lr.shard_ids), r.tokens))
                           for lr in r.layers])
    return {"target_ms": target_ms, "n": plan.choice.n, "m": plan.choice.m, "preloaded": len(plan.choice.preload),
            "ratio_per_layer": [round(float(v), 3) for v in np.median(np.array(ratios), axis=0)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=None, help="default: the full-preset store in $STI_HOME")
    ap.add_argument("--storage", default="emulate:100MB/s")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    store_dir = args.store or default_store()
    torch.set_num_threads(1)
    overshoot = {"default slack": sleep_overshoot_us(False), "1 ns slack": sleep_overshoot_us(True)}
    print("a 0.3 ms sleep ends late by (median us): " + ", ".join(f"{k} {v:.0f}" for k, v in overshoot.items()))
    with Store(store_dir) as store:
        loads = beside_loads(store)
    print("one layer (6 shards, 4 bits, 28 tokens), median ms:")
    for name, ms in loads.items():
        print(f"  {name:40s} {ms:6.3f}  ({ms / loads['alone']:.2f}x)")
    texts = [e.text for e in load_split("test")[:40]]
    engine = [per_layer(store_dir, args.storage, t, texts) for t in (18.4, 40.0)]
    print(f"engine at {args.storage}, M = 2 MB, compute lane over profile per layer (median of 40 requests):")
    for e in engine:
        print(f"  T = {e['target_ms']} ms, " + (e["note"] if "note" in e else
              f"plan {e['n']} x {e['m']} ({e['preloaded']} preloaded): {e['ratio_per_layer']}"))
    atomic_write_json({"conditions": {"machine": machine(), "torch_threads": 1, "storage": args.storage,
                                      "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
                       "sleep_overshoot_us": overshoot, "layer_beside_loads_ms": loads, "engine_per_layer": engine}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
