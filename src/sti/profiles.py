"""Profiles: what this device can do (DeviceProfile) and which shards matter
(ImportanceProfile). Both are measured once and saved as JSON; the planner reads them.

This module holds the two schemas (frozen dataclasses, JSON in and out, validated on load
because profile files are untrusted input) and the models the planner uses:
  - IO time of a shard at b bits = read + decode (the runtime's IO thread does both);
  - compute time of one layer with m shards at sequence length L, a least-squares fit
    t = c0 + c1*L + c2*m*L + c3*m*L^2 [+ c4*m] (linear projections grow with m*L, attention
    scores with m*L^2, LayerNorms and residuals with L; c4 is the fixed cost of each shard:
    its kernel launches and the decoding of its FFN slice);
  - predicted accuracy of a plan = dev accuracy of its (n, m) submodel at full precision
    - kl_to_acc * sum over streamed or preloaded shards of shard_kl * bits_error[bits].
The measuring code is in profile_device.py and profile_importance.py.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import atomic_write_json
from .encoder import grid_key
from .errors import StiError
from .untrusted import Checks

# device 2: decode covers the whole shard (heads and FFN), compute runs in shard groups
VERSIONS = {"device": 2, "importance": 1}
COMPUTE_DTYPES = ("float32", "bfloat16")
MAX_PROFILE_BYTES = 4 << 20


class ProfileError(StiError):
    """A profile file is missing, malformed, or made for another store."""


CHECK = Checks(ProfileError)


def _num(v, where: str, lo: float = 0.0, hi: float = 1e12) -> float:
    return CHECK.num(v, where, lo, hi)


def _dtype(v, where: str) -> str:
    if v not in COMPUTE_DTYPES:
        raise ProfileError(f"{where}: expected one of {', '.join(COMPUTE_DTYPES)}, got {v!r}")
    return v


def _dtypes_map(d, where: str) -> dict:
    if not isinstance(d, dict) or len(d) > len(COMPUTE_DTYPES):
        raise ProfileError(f"{where}: expected an object keyed by compute dtype")
    return d


def _bits_map(d, where: str, lo: float = 0.0) -> dict[int, float]:
    if not isinstance(d, dict) or not d or len(d) > 16:
        raise ProfileError(f"{where}: expected an object keyed by bitwidth")
    out = {}
    for k, v in d.items():
        try:
            b = int(k)
        except (TypeError, ValueError):
            raise ProfileError(f"{where}: key {k!r} is not a bitwidth") from None
        if not 1 <= b <= 32:
            raise ProfileError(f"{where}: bitwidth {b} outside 1..32")
        out[b] = _num(v, f"{where}[{b}]", lo)
    return out


def _profiled_tokens(width: int, distinct: int, rows_per_block: int) -> float:
    """How many of the profile's embedding-read tokens (a random word and a position each,
    1 + 1/r pages) cost what reading `distinct` words and positions 0..width-1 costs."""
    r = max(1, rows_per_block)
    return (distinct + width / r) / (1 + 1 / r)


@dataclass(frozen=True)
class DeviceProfile:
    store_id: str
    storage: str                      # "cold", "warm" or "emulate:<MB/s>MB/s[,<ms>ms]"
    threads: int
    seq_len: int                      # the sequence length the compute figures were centred on
    shard_bytes: dict[int, float]     # bytes of one shard record per bitwidth
    shard_read_ms: dict[int, float]   # median read time of one shard record per bitwidth
    shard_decode_ms: dict[int, float] # median decode time of one shard per bitwidth
    layer_read_ms: float              # the per-layer record (LayerNorms, output biases)
    compute_coef: tuple[float, ...]   # c0..c3 (and optionally c4): see module docstring
    compute_fit_error: float          # median relative error of the fit on the measurements
    embed_ms: tuple[float, float]     # reading the embedding rows: fixed + per token (ms)
    head_ms: float                    # embeddings LayerNorm + pooling + classifier (ms)
    io_under_load: bool = False       # IO timed beside a running compute lane (as in the engine)
    compute_dtype: str = "float32"    # the dtype the engine decodes into and multiplies in (groups.py)
    dtype_layer_ms: dict = field(default_factory=dict)  # a whole layer in each dtype, when it was chosen by timing
    # what the first executed layer costs in the engine beyond compute_ms (0 until calibrated on
    # the engine, calibrate.py; `calibrated` then says how: scale, probe requests, raw profile)
    first_layer_ms: float = 0.0
    # what a request costs before its lanes start (tokenizing it, setting up its report and
    # its lanes), which the request's clock counts: both lanes start this late (0 until
    # calibrated on the engine)
    setup_ms: float = 0.0
    calibrated: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    created: str = ""
    version: int = VERSIONS["device"]

    def io_ms(self, bits: int) -> float:
        """IO-lane time of one shard at `bits`: read it, then decode it."""
        return self.shard_read_ms[bits] + self.shard_decode_ms[bits]

    def compute_ms(self, m: int, seq_len: int | None = None) -> float:
        """Compute time of one layer holding m shards."""
        if m <= 0:
            return 0.0
        length = seq_len or self.seq_len
        c0, c1, c2, c3, *c4 = self.compute_coef
        per_shard = c4[0] * m if c4 else 0.0
        return max(0.0, c0 + c1 * length + c2 * m * length + c3 * m * length * length + per_shard)

    def layer_ms(self, m: int, seq_len: int | None, pos: int) -> float:
        """Time of the `pos`-th executed layer holding m shards: its compute, and for the
        first one the engine's extra cost (`first_layer_ms`, set by calibration)."""
        return self.compute_ms(m, seq_len) + (self.first_layer_ms if pos == 0 else 0.0)

    def embed_read_ms(self, seq_len: int | None = None) -> float:
        fixed, per_token = self.embed_ms
        return fixed + per_token * (seq_len or self.seq_len)

    def embed_rows_ms(self, width: int, distinct: int, rows_per_block: int, positions: bool = True) -> float:
        """Reading the rows of `distinct` words and (with `positions`; not when they are
        resident) of positions 0..width-1 when a store page holds `rows_per_block` rows. The
        profile timed n random words and n positions, about n (1 + 1/r) pages, so a page
        costs per_token / (1 + 1/r); positions are contiguous (width / r pages), a padded
        request's words are its distinct tokens. Nothing to read costs nothing."""
        fixed, per_token = self.embed_ms
        if distinct <= 0 and not positions:
            return 0.0
        return fixed + per_token * _profiled_tokens(width if positions else 0, distinct, rows_per_block)

    def embed_tokens(self, width: int, distinct: int, rows_per_block: int) -> int:
        """The token count whose `embed_read_ms` covers `embed_rows_ms(width, distinct, r)`."""
        return min(width, math.ceil(_profiled_tokens(width, distinct, rows_per_block) - 1e-9))

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(sorted(self.shard_read_ms))

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("shard_bytes", "shard_read_ms", "shard_decode_ms"):
            d[k] = {str(b): v for b, v in d[k].items()}
        d["kind"] = "device"
        if not self.setup_ms:
            del d["setup_ms"]  # (profiles measured before it existed keep their ids, and the plans made with them)
        return d

    @staticmethod
    def from_dict(d: dict, where: str = "device profile") -> "DeviceProfile":
        _check_header(d, "device", where)
        try:
            coef = tuple(_num(x, f"{where}.compute_coef", -1e6, 1e6) for x in d["compute_coef"])
            embed = tuple(_num(x, f"{where}.embed_ms") for x in d["embed_ms"])
            if len(coef) not in (4, 5) or len(embed) != 2:
                raise ProfileError(f"{where}: compute_coef needs 4 or 5 numbers and embed_ms 2")
            p = DeviceProfile(
                store_id=CHECK.text(d["store_id"], f"{where}.store_id"), storage=CHECK.text(d["storage"], f"{where}.storage"),
                threads=int(_num(d["threads"], f"{where}.threads", 1, 1024)),
                seq_len=int(_num(d["seq_len"], f"{where}.seq_len", 1, 1 << 16)),
                shard_bytes=_bits_map(d["shard_bytes"], f"{where}.shard_bytes"),
                shard_read_ms=_bits_map(d["shard_read_ms"], f"{where}.shard_read_ms"),
                shard_decode_ms=_bits_map(d["shard_decode_ms"], f"{where}.shard_decode_ms"),
                layer_read_ms=_num(d["layer_read_ms"], f"{where}.layer_read_ms"),
                compute_coef=coef, compute_fit_error=_num(d["compute_fit_error"], f"{where}.compute_fit_error"),
                embed_ms=embed, head_ms=_num(d["head_ms"], f"{where}.head_ms"),
                io_under_load=d.get("io_under_load", False) is True,
                compute_dtype=_dtype(d.get("compute_dtype", "float32"), f"{where}.compute_dtype"),
                dtype_layer_ms={_dtype(k, f"{where}.dtype_layer_ms"): _num(v, f"{where}.dtype_layer_ms[{k}]")
                                for k, v in _dtypes_map(d.get("dtype_layer_ms", {}), f"{where}.dtype_layer_ms").items()},
                first_layer_ms=_num(d.get("first_layer_ms", 0.0), f"{where}.first_layer_ms"),
                setup_ms=_num(d.get("setup_ms", 0.0), f"{where}.setup_ms", 0.0, 1e6),
                calibrated=d.get("calibrated") if isinstance(d.get("calibrated"), dict) else {},
                machine=d.get("machine") if isinstance(d.get("machine"), dict) else {},
                created=str(d.get("created", ""))[:64])
        except KeyError as exc:
            raise ProfileError(f"{where}: missing field {exc}") from None
        except TypeError as exc:
            raise ProfileError(f"{where}: malformed ({exc})") from None
        if not (set(p.shard_bytes) == set(p.shard_read_ms) == set(p.shard_decode_ms)):
            raise ProfileError(f"{where}: the per-bitwidth tables cover different bitwidths")
        return p


