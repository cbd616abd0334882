"""The codecs: a float32 matrix in, a self-describing byte blob out, and back.

Two codecs, both packing b-bit codes densely (b in PACKED_BITS); the byte layout is
specified in docs/CODECS.md:
  - "gobo" (faithful to GOBO, the paper's codec): one Gaussian fitted to the whole layer
    matrix; weights whose log-density under it is below -4 are outliers kept in float32;
    the rest fall in 2^b equal-population bins whose centroid is the bin mean.
  - "linear": group-wise affine, w ~ zero + q * scale for every group of GROUP consecutive
    weights, scale and zero in float16. Chosen for decode speed (one multiply-add per weight,
    no look-up, no scatter) and for accuracy per stored byte at 2-3 bits (docs/CODECS.md).

Why hand-written kernels: decoding sits on the IO lane of the pipeline and must be faster
than reading cold from disk (hundreds of MB/s of packed input). A numpy look-up decode
manages ~230 MB/s; the numba kernels below unpack 8 codes at a time from `b` bytes (8 codes
of b bits are exactly b bytes) and release the GIL so decoding overlaps compute.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numba
import numpy as np
import torch

from .errors import StiError

CODECS = ("linear", "gobo")
PACKED_BITS = (2, 3, 4, 5, 6, 8)
GROUP = 128                     # linear: weights per (scale, zero) pair
GOBO_LOG_DENSITY = -4.0         # GOBO's outlier threshold on the Gaussian log-density
MAGIC, VERSION = b"STIB", 2   # 2: linear scales and zeros in float16, G = 128
HEADER = struct.Struct("<4sBBBBIIII")   # magic, version, codec, bits, 0, rows, cols, param, 0
CODEC_IDS = {"linear": 1, "gobo": 2}


class CodecError(StiError):
    """A blob does not decode: wrong magic, version, sizes or shape."""


@dataclass(frozen=True)
class GoboFit:
    """GOBO's per-layer fit: the Gaussian, the bin edges and the bin centroids."""
    mean: float
    std: float
    edges: np.ndarray       # 2^b - 1 inner edges between bins (ascending)
    centroids: np.ndarray   # 2^b bin means (float32)

    def outliers(self, w: np.ndarray) -> np.ndarray:
        """Boolean mask of the weights GOBO keeps in float32."""
        z = (w - self.mean) / self.std
        log_density = -0.5 * z * z - math.log(self.std * math.sqrt(2 * math.pi))
        return log_density < GOBO_LOG_DENSITY


# --- fitting and encoding (offline, numpy) ----------------------------------------------
def fit(matrix: np.ndarray, bits: int, codec: str) -> GoboFit | None:
    """What a codec learns from a whole layer matrix before its shards are encoded."""
    _check(bits, codec)
    if codec == "linear":
        return None  # group-wise: every group carries its own scale and zero
    w = np.asarray(matrix, dtype=np.float64).ravel()
    std = float(w.std()) or 1.0
    g = GoboFit(float(w.mean()), std, np.empty(0), np.empty(0, np.float32))
    inliers = np.sort(w[~g.outliers(w)] if (~g.outliers(w)).any() else w)
    bins = np.array_split(inliers, 1 << bits)  # equal population
    centroids = np.array([b.mean() if b.size else 0.0 for b in bins], dtype=np.float32)
    edges = np.array([(bins[i][-1] + bins[i + 1][0]) / 2 if bins[i].size and bins[i + 1].size else np.inf
                      for i in range(len(bins) - 1)])
    return GoboFit(g.mean, g.std, edges, centroids)


