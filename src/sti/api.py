"""The short path from a store to answers: profiles kept beside the store, plans, engines.

    engine = sti.open_engine(store_dir, latency_ms=30, memory_mb=2, storage="cold")
    result = engine.run("a gripping, beautifully acted film")

Profiles live in `<store>/profiles/` as JSON, one device profile per (storage, sequence
length) and one importance profile per method; missing ones are measured on first use
(device: under 2 minutes; importance: a few minutes) and reused afterwards.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .errors import InputError
from .planner import Plan, make_plan
from .profiles import DeviceProfile, ImportanceProfile, load_profile, save_profile
from .storage import parse_storage
from .store import Store

DEFAULT_SEQ_LEN = 48  # plans assume this many tokens: the test split's 95th percentile is 47
# The share of T a plan keeps back: the profiles are medians on a shared, noisy machine, and
# the deadline guard spends this when a request runs late (see runtime.py).
DEFAULT_HEADROOM = 0.1


def profiles_dir(store_dir: str | Path) -> Path:
    return Path(store_dir) / "profiles"


def storage_slug(storage: str) -> str:
    mode, bandwidth, latency = parse_storage(storage)
    if mode != "emulate":
        return mode
    return f"emulate-{bandwidth / 1e6:g}MBps-{latency * 1e3:g}ms"


def device_profile_path(store_dir, storage: str) -> Path:
    """One device profile per storage mode: its compute fit covers every sequence length."""
    return profiles_dir(store_dir) / f"device-{storage_slug(storage)}.json"


def importance_profile_path(store_dir, method: str) -> Path:
    if not re.fullmatch(r"[a-z]+", method):
        raise InputError(f"unknown importance method {method!r}: use degrade or gradient")
    return profiles_dir(store_dir) / f"importance-{method}.json"


def device_profile(store_dir, storage: str = "cold", measure: bool = True, log=print) -> DeviceProfile:
    """The saved device profile for this store and storage; measured if missing."""
    path = device_profile_path(store_dir, storage)
    store_id = store_id_of(store_dir)
    if path.exists() or not measure:
        return load_profile(path, store_id)
    from .profile_device import measure_device
    log(f"measuring the device profile ({storage}) once; saved to {path}")
    profile = measure_device(store_dir, storage=storage)
    save_profile(profile, path)
    return profile


def importance_profile(store_dir, method: str = "degrade", measure: bool = True, log=print) -> ImportanceProfile:
    """The saved importance profile for this store; measured on the dev split if missing."""
    path = importance_profile_path(store_dir, method)
    store_id = store_id_of(store_dir)
    if path.exists() or not measure:
        return load_profile(path, store_id)
    from .profile_importance import measure_importance
    log(f"measuring shard importance ({method}, dev split) once; saved to {path}")
    profile = measure_importance(store_dir, method=method)
    save_profile(profile, path)
    return profile


def store_id_of(store_dir) -> str:
    with Store(store_dir) as store:
        return store.store_id


def resident_bytes(store: Store) -> int:
    """Bytes that are always resident: the per-layer records, the head, embedding misc."""
    return sum(r.length for r in store.layers.values()) + store.singles["head"].length \
        + store.singles["embed_misc"].length


def check_targets(latency_ms: float, memory_mb: float) -> None:
    for name, v, lo in (("latency", latency_ms, 0.0), ("memory", memory_mb, 0.0)):
        try:
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        except OverflowError:
            ok = False
        if not ok:
            raise InputError(f"the {name} target must be a finite number, got {str(v)[:40]}")
    if latency_ms <= 0 or latency_ms > 3.6e6:
        raise InputError(f"--latency-ms must be in (0, 3600000], got {latency_ms}")
    if memory_mb < 0 or memory_mb > 1e6:
        raise InputError(f"--memory-mb must be in [0, 1000000], got {memory_mb}")


def plan(store_dir, latency_ms: float, memory_mb: float, planner: str = "joint", storage: str = "cold",
         seq_len: int = DEFAULT_SEQ_LEN, method: str = "degrade", log=print,
         headroom: float = DEFAULT_HEADROOM) -> Plan:
    """A plan for this store under a latency target (ms) and a preload budget (MB), predicted
    to finish by (1 - headroom) * T."""
    check_targets(latency_ms, memory_mb)
    device = device_profile(store_dir, storage, log=log)
    importance = importance_profile(store_dir, method, log=log)
    with Store(store_dir) as store:
        return make_plan(device, importance, store.store_id, float(latency_ms), int(memory_mb * 1e6),
                         seq_len=seq_len, planner=planner, fixed_bytes=resident_bytes(store), headroom=headroom)


def open_engine(store_dir, latency_ms: float, memory_mb: float, storage: str = "cold", planner: str = "joint",
                seq_len: int = DEFAULT_SEQ_LEN, guard: bool = True, method: str = "degrade", log=print,
                headroom: float = DEFAULT_HEADROOM):
    """An engine ready to answer requests within `latency_ms` with a `memory_mb` preload buffer."""
    from .runtime import Engine
    p = plan(store_dir, latency_ms, memory_mb, planner, storage, seq_len, method, log, headroom)
    device = device_profile(store_dir, storage, log=log)
    return Engine(Store(store_dir, storage), p, device, storage=storage, guard=guard)