@dataclass(frozen=True)
class ImportanceProfile:
    store_id: str
    method: str                        # "degrade" or "gradient"
    split: str
    seed: int
    lowest_bits: int
    full_accuracy: float               # dev accuracy, full model, every shard at 32 bits
    submodel_accuracy: dict[str, float]  # "n,m" -> dev accuracy of that submodel at 32 bits
    shard_kl: tuple[tuple[float, ...], ...]  # [layer][shard]: importance (mean KL of the logits)
    shard_acc_drop: tuple[tuple[float, ...], ...] | None  # [layer][shard]: accuracy drop (degrade)
    bits_error: dict[int, float]       # relative weight error at b bits, 1.0 at lowest_bits, 0 at 32
    kl_to_acc: float                   # accuracy lost per unit of summed shard_kl (calibrated)
    cost_s: float = 0.0
    created: str = ""
    version: int = VERSIONS["importance"]
    data: dict | None = None           # a user's data file it was measured on: path, sha256, size, examples

    @property
    def num_layers(self) -> int:
        return len(self.shard_kl)

    @property
    def num_shards(self) -> int:
        return len(self.shard_kl[0])

    def submodel_acc(self, n: int, m: int) -> float:
        return self.submodel_accuracy.get(grid_key(n, m), 0.0)

    def shard_penalty(self, layer: int, shard: int, bits: int) -> float:
        """Predicted accuracy lost by holding this shard at `bits` rather than 32."""
        return self.kl_to_acc * self.shard_kl[layer][shard] * self.bits_error.get(bits, 0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits_error"] = {str(b): v for b, v in self.bits_error.items()}
        d["kind"] = "importance"
        if self.data is None:
            del d["data"]  # (profiles of the built-in data keep the id they always had)
        return d

    @staticmethod
    def from_dict(d: dict, where: str = "importance profile") -> "ImportanceProfile":
        _check_header(d, "importance", where)
        try:
            kl = _table(d["shard_kl"], f"{where}.shard_kl")
            drop = _table(d["shard_acc_drop"], f"{where}.shard_acc_drop", lo=-1.0) if d.get("shard_acc_drop") is not None else None
            if drop is not None and (len(drop) != len(kl) or len(drop[0]) != len(kl[0])):
                raise ProfileError(f"{where}: shard_acc_drop and shard_kl differ in shape")
            sub = d["submodel_accuracy"]
            if not isinstance(sub, dict) or len(sub) > 100_000:
                raise ProfileError(f"{where}.submodel_accuracy: expected an object")
            return ImportanceProfile(
                store_id=CHECK.text(d["store_id"], f"{where}.store_id"), method=CHECK.text(d["method"], f"{where}.method"),
                split=CHECK.text(d["split"], f"{where}.split"), seed=int(_num(d["seed"], f"{where}.seed", 0, 2**32)),
                lowest_bits=int(_num(d["lowest_bits"], f"{where}.lowest_bits", 1, 32)),
                full_accuracy=_num(d["full_accuracy"], f"{where}.full_accuracy", 0, 1),
                submodel_accuracy={CHECK.text(k, where): _num(v, f"{where}.submodel_accuracy", 0, 1) for k, v in sub.items()},
                shard_kl=kl, shard_acc_drop=drop,
                bits_error=_bits_map(d["bits_error"], f"{where}.bits_error"),
                kl_to_acc=_num(d["kl_to_acc"], f"{where}.kl_to_acc", 0, 1e6),
                cost_s=_num(d.get("cost_s", 0.0), f"{where}.cost_s"), created=str(d.get("created", ""))[:64],
                data=_data_source(d.get("data"), f"{where}.data"))
        except KeyError as exc:
            raise ProfileError(f"{where}: missing field {exc}") from None
        except TypeError as exc:
            raise ProfileError(f"{where}: malformed ({exc})") from None


def _data_source(d, where: str) -> dict | None:
    if d is None:
        return None
    CHECK.obj(d, where)
    return {"path": CHECK.text(d["path"], f"{where}.path", max_len=4096), "sha256": CHECK.text(d["sha256"], f"{where}.sha256"),
            "size": int(_num(d["size"], f"{where}.size", 0, 2**63)),
            "examples": int(_num(d["examples"], f"{where}.examples", 1, 2**63)),
            "columns": _columns(d.get("columns") or {}, f"{where}.columns")}


def _columns(d, where: str) -> dict:
    CHECK.obj(d, where)
    return {k: None if d.get(k) is None else CHECK.text(d[k], f"{where}.{k}") for k in ("text", "pair", "label")}


def _table(rows, where: str, lo: float = 0.0) -> tuple[tuple[float, ...], ...]:
    if not isinstance(rows, list) or not rows or len(rows) > 4096:
        raise ProfileError(f"{where}: expected a non-empty list of rows")
    out = []
    for r in rows:
        if not isinstance(r, list) or not r or len(r) != len(rows[0]) or len(r) > 4096:
            raise ProfileError(f"{where}: rows must be non-empty lists of equal length")
        out.append(tuple(_num(x, where, lo) for x in r))
    return tuple(out)


def _check_header(d, kind: str, where: str) -> None:
    CHECK.obj(d, where)
    if d.get("kind") != kind:
        raise ProfileError(f"{where}: this is not a {kind} profile (kind={d.get('kind')!r})")
    if d.get("version") != VERSIONS[kind]:
        raise ProfileError(f"{where}: {kind} profile version {d.get('version')!r}, this sti reads {VERSIONS[kind]}; "
                           "measure it again")


def save_profile(profile: DeviceProfile | ImportanceProfile, path: str | Path) -> Path:
    """Write atomically (temporary file, then rename)."""
    return atomic_write_json(profile.to_dict(), path)


def load_profile(path: str | Path, store_id: str | None = None):
    """Read a device or importance profile; refuse one made for another store."""
    path = Path(path)
    d = CHECK.read(path, MAX_PROFILE_BYTES, f"no profile at {path}: measure one with `sti profile`")
    kind = d.get("kind") if isinstance(d, dict) else None
    kind = kind if isinstance(kind, str) else None
    cls = {"device": DeviceProfile, "importance": ImportanceProfile}.get(kind)
    if cls is None:
        raise ProfileError(f"{path}: not an sti profile (kind={kind!r})")
    profile = cls.from_dict(d, str(path))
    if store_id is not None and profile.store_id != store_id:
        raise ProfileError(f"{path} was measured for store {profile.store_id[:12]}, not {store_id[:12]}: "
                           "profile this store with `sti profile`")
    return profile


_IDS: dict[int, tuple[object, str]] = {}


def profile_id(profile: "DeviceProfile | ImportanceProfile") -> str:
    """First 16 hex digits of the sha256 of the profile's canonical JSON: what a plan names
    its profiles by. Profiles are frozen, so the id of one object is remembered (holding the
    object, so its id() is not reused)."""
    hit = _IDS.get(id(profile))
    if hit is not None and hit[0] is profile:
        return hit[1]
    text = json.dumps(profile.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    if len(_IDS) >= 64:
        _IDS.clear()
    _IDS[id(profile)] = (profile, digest)
    return digest
