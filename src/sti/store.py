"""The shard store: writing a model as shards at many bitwidths, and reading it back.

The on-disk format is specified in docs/FORMAT.md (read that first); this module follows it
section by section. Writing: `build_store`. Reading: `Store`, which validates the whole
manifest when opened (it is untrusted input) and verifies each record's CRC-32 whenever
the record is read.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import codec as codecs
from . import gptq
from .config import ModelConfig
from .hf import checkpoint_sha256
from .errors import Cancelled, ConfigError, StiError, StoreError
from .storage import PAGE, open_reader
from .untrusted import Checks
from .weights import (LAYER_PARTS, Embeddings, Head, LayerShared, LayerWeights, ModelWeights,
                      ShardWeights, load_model_dir)

FORMAT, VERSION = "sti-store", 3  # 2: the model's family, pooling and head are data; 3: codec v2 blobs
MANIFEST, DATA, TOKENIZER = "manifest.json", "store.bin", "tokenizer.json"
MAX_MANIFEST = 16 << 20
MAX_RECORDS = 1_000_000
MAX_DIM = 1 << 20
DEFAULT_BITS = (2, 3, 4, 5, 6, 32)
MATRICES = ("q_w", "k_w", "v_w", "o_w", "i_w", "f_w")
BIASES = ("q_b", "k_b", "v_b", "i_b")
KINDS = ("shard", "layer", "embed_misc", "head", "rows")

Progress = Callable[[int, int], bool]  # (done, total) -> keep going?


# --- shapes that follow from the model config (FORMAT.md, "Records") --------------------
def shard_part_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, d, f = c.hidden_size, c.head_dim, c.ffn_slice
    return {"q_w": (d, h), "q_b": (d,), "k_w": (d, h), "k_b": (d,), "v_w": (d, h), "v_b": (d,),
            "o_w": (h, d), "i_w": (f, h), "i_b": (f,), "f_w": (h, f)}


def expected_parts(kind: str, c: ModelConfig, rows: int = 0) -> dict[str, tuple[int, ...]]:
    h = c.hidden_size
    if kind == "shard":
        return shard_part_shapes(c)
    if kind == "layer":
        return {p: (h,) for p in LAYER_PARTS}
    if kind == "embed_misc":
        return {"token_type": (c.type_vocab_size, h), "ln_w": (h,), "ln_b": (h,)}
    if kind == "head":
        dense = {"dense_w": (h, h), "dense_b": (h,)} if c.head_act != "none" else {}
        return {"w": (c.num_labels, h), "b": (c.num_labels,), **dense}
    return {"rows": (rows, h)}


def rows_per_block(hidden: int) -> int:
    """Rows per embedding block: as many float32 rows as fit in one 4096-byte page (at
    least one), so a token costs one page read (for H = 384: 2 rows, 3072 bytes)."""
    return max(1, PAGE // (hidden * 4))


# --- writing -------------------------------------------------------------------------------
@dataclass
class _Writer:
    """Appends records to store.bin, each at the next 4096-byte boundary."""
    f: object
    offset: int = 0

    def add(self, record: dict, parts: list[tuple[str, tuple[int, ...], int, str, bytes]]) -> dict:
        body, meta, pos = [], [], 0
        for name, shape, bits, encoding, blob in parts:
            meta.append({"name": name, "shape": list(shape), "bits": bits, "encoding": encoding,
                         "offset": pos, "length": len(blob)})
            body.append(blob)
            pos += len(blob)
        data = b"".join(body)
        self.f.write(data)
        pad = -len(data) % PAGE
        self.f.write(b"\0" * pad)
        record.update(offset=self.offset, length=len(data), crc32=zlib.crc32(data), parts=meta)
        self.offset += len(data) + pad
        return record


def _f32(name: str, t: torch.Tensor) -> tuple:
    a = np.ascontiguousarray(t.detach().float().numpy(), dtype="<f4")
    return (name, tuple(a.shape), 32, "f32", a.tobytes())


def _shard_parts(layer: LayerWeights, j: int, bits: int, codec: str, fits: dict, c: ModelConfig,
                 choices: dict) -> list:
    s = layer.shard(j, c)
    parts = []
    for name in ("q_w", "q_b", "k_w", "k_b", "v_w", "v_b", "o_w", "i_w", "i_b", "f_w"):
        t = getattr(s, name)
        if name in BIASES or bits == 32:
            parts.append(_f32(name, t))
        else:
            blob = codecs.encode(np.ascontiguousarray(t.numpy(), dtype=np.float32), bits, codec, fits[name],
                                 choices.get((name, j)))
            parts.append((name, tuple(t.shape), bits, "blob", blob))
    return parts


def _write_records(weights: ModelWeights, f, bits: tuple[int, ...], codec: str, progress: Progress,
                   calibration: "gptq.Calibration | None") -> tuple[list, dict]:
    c, w = weights.config, _Writer(f)
    r = rows_per_block(c.hidden_size)
    tables = {"word": weights.embeddings.word, "position": weights.embeddings.position}
    blocks = {name: -(-t.shape[0] // r) for name, t in tables.items()}
    total = c.num_layers * (1 + len(bits) * c.num_shards) + sum(blocks.values()) + 2
    records, done = [], 0

    def tick(n: int = 1) -> None:
        nonlocal done
        done += n
        if progress and progress(done, total) is False:
            raise Cancelled("store build cancelled")

    e = weights.embeddings
    records.append(w.add({"name": "embed_misc", "kind": "embed_misc"},
                         [_f32("token_type", e.token_type), _f32("ln_w", e.ln_w), _f32("ln_b", e.ln_b)]))
    records.append(w.add({"name": "head", "kind": "head"}, [_f32(k, t) for k, t in weights.head.tensors().items()]))
    tick(2)
    for table, t in tables.items():
        for b in range(blocks[table]):
            records.append(w.add({"name": f"{table}.block.{b}", "kind": "rows", "table": table, "block": b},
                                 [_f32("rows", t[b * r:(b + 1) * r])]))
        tick(blocks[table])
    for i, layer in enumerate(weights.layers):
        records.append(w.add({"name": f"layer.{i}", "kind": "layer", "layer": i},
                             [_f32(p, getattr(layer.shared, p)) for p in LAYER_PARTS]))
        tick()
        factors: dict = {}  # GPTQ's inverse-Hessian factors: one set per layer, for every bitwidth
        for b in bits:
            # GOBO fits its Gaussian and bins on the whole layer matrix: one codebook per matrix.
            fits = {m: codecs.fit(getattr(layer, m).numpy(), b, codec) for m in MATRICES} if b != 32 else {}
            choices = (gptq.layer_choices(layer, c, b, calibration.grams[i], factors)
                       if calibration is not None and b != 32 else {})
            for j in range(c.num_shards):
                records.append(w.add({"name": f"layer.{i}.shard.{j}.bits.{b}", "kind": "shard",
                                      "layer": i, "shard": j, "bits": b},
                                     _shard_parts(layer, j, b, codec, fits, c, choices)))
                tick()
    return records, {name: {"rows": int(t.shape[0]), "rows_per_block": r} for name, t in tables.items()}


def compute_store_id(manifest: dict) -> str:
    core = {"model": manifest["model"], "codec": manifest["codec"], "bits": manifest["bits"],
            "records": [[r["name"], r["crc32"]] for r in manifest["records"]]}
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_store(model: str | Path | ModelWeights, store_dir: str | Path, bits=DEFAULT_BITS,
                codec: str = "linear", progress: Progress | None = None,
                tokenizer_from: str | Path | None = None, calibration: list | None = None) -> Path:
    """Write the store for `model` (a model directory or weights) to `store_dir`, atomically.
    With `calibration` texts (or (text, second text) pairs; e.g. `sti.calibration_texts()`), the linear codec's codes are
    chosen by GPTQ on the model's inputs over those texts (gptq.py), tokenized with the
    tokenizer of `tokenizer_from` (default: the model directory); without, every weight
    takes its nearest code."""
    bits = tuple(sorted(set(int(b) for b in bits)))
    if codec not in codecs.CODECS:
        raise ConfigError(f"unknown codec {codec!r}: choose one of {', '.join(codecs.CODECS)}")
    if calibration is not None and codec != "linear":
        raise ConfigError(f"GPTQ rounding (calibration texts) applies to the linear codec, not {codec!r}: "
                          "build without calibration texts (`sti build --calibration none`)")
    bad = [b for b in bits if b != 32 and b not in codecs.PACKED_BITS]
    if bad or not bits:
        raise ConfigError(f"bitwidths {bad or '(none)'} are not supported: choose from "
                          f"{', '.join(map(str, codecs.PACKED_BITS))} and 32")
    source = {}
    if not isinstance(model, ModelWeights):
        model_dir = Path(model)
        tokenizer_from = tokenizer_from or model_dir
        model = load_model_dir(model_dir)  # first: it names a missing or broken model clearly
        source = {"model_dir": str(model_dir.resolve()), "model_sha256": checkpoint_sha256(model_dir)}
    measured = _calibrate(model, calibration, tokenizer_from, progress) if calibration is not None else None
    store_dir = Path(store_dir)
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{store_dir.name}.", dir=store_dir.parent))
    try:
        with open(tmp / DATA, "wb") as f:
            records, tables = _write_records(model, f, bits, codec, progress, measured)
            f.flush()
            os.fsync(f.fileno())
        manifest = {"format": FORMAT, "version": VERSION, "model": model.config.to_dict(), "codec": codec,
                    "bits": list(bits), "alignment": PAGE, "data_file": DATA,
                    "data_size": (tmp / DATA).stat().st_size, "tables": tables, "source": source,
                    "rounding": measured.manifest() if measured else {"method": "nearest"}, "records": records}
        if tokenizer_from is not None and (Path(tokenizer_from) / TOKENIZER).exists():
            shutil.copyfile(Path(tokenizer_from) / TOKENIZER, tmp / TOKENIZER)
            manifest["tokenizer"] = {"file": TOKENIZER, "sha256": hashlib.sha256((tmp / TOKENIZER).read_bytes()).hexdigest()}
        manifest["store_id"] = compute_store_id(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        from .weights import replace_dir
        replace_dir(tmp, store_dir)
    except KeyboardInterrupt:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Cancelled(f"store build interrupted; nothing was written to {store_dir}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return store_dir


def _calibrate(model: ModelWeights, texts: list, tokenizer_from, progress) -> "gptq.Calibration":
    from .tokenizer import Tokenizer
    if tokenizer_from is None or not (Path(tokenizer_from) / TOKENIZER).exists():
        raise ConfigError("GPTQ rounding runs the model on the calibration texts, which needs its tokenizer: "
                          f"give a model directory holding {TOKENIZER} (or tokenizer_from=...), or build "
                          "without calibration (`sti build --calibration none`: nearest rounding)")
    def pair(t):
        if isinstance(t, str):
            return t, None
        if isinstance(t, (tuple, list)) and len(t) == 2 and isinstance(t[0], str) and isinstance(t[1], (str, type(None))):
            return t[0], t[1]
        raise ConfigError("calibration must be a list of texts, or of (text, second text or None) pairs "
                          f"(see sti.calibration_texts), not one holding {t!r:.60}")
    if isinstance(texts, (str, dict)) or not isinstance(texts, (list, tuple)):
        raise ConfigError("calibration must be a list of texts (see sti.calibration_texts)")
    pairs = [pair(t) for t in texts]
    # requests are cut to 128 tokens by default (api.DEFAULT_MAX_LENGTH), never past the model's positions
    tokenizer = Tokenizer(tokenizer_from, max_length=min(128, model.config.max_tokens))
    return gptq.measure(model, tokenizer, pairs, progress=progress)


# --- reading -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    name: str
    shape: tuple[int, ...]
    bits: int
    encoding: str  # "f32" (raw little-endian float32) or "blob" (CODECS.md)
    offset: int
    length: int


@dataclass(frozen=True)
class Record:
    name: str
    kind: str
    offset: int
    length: int
    crc32: int
    parts: tuple[Part, ...]
    layer: int = -1
    shard: int = -1
    bits: int = 32
    table: str = ""
    block: int = -1


CHECK = Checks(StoreError)


def _field(d: dict, key: str, kind, where: str):
    return CHECK.typed(CHECK.key(d, key, where), kind, f"{where}: field {key!r}")


def _int(d: dict, key: str, where: str, lo: int = 0, hi: int = 1 << 62) -> int:
    return CHECK.int(CHECK.key(d, key, where), f"{where}: field {key!r}", lo, hi)


def _rounding(m: dict, where: str) -> dict:
    """How the codes were chosen (FORMAT.md "rounding"; a store written before it says
    nothing and was rounded to nearest). Informative only: decoding is the same either way."""
    r = m.get("rounding", {"method": "nearest"})
    if not isinstance(r, dict) or r.get("method") not in ("nearest", "gptq"):
        raise StoreError(f"{where}: 'rounding' must name the method 'nearest' or 'gptq'")
    if r["method"] == "gptq":
        _int(r, "texts", where, 1)
    return r


def _parse_part(p: dict, rec_len: int, where: str) -> Part:
    name = _field(p, "name", str, where)
    where = f"{where}, part {name!r}"
    shape = _field(p, "shape", list, where)
    if len(shape) > 4 or not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= MAX_DIM for x in shape):
        raise StoreError(f"{where}: bad shape {shape}")
    encoding = _field(p, "encoding", str, where)
    if encoding not in ("f32", "blob"):
        raise StoreError(f"{where}: unknown encoding {encoding!r}")
    part = Part(name, tuple(shape), _int(p, "bits", where, 1, 32), encoding,
                _int(p, "offset", where), _int(p, "length", where))
    if part.offset + part.length > rec_len:
        raise StoreError(f"{where}: lies outside its record")
    if encoding == "f32" and part.length != 4 * int(np.prod(shape)):
        raise StoreError(f"{where}: {part.length} bytes cannot hold float32 {shape}")
    return part


def _parse_record(r: dict, i: int, data_size: int) -> Record:
    where = f"record {i}"
    name = _field(r, "name", str, where)[:200]
    where = f"record {i} ({name})"
    kind = _field(r, "kind", str, where)
    if kind not in KINDS:
        raise StoreError(f"{where}: unknown kind {kind!r}")
    offset, length = _int(r, "offset", where), _int(r, "length", where)
    if offset % PAGE:
        raise StoreError(f"{where}: offset {offset} is not a multiple of {PAGE}")
    if offset + length > data_size:
        raise StoreError(f"{where}: bytes {offset}..{offset + length} lie outside the data file ({data_size} bytes)")
    parts = _field(r, "parts", list, where)
    if len(parts) > 64:
        raise StoreError(f"{where}: too many parts")
    extra = {}
    if kind in ("shard", "layer"):
        extra["layer"] = _int(r, "layer", where, 0, MAX_DIM)
    if kind == "shard":
        extra["shard"] = _int(r, "shard", where, 0, MAX_DIM)
        extra["bits"] = _int(r, "bits", where, 1, 32)
    if kind == "rows":
        extra["table"] = _field(r, "table", str, where)
        extra["block"] = _int(r, "block", where, 0, MAX_DIM)
    return Record(name=name, kind=kind, offset=offset, length=length,
                  crc32=_int(r, "crc32", where, 0, 0xFFFFFFFF),
                  parts=tuple(_parse_part(p, length, where) for p in parts), **extra)


def _check_shapes(rec: Record, c: ModelConfig, tables: dict) -> None:
    rows = 0
    if rec.kind == "rows":
        if rec.table not in tables:
            raise StoreError(f"record {rec.name}: unknown table {rec.table!r}")
        n, r = tables[rec.table]
        rows = min(r, n - rec.block * r)
        if rows <= 0:
            raise StoreError(f"record {rec.name}: block {rec.block} is past the end of the table")
    want = expected_parts(rec.kind, c, rows)
    got = {p.name: p.shape for p in rec.parts}
    if got != want or len(rec.parts) != len(want):
        raise StoreError(f"record {rec.name}: parts {got} do not match the model config (expected {want})")
    if rec.kind in ("shard", "layer") and rec.layer >= c.num_layers:
        raise StoreError(f"record {rec.name}: layer {rec.layer} outside the model's {c.num_layers}")
    if rec.kind == "shard" and rec.shard >= c.num_shards:
        raise StoreError(f"record {rec.name}: shard {rec.shard} outside the model's {c.num_shards}")
    for p in rec.parts:
        if p.encoding == "blob" and (rec.kind != "shard" or p.name not in MATRICES or p.bits != rec.bits):
            raise StoreError(f"record {rec.name}: part {p.name} may not be an encoded blob")


class Store:
    """A store opened for reading. The manifest is validated here; records are verified
    (CRC-32) each time they are read. `mode` picks the reader: "warm", "cold" or
    "emulate:BANDWIDTH[,LATENCY]" (see storage.py)."""

    def __init__(self, path: str | Path, mode: str = "warm", reader=None):
        self.path = Path(path)
        self.manifest = self._load_manifest()
        m = self.manifest
        try:
            self.config = ModelConfig.from_dict(_field(m, "model", dict, self._where))
        except ConfigError as exc:
            raise StoreError(f"{self._where}: {exc}") from None
        self.codec = _field(m, "codec", str, self._where)
        if self.codec not in codecs.CODECS:
            raise StoreError(f"{self._where}: unknown codec {self.codec!r}")
        self.bits = tuple(_field(m, "bits", list, self._where))
        if not self.bits or not all(isinstance(b, int) and (b == 32 or b in codecs.PACKED_BITS) for b in self.bits):
            raise StoreError(f"{self._where}: bad bit list {list(self.bits)}")
        self.store_id = _field(m, "store_id", str, self._where)
        self.rounding = _rounding(m, self._where)
        self.data_path = self.path / DATA
        self.data_size = _int(m, "data_size", self._where)
        if not self.data_path.exists():
            raise StoreError(f"{self.data_path} is missing: the store is incomplete; rebuild it with `sti build`")
        actual = self.data_path.stat().st_size
        if actual != self.data_size:
            raise StoreError(f"{self.data_path} is {actual} bytes but the manifest says {self.data_size}: "
                             "the file is truncated or was modified; rebuild the store")
        self._index_records()
        self._layouts: dict[tuple[int, int], codecs.Layout] = {}
        self._jobs: dict[tuple, np.ndarray] = {}  # decode job tables, by (record offset, target layout)
        if compute_store_id(m) != self.store_id:
            raise StoreError(f"{self._where}: store_id does not match the records; the manifest was edited")
        # `reader` replaces the storage reader (tests inject faults through it)
        self.reader = reader if reader is not None else open_reader(self.data_path, mode)

    @property
    def _where(self) -> str:
        return str(self.path / MANIFEST)

    def _load_manifest(self) -> dict:
        f = self.path / MANIFEST
        m = CHECK.read(f, MAX_MANIFEST, f"no {MANIFEST} in {self.path}: not an sti store (build one with `sti build`)")
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise StoreError(f"{f} is not an sti store manifest (format != {FORMAT!r})")
        if m.get("version") != VERSION:
            raise StoreError(f"{f} has format version {m.get('version')!r}; this sti reads version {VERSION}. "
                             "Rebuild the store with this version of sti")
        return m

    def _index_records(self) -> None:
        raw = _field(self.manifest, "records", list, self._where)
        if len(raw) > MAX_RECORDS:
            raise StoreError(f"{self._where}: {len(raw)} records is more than {MAX_RECORDS}")
        c = self.config
        tables_raw = _field(self.manifest, "tables", dict, self._where)
        tables = {}
        for name in ("word", "position"):
            t = _field(tables_raw, name, dict, f"{self._where}, tables")
            tables[name] = (_int(t, "rows", self._where, 1, MAX_DIM * 4), _int(t, "rows_per_block", self._where, 1, 4096))
        if tables["word"][0] != c.vocab_size or tables["position"][0] != c.max_position:
            raise StoreError(f"{self._where}: embedding tables do not match the model config")
        self.tables = tables
        records = [_parse_record(r, i, self.data_size) for i, r in enumerate(raw)]
        end = 0
        for rec in sorted(records, key=lambda r: r.offset):
            if rec.offset < end:
                raise StoreError(f"{self._where}: record {rec.name} overlaps the record before it")
            end = rec.offset + rec.length
        self.shards, self.layers, self.rows, self.singles = {}, {}, {}, {}
        for rec in records:
            _check_shapes(rec, c, tables)
            key, index = {"shard": ((rec.layer, rec.shard, rec.bits), self.shards),
                          "layer": (rec.layer, self.layers), "rows": ((rec.table, rec.block), self.rows),
                          }.get(rec.kind, (rec.kind, self.singles))
            if key in index:
                raise StoreError(f"{self._where}: record {rec.name} appears twice")
            index[key] = rec
        self._check_complete(tables)

    def _check_complete(self, tables) -> None:
        # every record is distinct and within the model's ranges (checked above), so the store
        # is complete iff the counts match; only then is it cheap to name what is missing
        c = self.config
        blocks = {name: -(-n // r) for name, (n, r) in tables.items()}
        expected = c.num_layers * (1 + c.num_shards * len(self.bits)) + 2 + sum(blocks.values())
        have = len(self.shards) + len(self.layers) + len(self.singles) + len(self.rows)
        if have == expected and len(self.singles) == 2:
            return
        missing = (name for name in itertools.chain(
            (f"layer.{i}.shard.{j}.bits.{b}" for i in range(c.num_layers) for j in range(c.num_shards)
             for b in self.bits if (i, j, b) not in self.shards),
            (f"layer.{i}" for i in range(c.num_layers) if i not in self.layers),
            (k for k in ("embed_misc", "head") if k not in self.singles),
            (f"{name}.block.{b}" for name, nb in blocks.items() for b in range(nb) if (name, b) not in self.rows)))
        raise StoreError(f"{self._where}: {expected - have} records missing (first: {next(missing, '?')}); "
                         "rebuild the store")

    # --- raw records ---
    def read(self, rec: Record) -> memoryview:
        """The record's bytes, verified against its CRC-32."""
        try:
            buf = self.reader.read(rec.offset, rec.length)
        except (OSError, StoreError) as exc:
            raise StoreError(f"{self.data_path}: cannot read record {rec.name} (offset {rec.offset}): "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        if zlib.crc32(buf) != rec.crc32:
            raise StoreError(f"{self.data_path}: record {rec.name} (offset {rec.offset}) fails its CRC-32 check: "
                             "the store is corrupt; rebuild it with `sti build`")
        return buf

    def read_many(self, recs: list[Record], max_run: int = 1 << 20) -> list[memoryview]:
        """The bytes of several distinct records, each verified; records that lie back to back
        in the file are fetched with one read (embedding blocks of neighbouring rows often do)."""
        out: dict[int, memoryview] = {}
        run: list[Record] = []

        def flush() -> None:
            start = run[0].offset
            try:
                buf = self.reader.read(start, run[-1].offset + run[-1].length - start)
            except (OSError, StoreError) as exc:
                raise StoreError(f"{self.data_path}: cannot read records {run[0].name}..{run[-1].name}: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
            for r in run:
                view = buf[r.offset - start:r.offset - start + r.length]
                if zlib.crc32(view) != r.crc32:
                    raise StoreError(f"{self.data_path}: record {r.name} (offset {r.offset}) fails its CRC-32 "
                                     "check: the store is corrupt; rebuild it with `sti build`")
                out[r.offset] = view
            run.clear()

        for r in sorted(recs, key=lambda r: r.offset):
            if run and (r.offset - (run[-1].offset + run[-1].length) >= PAGE
                        or r.offset + r.length - run[0].offset > max_run):
                flush()
            run.append(r)
        if run:
            flush()
        return [out[r.offset] for r in recs]

    def shard_record(self, layer: int, shard: int, bits: int) -> Record:
        try:
            return self.shards[(layer, shard, bits)]
        except KeyError:
            raise StoreError(f"store {self.path} has no shard {shard} of layer {layer} at {bits} bits "
                             f"(bits stored: {list(self.bits)})") from None

    # --- decoding ---
    def decode_parts(self, rec: Record, buf, names=None) -> dict[str, torch.Tensor]:
        """The record's tensors (or those in `names`) from its CRC-verified bytes `buf`
        (float32 parts are views into `buf`)."""
        out = {}
        for p in rec.parts:
            if names is not None and p.name not in names:
                continue
            view = buf[p.offset:p.offset + p.length]
            if p.encoding == "f32":
                out[p.name] = torch.from_numpy(np.frombuffer(view, dtype="<f4").reshape(p.shape))
                continue
            layout = self._layout(rec, p, view)
            try:
                arr = codecs.decode(view, p.shape, layout=layout)
            except StiError as exc:
                raise StoreError(f"{self.data_path}: record {rec.name}, part {p.name}: {exc}") from None
            out[p.name] = torch.from_numpy(arr)
        return out

    def decode_jobs(self, rec: Record, buf, key, targets: dict, dst: np.ndarray, scratch: np.ndarray) -> None:
        """Decode the record's parts named in `targets` (name -> (element offset in the flat
        `dst`, row stride or None if contiguous)) in one GIL-free call (codec.run_jobs). The
        job table is built once per record and `key` (the caller's name for the layout of
        `targets`)."""
        codecs.run_jobs(np.frombuffer(buf, dtype=np.uint8), self.jobs(rec, buf, key, targets), rec.bits, dst, scratch)

    def jobs(self, rec: Record, buf, key, targets: dict) -> np.ndarray:
        """The job table (codec.job_row rows, byte offsets into the record) that decodes the
        record's parts named in `targets`; cached by record and `key`."""
        jobs = self._jobs.get((rec.offset, key))
        if jobs is None:
            rows = []
            for p in rec.parts:
                if p.name not in targets:
                    continue
                if p.offset % 4:  # the decoder reads float32 sections in place (sti writes 8-aligned parts)
                    raise StoreError(f"{self.data_path}: record {rec.name}, part {p.name}: offset {p.offset} "
                                     "is not a multiple of 4")
                at, stride = targets[p.name]
                layout = None
                if p.encoding == "blob":
                    layout = self._layout(rec, p, buf[p.offset:p.offset + p.length])
                r, c = p.shape if len(p.shape) == 2 else (1, math.prod(p.shape))
                rows.append(codecs.job_row(layout, p.offset, math.prod(p.shape), at, r, c, stride or c))
            jobs = self._jobs[(rec.offset, key)] = np.array(rows, dtype=np.int64).reshape(-1, codecs.JOB_FIELDS)
        return jobs

    def _layout(self, rec: Record, p, view) -> "codecs.Layout":
        """A blob's checked layout; checked the first time it is decoded (later reads of the
        record pass the same CRC, so they hold the same bytes and reuse the check)."""
        key = (rec.offset, p.offset)
        if key not in self._layouts:
            try:
                self._layouts[key] = codecs.check(view, p.shape)
            except StiError as exc:
                raise StoreError(f"{self.data_path}: record {rec.name}, part {p.name}: {exc}") from None
        return self._layouts[key]

    def load(self, rec: Record) -> dict[str, torch.Tensor]:
        return self.decode_parts(rec, self.read(rec))

    def shard(self, layer: int, shard: int, bits: int) -> ShardWeights:
        return ShardWeights(**self.load(self.shard_record(layer, shard, bits)))

    def layer_shared(self, layer: int) -> LayerShared:
        if layer not in self.layers:
            raise StoreError(f"store {self.path} has no layer {layer}")
        return LayerShared(**self.load(self.layers[layer]))

    def head(self) -> Head:
        return Head(**self.load(self.singles["head"]), pooling=self.config.pooling, act=self.config.head_act)

    def embed_misc(self) -> dict[str, torch.Tensor]:
        return self.load(self.singles["embed_misc"])

    def table_rows(self, table: str, ids) -> torch.Tensor:
        """Rows `ids` of an embedding table, reading only the blocks that hold them."""
        n, r = self.tables[table]
        ids = [int(i) for i in ids]
        if any(not 0 <= i < n for i in ids):
            raise StoreError(f"row ids outside the {table} table's {n} rows")
        if not ids:
            return torch.empty(0, self.config.hidden_size)
        wanted = sorted({i // r for i in ids})
        recs = [self.rows[(table, b)] for b in wanted]
        rows = torch.cat([self.decode_parts(rec, buf)["rows"] for rec, buf in zip(recs, self.read_many(recs))])
        start = dict(zip(wanted, np.cumsum([0] + [rec.parts[0].shape[0] for rec in recs[:-1]]).tolist()))
        return rows[torch.tensor([start[i // r] + i % r for i in ids])]

    def layer(self, layer: int, shards, bits) -> LayerWeights:
        """A layer with `shards`, shard k at `bits[k]` (or one bitwidth for all)."""
        bits = [bits] * len(shards) if isinstance(bits, int) else list(bits)
        return LayerWeights.from_shards(self.layer_shared(layer),
                                        {j: self.shard(layer, j, b) for j, b in zip(shards, bits)})

    def load_model(self, bits: int = 32) -> ModelWeights:
        """The whole model with every shard at `bits` (e.g. for accuracy per bitwidth)."""
        c = self.config
        misc = self.embed_misc()
        emb = Embeddings(word=self.table_rows("word", range(c.vocab_size)),
                         position=self.table_rows("position", range(c.max_position)),
                         token_type=misc["token_type"], ln_w=misc["ln_w"], ln_b=misc["ln_b"])
        layers = [self.layer(i, range(c.num_shards), bits) for i in range(c.num_layers)]
        return ModelWeights(config=c, embeddings=emb, layers=layers, head=self.head())

    # --- sizes ---
    def sizes(self) -> dict:
        """Bytes per part of the model and per bitwidth (for `sti inspect`)."""
        by_bits = {b: sum(r.length for k, r in self.shards.items() if k[2] == b) for b in self.bits}
        return {
            "shards_by_bits": by_bits,
            "layer_shared": sum(r.length for r in self.layers.values()),
            "embeddings_word": sum(r.length for k, r in self.rows.items() if k[0] == "word"),
            "embeddings_other": sum(r.length for k, r in self.rows.items() if k[0] == "position")
            + self.singles["embed_misc"].length,
            "head": self.singles["head"].length,
            "data_file": self.data_size,
        }

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