def encode(w: np.ndarray, bits: int, codec: str, fitted: GoboFit | None = None,
           choice: tuple | None = None) -> bytes:
    """Encode a float32 matrix (any shape; stored as rows x cols) into one blob. For the
    linear codec, `choice` (codes, scale, zero) gives codes chosen elsewhere on the grid
    `linear_choice` picks (GPTQ's, gptq.py); by default each weight takes its nearest code."""
    _check(bits, codec)
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = (w.shape[0], int(np.prod(w.shape[1:]))) if w.ndim >= 2 else (w.size, 1)
    flat = w.ravel()
    if not np.isfinite(flat).all():
        raise CodecError("cannot encode a tensor holding NaN or infinity")
    if choice is not None and codec != "linear":
        raise CodecError(f"codes chosen elsewhere apply to the linear codec, not {codec!r}")
    if codec == "linear":
        param, body = GROUP, _encode_linear(flat, bits, choice)
    else:
        fitted = fitted or fit(w, bits, codec)
        if len(fitted.centroids) != 1 << bits:
            raise CodecError(f"the GOBO fit has {len(fitted.centroids)} bins, not {1 << bits}")
        mask = fitted.outliers(flat.astype(np.float64))
        param, body = int(mask.sum()), _encode_gobo(flat, bits, fitted, mask)
    blob = HEADER.pack(MAGIC, VERSION, CODEC_IDS[codec], bits, 0, rows, cols, param, 0) + body
    return blob + b"\0" * (-len(blob) % 8)


def clip_ratios(floor: float) -> tuple[float, ...]:
    """1.0, 0.95, ... down to `floor`: the shares of a group's range its grid may shrink to."""
    return tuple(r for r in (round(1.0 - 0.05 * k, 2) for k in range(20)) if r >= floor - 1e-9)


CLIP_RATIOS = clip_ratios(0.5)
F16_MAX = 65504.0


