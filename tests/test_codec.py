"""The codecs against the promises of docs/CODECS.md and stated error bounds."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sti import codec
from sti.codec import CodecError, decode, encode, fit, pack_codes

# Relative RMS error bounds on Gaussian weights (measured ~10% below these, see CODECS.md).
LINEAR_BOUND = {2: 0.38, 3: 0.205, 4: 0.105, 5: 0.053, 6: 0.027, 8: 0.0066}
GOBO_BOUND = {2: 0.41, 3: 0.26, 4: 0.16, 5: 0.10, 6: 0.064, 8: 0.024}


def gaussian(shape=(128, 96), seed=0, outliers=True):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.04).astype(np.float32)
    if outliers:
        w.flat[rng.choice(w.size, 5, replace=False)] = [0.9, -0.7, 0.5, -1.2, 0.6]
    return w


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("bits", codec.PACKED_BITS)
def test_linear_error_bound(bits):
    w = gaussian(outliers=False)
    blob = encode(w, bits, "linear")
    d = decode(blob, w.shape)
    assert rel_err(d, w) < LINEAR_BOUND[bits]
    # every weight inside its group's grid is within half a step of it; weights outside the
    # (clipped) grid decode to its nearest end; the grid lies within the group's range
    ng = w.size // codec.GROUP
    scale = np.frombuffer(blob, "<f2", ng, 24)[:, None].astype(np.float64)
    lo = np.frombuffer(blob, "<f2", ng, 24 + 2 * ng)[:, None].astype(np.float64)
    hi = lo + scale * ((1 << bits) - 1)
    groups, dec = w.reshape(-1, codec.GROUP).astype(np.float64), d.reshape(-1, codec.GROUP)
    inside = (groups >= lo) & (groups <= hi)
    assert (np.abs(dec - groups)[inside] <= (scale / 2 * 1.0001 + 1e-7).repeat(codec.GROUP, 1)[inside]).all()
    np.testing.assert_allclose(dec[~inside], np.clip(groups, lo, hi)[~inside], atol=1e-6)
    # the grid lies within the group's range, up to the float16 rounding of its scale and zero
    slack = 2.0 ** -10 * np.abs(groups).max(1, keepdims=True) * (1 << bits)
    assert (lo >= groups.min(1, keepdims=True) - slack).all() and (hi <= groups.max(1, keepdims=True) + slack).all()
    # and a weight decodes to exactly zero + code * scale, in float32
    codes = np.rint((dec - lo) / np.where(scale > 0, scale, 1)).astype(np.float32)
    assert np.array_equal(dec, lo.astype(np.float32) + codes * scale.astype(np.float32))


def test_linear_stores_float16_scales_per_128_weights():
    w = gaussian(shape=(64, 384), outliers=False)
    for bits in (2, 3):  # CODECS.md: 2.25 and 3.25 bits a weight
        body = len(encode(w, bits, "linear")) - 24
        assert body * 8 / w.size == bits + 0.25


def test_float16_widening_is_exact_for_every_finite_pattern():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    h = h[np.isfinite(h.view(np.float16))]
    got = np.array([codec._f16_value(x) for x in h], np.float32)
    assert np.array_equal(got.view(np.uint32), h.view(np.float16).astype(np.float32).view(np.uint32))


def test_linear_refuses_weights_beyond_float16():
    with pytest.raises(CodecError, match="gobo"):
        encode(np.full((8, 8), 1e5, np.float32), 4, "linear")
    assert np.array_equal(decode(encode(np.full((8, 8), 1e5, np.float32), 4, "gobo"), (8, 8)), np.full((8, 8), 1e5))


@pytest.mark.parametrize("bits", codec.PACKED_BITS)
def test_gobo_error_bound_and_outliers_exact(bits):
    w = gaussian()
    f = fit(w, bits, "gobo")
    d = decode(encode(w, bits, "gobo", f), w.shape)
    mask = f.outliers(w.astype(np.float64))
    assert mask.sum() >= 5                                   # the planted outliers
    assert np.array_equal(d[mask], w[mask])                  # kept in float32, exactly
    inl = ~mask
    assert rel_err(d[inl], w[inl]) < GOBO_BOUND[bits]
    assert set(np.unique(d[inl])) <= set(f.centroids.tolist())  # inliers decode to centroids


def test_gobo_bins_are_equal_population_with_mean_centroids():
    w = gaussian(shape=(64, 64), outliers=False)
    f = fit(w, 3, "gobo")
    flat = w.ravel().astype(np.float64)
    inl = flat[~f.outliers(flat)]
    codes = np.searchsorted(f.edges, inl)
    counts = np.bincount(codes, minlength=8)
    assert counts.max() - counts.min() <= 1
    for k in range(8):
        assert abs(inl[codes == k].mean() - f.centroids[k]) < 1e-6


def test_gobo_fit_of_a_layer_serves_its_slices():
    w = gaussian(shape=(256, 64))
    f = fit(w, 4, "gobo")
    for part in (w[:64], w[64:128]):
        blob = encode(part, 4, "gobo", f)
        assert np.frombuffer(blob[24:24 + 64], "<f4").tolist() == f.centroids.tolist()
        assert rel_err(decode(blob, part.shape), part) < 0.3


def test_packing_layout_is_dense_little_endian():
    # 8 codes of 3 bits = 3 bytes: code i sits at bits [3i, 3i+3)
    codes = np.array([1, 2, 3, 4, 5, 6, 7, 0], dtype=np.uint8)
    value = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack_codes(codes, 3) == value.to_bytes(3, "little")
    assert pack_codes(np.array([0xF, 0x1], np.uint8), 4) == bytes([0x1F, 0, 0, 0])  # padded to 8 codes
    assert len(pack_codes(np.zeros(17, np.uint8), 5)) == 3 * 5


@pytest.mark.parametrize("name", codec.CODECS)
def test_header_and_length(name):
    w = gaussian(shape=(10, 7))  # 70 weights: not a multiple of 8 or of the group
    blob = encode(w, 5, name)
    magic, version, cid, bits, _, rows, cols, _, _ = struct.unpack_from("<4sBBBBIIII", blob)
    assert (magic, version, cid, bits, rows, cols) == (b"STIB", 2, codec.CODEC_IDS[name], 5, 10, 7)
    assert len(blob) % 8 == 0
    assert len(blob) == codec.expected_length(name, 5, 70, struct.unpack_from("<I", blob, 16)[0])
    np.testing.assert_allclose(decode(blob, (10, 7)), w, atol=0.3)


def test_decode_into_given_buffer():
    w = gaussian(shape=(32, 16), outliers=False)
    out = np.full(w.shape, np.nan, np.float32)
    assert decode(encode(w, 6, "linear"), w.shape, out=out) is out
    assert np.isfinite(out).all()


def test_constant_tensor_is_exact():
    w = np.full((8, 8), 0.25, np.float32)
    assert np.array_equal(decode(encode(w, 2, "linear"), w.shape), w)
    assert np.array_equal(decode(encode(w, 2, "gobo"), w.shape), w)


@pytest.mark.parametrize("name", codec.CODECS)
def test_bad_blobs_are_refused(name):
    w = gaussian(shape=(16, 16))
    blob = encode(w, 4, name)
    cases = {
        "magic": b"XXXX" + blob[4:],
        "version": blob[:4] + b"\x09" + blob[5:],
        "codec": blob[:5] + b"\x07" + blob[6:],
        "bits": blob[:6] + b"\x07" + blob[7:],
        "truncated": blob[:-8],
        "appended": blob + b"\0" * 8,
        "short": blob[:10],
    }
    for what, bad in cases.items():
        with pytest.raises(CodecError):
            decode(bad, (16, 16))
    with pytest.raises(CodecError, match="expected shape"):
        decode(blob, (8, 32))


def test_gobo_outlier_index_out_of_range_is_refused():
    w = gaussian(shape=(16, 16))
    blob = bytearray(encode(w, 4, "gobo"))
    assert struct.unpack_from("<I", blob, 16)[0] > 0
    struct.pack_into("<I", blob, 24 + 4 * 16, 10_000)  # first outlier index
    with pytest.raises(CodecError, match="outlier index"):
        decode(bytes(blob), (16, 16))


def test_bad_arguments():
    w = gaussian(shape=(4, 8))
    with pytest.raises(CodecError, match="codec"):
        encode(w, 4, "zip")
    with pytest.raises(CodecError, match="bits"):
        encode(w, 7, "linear")
    w[0, 0] = np.nan
    with pytest.raises(CodecError, match="NaN"):
        encode(w, 4, "linear")


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), bits=st.sampled_from(codec.PACKED_BITS),
       name=st.sampled_from(codec.CODECS), seed=st.integers(0, 2**31), scale=st.floats(1e-4, 1e3))
def test_round_trip_any_shape(rows, cols, bits, name, seed, scale):
    w = (np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(np.float32)
    d = decode(encode(w, bits, name), w.shape)
    assert d.shape == w.shape and d.dtype == np.float32
    lo, hi = w.min(), w.max()
    # no wild values: within the range, widened for linear by the float16 rounding of a
    # group's zero and scale (relative 2^-11 of each, the scale's times the largest code;
    # 2^-24 absolute for a subnormal one)
    slack = 2.0 ** -9 * np.abs(w).max() + 2.0 ** -24 * (1 << bits) if name == "linear" else 0
    assert (d >= lo - 1e-6 * abs(lo) - slack).all() and (d <= hi + 1e-6 * abs(hi) + slack).all()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_fuzzed_blobs_raise_only_codec_error(data):
    try:
        decode(data, (4, 4))
    except CodecError:
        pass


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(codec.CODECS), pos=st.integers(0, 40), value=st.integers(0, 255),
       cut=st.integers(0, 16))
def test_mutated_blobs_decode_or_raise_codec_error(name, pos, value, cut):
    blob = bytearray(encode(gaussian(shape=(8, 8)), 3, name))
    blob[pos] = value
    try:
        out = decode(bytes(blob[:len(blob) - cut]), (8, 8))
        assert out.shape == (8, 8)
    except CodecError:
        pass


@pytest.mark.parametrize("name", ["linear", "gobo"])
def test_decode_to_bfloat16_rounds_like_torch(name):
    # the bfloat16 kernels (the engine's bfloat16 shard groups) round each float32 value the
    # codec decodes to the nearest bfloat16, ties to even: exactly torch's conversion
    import torch
    w = np.random.default_rng(3).standard_normal((64, 40)).astype(np.float32) * 0.1
    for bits in (2, 3, 4, 6):
        blob = encode(w, bits, name, fit(w, bits, name) if name == "gobo" else None)
        out = torch.empty(w.shape, dtype=torch.bfloat16)
        decode(blob, w.shape, out=out.view(torch.int16).numpy().view(np.uint16))
        assert torch.equal(out, torch.from_numpy(decode(blob, w.shape)).to(torch.bfloat16)), bits


@settings(max_examples=120, deadline=None)
@given(rows=st.integers(1, 24), cols=st.integers(1, 40), extra=st.integers(0, 24), kind=st.sampled_from(
       ["linear", "gobo", "float32"]), bits=st.sampled_from(codec.PACKED_BITS), bf16=st.booleans(),
       base=st.integers(0, 9), seed=st.integers(0, 2**31))
def test_a_part_decodes_into_a_block_of_a_wider_matrix(rows, cols, extra, kind, bits, bf16, base, seed):
    # the engine's job driver (codec.run_jobs) writes a [rows, cols] part at element `base`
    # of a matrix `stride` = cols + extra wide, row r at base + r * stride: each of its three
    # paths (rows on a code boundary, a single contiguous run, via the scratch buffer) gives
    # exactly decode()'s values (bfloat16: torch's rounding of them), and writes nothing else
    import torch
    w = (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.05).astype(np.float32)
    if kind == "float32":
        blob, layout, want = w.tobytes(), None, w
    else:
        blob = encode(w, bits, kind)
        layout, want = codec.check(blob, w.shape), decode(blob, w.shape)
    stride = cols + extra
    dtype = np.uint16 if bf16 else np.float32
    sentinel = np.array(12345, dtype)
    dst = np.full(base + rows * stride + 3, sentinel, dtype)
    job = codec.job_row(layout, 0, w.size, base, rows, cols, stride)
    codec.run_jobs(np.frombuffer(blob, np.uint8), np.array([job], np.int64), bits, dst, np.empty(w.size, dtype))
    if bf16:
        want = torch.from_numpy(want).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    block = dst[base:base + rows * stride].reshape(rows, stride)
    np.testing.assert_array_equal(block[:, :cols], want)
    untouched = np.ones(dst.size, bool)
    untouched[base:base + rows * stride] = False
    untouched[base:base + rows * stride] |= np.tile(np.arange(stride) >= cols, rows)
    assert (dst[untouched] == sentinel).all()