@torch.no_grad()
def linear_grid(groups: torch.Tensor, bits: int, clips=None,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The linear codec's choice for every row of `groups` ([n, G] float32): (codes, scale,
    zero), codes as float32 integers, scale and zero float32 values that float16 holds
    exactly. Per group, the grid [lo, hi] is the group's range shrunk about its centre by the
    ratio (of CLIP_RATIOS) with the least squared error: clipping a few extreme weights buys a
    finer step for all the others, which matters most at 2-4 bits. Codes are rounded against
    the grid as stored (float16). The store's encoder and training's fake quantization
    (sti.qat) both call this, so a store holds exactly what quantization-aware training saw.
    `clips` ((low, high) shares of the half-range kept below and above the centre) and
    `weights` ([n, G], each weight's share of the squared error) change the search, to compare
    other choices with this one (benchmarks/bench_rounding.py); the codec uses neither."""
    levels = (1 << bits) - 1
    gmin, gmax = groups.amin(1), groups.amax(1)
    biggest = max(-gmin.min().item(), gmax.max().item(), 0.0)  # scale <= 2 * biggest / 3 fits when this does
    if biggest > F16_MAX:
        raise CodecError(f"weights of magnitude up to {biggest:.3g} do not fit the linear codec's float16 "
                         f"scales (at most {F16_MAX:g}): build the store with codec 'gobo', which keeps float32")
    mid, half = (gmin + gmax) / 2, (gmax - gmin) / 2
    best = None
    for low, high in clips or [(r, r) for r in CLIP_RATIOS]:
        lo, hi = mid - half * low, mid + half * high
        scale, zero = ((hi - lo) / levels).half().float(), lo.half().float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.clamp(torch.round((groups - zero[:, None]) / safe[:, None]), 0, levels)
        err = (linear_values(codes, scale, zero) - groups).double().square()
        err = (err if weights is None else err * weights).sum(1)
        if best is None:
            best = [codes, scale, zero, err]
            continue
        better = err < best[3]
        best[0][better], best[1][better], best[2][better], best[3][better] = \
            codes[better], scale[better], zero[better], err[better]
    return best[0], best[1], best[2]


def linear_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """zero + code * scale in float32, the product rounded before the sum: the decoder's
    arithmetic (two roundings, no fused multiply-add)."""
    return (codes * scale[:, None]).add_(zero[:, None])


def linear_choice(flat: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The linear codec's nearest-rounding choice for a flat float32 tensor: (codes [n]
    uint8, scale and zero per group of GROUP, float32 values float16 holds exactly)."""
    groups = torch.from_numpy(_pad(np.ascontiguousarray(flat, np.float32), GROUP, edge=True).reshape(-1, GROUP))
    codes, scale, zero = linear_grid(groups, bits)
    return codes.numpy().ravel()[:flat.size].astype(np.uint8), scale.numpy(), zero.numpy()


def _encode_linear(flat: np.ndarray, bits: int, choice: tuple | None) -> bytes:
    codes, scale, zero = linear_choice(flat, bits) if choice is None else _checked(choice, flat.size, bits)
    return scale.astype("<f2").tobytes() + zero.astype("<f2").tobytes() + pack_codes(codes, bits)


def _checked(choice: tuple, n: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A choice made elsewhere, refused unless it is one this format stores exactly."""
    codes, scale, zero = (np.asarray(a) for a in choice)
    groups = -(-n // GROUP)
    if codes.shape != (n,) or scale.shape != (groups,) or zero.shape != (groups,):
        raise CodecError(f"a linear choice for {n} weights needs {n} codes and {groups} scales and zeros")
    if codes.size and (not np.array_equal(codes, np.round(codes)) or codes.min() < 0 or codes.max() >= 1 << bits):
        raise CodecError(f"codes must be whole numbers in 0..{(1 << bits) - 1}: a code of {bits} bits does "
                         "not fit (take the grid from linear_choice)")
    for name, a in (("scale", scale), ("zero", zero)):
        if not np.isfinite(a).all() or not np.array_equal(a.astype(np.float16).astype(np.float32), a.astype(np.float32)):
            raise CodecError(f"a linear choice's {name} is not a finite float16 value (take the grid from linear_choice)")
    if (scale < 0).any():
        raise CodecError("a linear choice's scale is negative (take the grid from linear_choice)")
    return codes.astype(np.uint8), scale.astype(np.float32), zero.astype(np.float32)


def _encode_gobo(flat: np.ndarray, bits: int, g: GoboFit, mask: np.ndarray) -> bytes:
    codes = np.searchsorted(g.edges, flat.astype(np.float64)).astype(np.uint8)
    codes[mask] = 0
    index = np.flatnonzero(mask).astype("<u4")
    return (g.centroids.astype("<f4").tobytes() + index.tobytes() + flat[index].astype("<f4").tobytes()
            + pack_codes(codes, bits))


def _pad(a: np.ndarray, multiple: int, edge: bool = False) -> np.ndarray:
    extra = -a.size % multiple
    if not extra:
        return a
    return np.pad(a, (0, extra), mode="edge" if edge else "constant")


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Dense little-endian packing: code i occupies bits [i*b, (i+1)*b) of the stream.
    Padded with zero codes to a multiple of 8, so every 8 codes fill exactly b bytes."""
    c = _pad(np.asarray(codes, dtype=np.uint64), 8).reshape(-1, 8)
    words = np.zeros(len(c), dtype="<u8")
    for t in range(8):
        words |= c[:, t] << np.uint64(t * bits)
    return words.view(np.uint8).reshape(-1, 8)[:, :bits].tobytes()


def packed_size(n: int, bits: int) -> int:
    return -(-n // 8) * bits


# --- decoding (online: numba kernels, GIL released) --------------------------------------
# One kernel per (codec, bits): with `bits` a compile-time constant the byte gathering and
# the shifts unroll, which is 3-5x faster than one kernel taking bits as an argument.
# numba's cache keys closures by the values they capture, so the per-bits kernels cache safely.
@numba.njit(nogil=True, cache=True, inline="always")
def _bf16_bits(u):
    """The bfloat16 nearest (ties to even) to the float32 whose bits are u, as its 16 bits."""
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


_F16_POW = np.array([2.0 ** (max(e, 1) - 25) for e in range(32)], dtype=np.float32)


@numba.njit(nogil=True, cache=True, inline="always")
def _f16_value(h):
    """The float32 equal to the float16 whose bits are h (normal or subnormal; the encoder
    writes no infinity or NaN): (1024 + mantissa) * 2^(exponent - 25), exact in float32."""
    e, m = (h >> np.uint16(10)) & np.uint16(0x1F), h & np.uint16(0x3FF)
    v = np.float32(np.int32(m) + (1024 if e else 0)) * _F16_POW[e]
    return -v if h & np.uint16(0x8000) else v


# With `bf16`, a kernel writes bfloat16 (the engine's shard groups may hold weights in
# bfloat16): each decoded value rounded and stored as its 16 high bits, so the float32
# matrix is never written out (half the memory traffic). `bf16` is a compile-time constant
# like `bits`: the float32 kernels are unchanged.
#
# A kernel decodes a tensor as `rows` rows of `cols` values, row r landing at out[r *
# stride:]: a tensor can fill a block of columns of a wider matrix (the engine's shard
# groups), and a contiguous one has stride == cols. 8 codes fill b whole bytes, so rows
# must start on a code boundary: cols % 8 == 0, or a single row (`placement` picks one).
# A row is decoded into a float32 row buffer, then copied (or, for bfloat16, rounded) into
# its slice of `out`: the form LLVM vectorises best here. Measured on one 384 x 128 4-bit
# part written into a block of a 512-column matrix, 1 thread: 19-20 us in float32 or
# bfloat16, against 36-64 us for the forms that index `out` across rows or round value by
# value (and 53 us for the previous kernel's decode-then-transpose).
def _make_linear(bits: int, bf16: bool = False):
    mask = np.uint64((1 << bits) - 1)

    @numba.njit(nogil=True, cache=True)
    def kernel(packed, scale, zero, group, out, rows, cols, stride):
        per_group = group // 8
        chunks, tail = cols // 8, cols % 8
        per_row = chunks + (tail > 0)
        row = np.empty(cols, np.float32)
        u = row.view(np.uint32)
        g, s, z = -1, np.float32(0), np.float32(0)
        for r in range(rows):
            for cc in range(chunks):
                c = r * per_row + cc
                v = np.uint64(0)
                for k in range(bits):  # 8 codes of b bits are exactly b bytes
                    v |= np.uint64(packed[c * bits + k]) << np.uint64(8 * k)
                if c // per_group != g:  # scale and zero are float16 bits
                    g = c // per_group
                    s, z = _f16_value(scale[g]), _f16_value(zero[g])
                for t in range(8):
                    row[cc * 8 + t] = np.float32((v >> np.uint64(t * bits)) & mask) * s + z
            if tail:  # the last codes of a single-row tensor
                c = r * per_row + chunks
                v = np.uint64(0)
                for k in range(bits):
                    v |= np.uint64(packed[c * bits + k]) << np.uint64(8 * k)
                if c // per_group != g:
                    g = c // per_group
                    s, z = _f16_value(scale[g]), _f16_value(zero[g])
                for t in range(tail):
                    row[chunks * 8 + t] = np.float32((v >> np.uint64(t * bits)) & mask) * s + z
            o = out[r * stride:r * stride + cols]
            for i in range(cols):
                if bf16:
                    o[i] = _bf16_bits(u[i])
                else:
                    o[i] = row[i]
    return kernel


def _make_gobo(bits: int, bf16: bool = False):
    mask = np.uint64((1 << bits) - 1)

    @numba.njit(nogil=True, cache=True)
    def kernel(packed, centroids, index, values, out, rows, cols, stride):
        if bf16:  # look-ups into the bfloat16 patterns of the centroids
            bits32 = centroids.copy().view(np.uint32)
            cent = np.empty(bits32.size, np.uint16)
            for i in range(bits32.size):
                cent[i] = _bf16_bits(bits32[i])
        per_row = (cols + 7) // 8
        for r in range(rows):
            o = out[r * stride:r * stride + cols]
            for cc in range(per_row):
                c = r * per_row + cc
                v = np.uint64(0)
                for k in range(bits):
                    v |= np.uint64(packed[c * bits + k]) << np.uint64(8 * k)
                for t in range(min(8, cols - cc * 8)):
                    q = (v >> np.uint64(t * bits)) & mask
                    if bf16:
                        o[cc * 8 + t] = cent[q]
                    else:
                        o[cc * 8 + t] = centroids[q]
        if bf16:  # and of the outliers
            vals = values.copy().view(np.uint32)
        for k in range(index.size):  # outliers overwrite their placeholder code
            at = (index[k] // cols) * stride + index[k] % cols
            if bf16:
                out[at] = _bf16_bits(vals[k])
            else:
                out[at] = values[k]
    return kernel


def placement(n: int, rows: int, cols: int) -> tuple[int, int]:
    """(rows, cols) a kernel decodes a contiguous [rows, cols] tensor of n values as."""
    return (rows, cols) if cols % 8 == 0 or rows == 1 else (1, n)


_LINEAR = {b: _make_linear(b) for b in PACKED_BITS}
_GOBO = {b: _make_gobo(b) for b in PACKED_BITS}
_LINEAR_BF16 = {b: _make_linear(b, True) for b in PACKED_BITS}
_GOBO_BF16 = {b: _make_gobo(b, True) for b in PACKED_BITS}


def read_header(blob) -> tuple[str, int, int, int, int]:
    """(codec, bits, rows, cols, param) of a blob, checked."""
    if len(blob) < HEADER.size:
        raise CodecError(f"blob of {len(blob)} bytes is shorter than its {HEADER.size}-byte header")
    magic, version, codec_id, bits, zero, rows, cols, param, zero2 = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CodecError(f"bad blob magic {magic!r}")
    if version != VERSION:
        raise CodecError(f"blob version {version}; this sti decodes version {VERSION}")
    names = {v: k for k, v in CODEC_IDS.items()}
    if codec_id not in names or bits not in PACKED_BITS or zero or zero2:
        raise CodecError(f"blob header names codec {codec_id}, {bits} bits: not a valid combination")
    return names[codec_id], bits, rows, cols, param


def expected_length(codec: str, bits: int, n: int, param: int) -> int:
    if codec == "linear":
        body = 4 * -(-n // param) + packed_size(n, bits)
    else:
        body = 4 * (1 << bits) + 8 * param + packed_size(n, bits)
    size = HEADER.size + body
    return size + (-size % 8)


@dataclass(frozen=True)
class Layout:
    """Where the sections of a checked blob are (byte offsets into the blob)."""
    codec: str
    bits: int
    n: int
    param: int
    sections: tuple[int, ...]   # linear: scale, zero, codes; gobo: centroids, index, values, codes


def check(blob, shape: tuple[int, ...]) -> Layout:
    """Validate a blob against the shape it should hold (every check of CODECS.md)."""
    codec, bits, rows, cols, param = read_header(blob)
    n = math.prod(shape)
    if rows * cols != n or (len(shape) == 2 and (rows, cols) != tuple(shape)):
        raise CodecError(f"blob holds {rows}x{cols}, expected shape {tuple(shape)}")
    if codec == "linear" and (param % 8 or not 8 <= param <= 1 << 16):
        raise CodecError(f"linear blob group size {param} is not a multiple of 8 in 8..65536")
    if codec == "gobo" and param > n:
        raise CodecError(f"gobo blob claims {param} outliers in {n} weights")
    if len(blob) != expected_length(codec, bits, n, param):
        raise CodecError(f"blob is {len(blob)} bytes, its header implies {expected_length(codec, bits, n, param)}")
    pos = HEADER.size
    if codec == "linear":
        ng = -(-n // param)
        return Layout(codec, bits, n, param, (pos, pos + 2 * ng, pos + 4 * ng))
    k = 1 << bits
    lay = Layout(codec, bits, n, param, (pos, pos + 4 * k, pos + 4 * k + 4 * param, pos + 4 * k + 8 * param))
    index = np.frombuffer(blob, dtype="<u4", count=param, offset=lay.sections[1])
    if param and int(index.max()) >= n:
        raise CodecError("gobo blob has an outlier index outside the tensor")
    return lay


# --- decoding a whole shard in one call ------------------------------------------------------
# The engine decodes every shard into its shard groups on a thread beside the compute lane.
# Decoded part by part from Python, a shard holds the GIL for about 80 us of bookkeeping,
# which the compute lane (which needs the GIL between every torch op) then waits for. So a
# shard's parts are described once in a job table and decoded by one nogil call that runs
# the kernels above. A row: kind, codes, a, b, c (section offsets in the record's bytes), n,
# param, dst (element offset), rows, cols, stride: element (r, col) of a [rows, cols] part
# lands at dst + r * stride + col, so a part can fill a block of columns of a wider matrix
# (stride == cols: the part is contiguous).
JOB_F32, JOB_LINEAR, JOB_GOBO = 0, 1, 2
JOB_FIELDS = 11


def job_row(layout: Layout | None, part_offset: int, n: int, dst: int, rows: int, cols: int,
            stride: int) -> list[int]:
    """The job of one part: `layout` None for a float32 part (its bytes at part_offset)."""
    if layout is None:
        return [JOB_F32, 0, part_offset, 0, 0, n, 0, dst, rows, cols, stride]
    sec = [part_offset + x for x in layout.sections]
    if layout.codec == "linear":
        return [JOB_LINEAR, sec[2], sec[0], sec[1], 0, n, layout.param, dst, rows, cols, stride]
    return [JOB_GOBO, sec[3], sec[0], sec[1], sec[2], n, layout.param, dst, rows, cols, stride]


BYTE_FIELDS = slice(1, 5)   # the fields that are byte offsets into the record (codes, a, b, c)


def shifted(jobs: np.ndarray, by: int) -> np.ndarray:
    """A job table whose record starts `by` bytes into a larger buffer (a multiple of 4)."""
    out = jobs.copy()
    out[:, BYTE_FIELDS] += by
    return out


def _make_driver(bits: int, bf16: bool):
    linear = (_LINEAR_BF16 if bf16 else _LINEAR)[bits]
    gobo = (_GOBO_BF16 if bf16 else _GOBO)[bits]
    centroids = 1 << bits

    # not cached on disk: numba's cache cannot tell apart closures that capture different
    # kernels (a cached driver of one bitwidth was found calling another's), so each
    # process compiles the drivers it uses, once (Engine does it when it opens)
    @numba.njit(nogil=True)
    def driver(raw, jobs, dst, scratch):
        f32 = raw[:raw.size - raw.size % 4].view(np.float32)
        u32 = f32.view(np.uint32)
        u16 = raw[:raw.size - raw.size % 2].view(np.uint16)
        for j in range(jobs.shape[0]):
            kind, codes, a, b, c, n = jobs[j, 0], jobs[j, 1], jobs[j, 2] // 4, jobs[j, 3] // 4, jobs[j, 4] // 4, jobs[j, 5]
            param, base, rows, cols, stride = jobs[j, 6], jobs[j, 7], jobs[j, 8], jobs[j, 9], jobs[j, 10]
            via_scratch = False
            if cols % 8 == 0 or rows == 1:
                out, rr, cc, st = dst[base:], rows, cols, stride
            elif stride == cols:
                out, rr, cc, st = dst[base:base + n], 1, n, n
            else:  # rows that do not start on a code boundary, into a block: decoded, then copied
                out, rr, cc, st, via_scratch = scratch, 1, n, n, True
            if kind == 0:
                for r in range(rr):
                    o = out[r * st:r * st + cc]
                    for i in range(cc):
                        if bf16:
                            o[i] = _bf16_bits(u32[a + r * cc + i])
                        else:
                            o[i] = f32[a + r * cc + i]
            elif kind == 1:
                groups, a2, b2 = (n + param - 1) // param, jobs[j, 2] // 2, jobs[j, 3] // 2
                linear(raw[codes:], u16[a2:a2 + groups], u16[b2:b2 + groups], param, out, rr, cc, st)
            else:
                gobo(raw[codes:], f32[a:a + centroids], u32[b:b + param], f32[c:c + param], out, rr, cc, st)
            if via_scratch:
                for r in range(rows):
                    dst[base + r * stride:base + r * stride + cols] = scratch[r * cols:(r + 1) * cols]
    return driver


_DRIVERS = {(b, bf16): _make_driver(b, bf16) for b in PACKED_BITS for bf16 in (False, True)}


def prepare_jobs(bits: int, bf16: bool) -> None:
    """Compile the driver `run_jobs` uses for these now (about a second each), rather than
    inside a request."""
    kind = np.uint16 if bf16 else np.float32
    run_jobs(np.zeros(8, np.uint8), np.zeros((0, JOB_FIELDS), np.int64), bits, np.zeros(0, kind), np.zeros(0, kind))


def run_jobs(raw: np.ndarray, jobs: np.ndarray, bits: int, dst: np.ndarray, scratch: np.ndarray) -> None:
    """Decode every part of `jobs` from the record bytes `raw` (uint8) into `dst`: a flat
    float32 array, or uint16 for bfloat16 bit patterns (`scratch`, of dst's dtype, holds a
    strided part on its way). `bits` is the record's bitwidth (any packed one for a
    record of float32 parts only)."""
    driver = _DRIVERS[(bits if bits in PACKED_BITS else PACKED_BITS[0], dst.dtype == np.uint16)]
    driver(raw, jobs, dst, scratch)


def decode(blob, shape: tuple[int, ...], out: np.ndarray | None = None, layout: Layout | None = None) -> np.ndarray:
    """Decode one blob into a float32 array of `shape` (into `out` if given: a C-contiguous
    float32 array, or a uint16 one that receives bfloat16 bit patterns). `layout` is the
    blob's `check` result when the caller has already checked these very bytes."""
    lay = layout or check(blob, shape)
    raw = np.frombuffer(blob, dtype=np.uint8)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    if not out.flags.c_contiguous or out.dtype not in (np.float32, np.uint16) or out.size != math.prod(shape):
        raise CodecError(f"decode target must be a C-contiguous float32 or uint16 array of {shape}")
    bf16 = out.dtype == np.uint16
    flat, sec, p = out.reshape(-1), lay.sections, lay.param
    rows, cols = placement(lay.n, *read_header(blob)[2:4])
    if lay.codec == "linear":
        kernel = (_LINEAR_BF16 if bf16 else _LINEAR)[lay.bits]
        kernel(raw[sec[2]:], raw[sec[0]:sec[1]].view("<u2"), raw[sec[1]:sec[2]].view("<u2"), p, flat, rows, cols, cols)
    else:
        kernel = (_GOBO_BF16 if bf16 else _GOBO)[lay.bits]
        kernel(raw[sec[3]:], raw[sec[0]:sec[1]].view("<f4"), raw[sec[1]:sec[2]].view("<u4"),
               raw[sec[2]:sec[3]].view("<f4"), flat, rows, cols, cols)
    return out


def _check(bits: int, codec: str) -> None:
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")
    if bits not in PACKED_BITS:
        raise CodecError(f"{bits} bits is not a packed bitwidth: choose one of {PACKED_BITS}")
