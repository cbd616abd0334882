"""Each promise of docs/FORMAT.md, checked on a tiny random model."""

import json
import shutil
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from sti.encoder import Submodel, encode
from sti.errors import Cancelled, ConfigError, StoreError
from sti.store import MANIFEST, DATA, Store, build_store, compute_store_id
from tests.conftest import random_ids

BITS = (2, 4, 32)


@pytest.fixture(scope="module", params=["linear", "gobo"])
def built(request, tmp_path_factory):
    from sti.config import PRESETS
    from sti.weights import ModelWeights
    weights = ModelWeights.random(PRESETS["tiny"], seed=1)
    path = build_store(weights, tmp_path_factory.mktemp("s") / "store", bits=BITS, codec=request.param)
    return weights, path


@pytest.fixture()
def copy(built, tmp_path):
    """A private copy of the built store, to damage."""
    dst = tmp_path / "store"
    shutil.copytree(built[1], dst)
    return dst


def edit_manifest(path, fn, keep_id=False):
    m = json.loads((path / MANIFEST).read_text())
    fn(m)
    if not keep_id:
        m["store_id"] = compute_store_id(m)
    (path / MANIFEST).write_text(json.dumps(m))


def test_32_bit_store_reproduces_the_model_exactly(built):
    weights, path = built
    with Store(path) as s:
        back = s.load_model(32)
    a, b = weights.tensors(), back.tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids, mask = random_ids(weights.config)
    with torch.no_grad():
        assert (encode(weights, ids, mask) - encode(back, ids, mask)).abs().max() <= 1e-6


def test_32_bit_shards_reassemble_each_layer(built):
    weights, path = built
    c = weights.config
    with Store(path) as s:
        for i, layer in enumerate(weights.layers):
            again = s.layer(i, range(c.num_shards), 32)
            for part in ("q_w", "q_b", "k_w", "v_b", "o_w", "i_w", "i_b", "f_w"):
                assert torch.equal(getattr(again, part), getattr(layer, part))
            sub = s.layer(i, [2, 0], 32)  # any subset, any order
            assert torch.equal(sub.q_w[:c.head_dim], layer.q_w[2 * c.head_dim:3 * c.head_dim])


def test_quantized_store_is_close(built):
    weights, path = built
    ids, mask = random_ids(weights.config)
    with Store(path) as s:
        ref = weights.layers[0].i_w
        errs = {b: ((s.load_model(b).layers[0].i_w - ref).norm() / ref.norm()).item() for b in (2, 4)}
        assert 0 < errs[4] < errs[2]
        assert errs[4] < 0.2  # relative RMS error; the per-codec bounds are in test_codec.py
        with torch.no_grad():
            sub = Submodel.full(weights.config)
            out4 = encode(s.load_model(4), ids, mask, sub)
        assert torch.allclose(out4, encode(weights, ids, mask), atol=0.25)


def test_records_are_aligned_checksummed_and_complete(built):
    weights, path = built
    m = json.loads((path / MANIFEST).read_text())
    data = (path / DATA).read_bytes()
    assert m["format"] == "sti-store" and m["version"] == 3 and len(data) == m["data_size"]
    c = weights.config
    shards = [r for r in m["records"] if r["kind"] == "shard"]
    assert len(shards) == c.num_layers * c.num_shards * len(BITS)
    end = 0
    for r in sorted(m["records"], key=lambda r: r["offset"]):
        assert r["offset"] % 4096 == 0 and r["offset"] >= end
        assert zlib.crc32(data[r["offset"]:r["offset"] + r["length"]]) == r["crc32"]
        assert not any(data[r["offset"] + r["length"]:-(-(r["offset"] + r["length"]) // 4096) * 4096])
        end = r["offset"] + r["length"]
    assert m["store_id"] == compute_store_id(m)


def test_packed_shards_are_smaller_by_bits(built):
    _, path = built
    with Store(path) as s:
        sizes = s.sizes()["shards_by_bits"]
    assert sizes[2] < sizes[4] < sizes[32]


def test_embedding_rows_on_demand(built):
    weights, path = built
    with Store(path) as s:
        rows = s.table_rows("word", [5, 0, 119, 5])
        assert torch.equal(rows, weights.embeddings.word[[5, 0, 119, 5]])
        with pytest.raises(StoreError, match="outside"):
            s.table_rows("word", [120])


def test_read_many_coalesces_and_verifies(built):
    weights, path = built
    with Store(path) as s:
        recs = [s.rows[("word", b)] for b in (2, 0, 1, 3)] + [s.shard_record(0, 1, 32)]
        assert [bytes(b) for b in s.read_many(recs)] == [bytes(s.read(r)) for r in recs]


def test_bit_flip_inside_a_coalesced_read_is_detected(copy):
    m = json.loads((copy / MANIFEST).read_text())
    rec = next(r for r in m["records"] if r["name"] == "word.block.2")
    data = bytearray((copy / DATA).read_bytes())
    data[rec["offset"] + 5] ^= 0x01
    (copy / DATA).write_bytes(bytes(data))
    with Store(copy) as s:
        with pytest.raises(StoreError, match=r"word.block.2.*CRC-32"):
            s.table_rows("word", list(range(0, 120)))


def test_cold_reader_reads_the_same(built):
    weights, path = built
    with Store(path, mode="cold") as s:
        assert torch.equal(s.shard(1, 2, 32).i_w, weights.layers[1].shard(2, weights.config).i_w)


# --- what a reader must refuse -----------------------------------------------------------
def test_unknown_version(copy):
    edit_manifest(copy, lambda m: m.update(version=1))
    with pytest.raises(StoreError, match="version 1.*Rebuild"):
        Store(copy)


def test_truncated_and_extended_data(copy):
    data = (copy / DATA).read_bytes()
    (copy / DATA).write_bytes(data[:-10])
    with pytest.raises(StoreError, match="truncated"):
        Store(copy)
    (copy / DATA).write_bytes(data + b"x")
    with pytest.raises(StoreError, match="truncated or was modified"):
        Store(copy)


def test_offset_out_of_range_and_unaligned(copy):
    edit_manifest(copy, lambda m: m["records"][-1].update(offset=m["data_size"]))
    with pytest.raises(StoreError, match=r"record \d+ \(layer.*outside the data file"):
        Store(copy)
    edit_manifest(copy, lambda m: m["records"][-1].update(offset=4097))
    with pytest.raises(StoreError, match="not a multiple of 4096"):
        Store(copy)


def test_overlapping_records(copy):
    edit_manifest(copy, lambda m: m["records"][-1].update(offset=m["records"][-2]["offset"]))
    with pytest.raises(StoreError, match="overlaps"):
        Store(copy)


def test_shape_not_matching_config(copy):
    def bad(m):
        rec = next(r for r in m["records"] if r["kind"] == "shard")
        rec["parts"][0]["shape"] = [3, 32]
    edit_manifest(copy, bad)
    with pytest.raises(StoreError, match="do not match the model config"):
        Store(copy)


def test_config_not_matching_records(copy):
    edit_manifest(copy, lambda m: m["model"].update(num_heads=2))
    with pytest.raises(StoreError):
        Store(copy)


def test_bit_flip_detected_on_read(copy, built):
    weights, _ = built
    m = json.loads((copy / MANIFEST).read_text())
    rec = next(r for r in m["records"] if r["name"] == "layer.1.shard.3.bits.4")
    data = bytearray((copy / DATA).read_bytes())
    data[rec["offset"] + 100] ^= 0x10
    (copy / DATA).write_bytes(bytes(data))
    with Store(copy) as s:
        s.shard(1, 3, 32)  # other records still read
        with pytest.raises(StoreError, match=r"layer.1.shard.3.bits.4.*CRC-32"):
            s.shard(1, 3, 4)


def test_edited_manifest_without_new_id(copy):
    edit_manifest(copy, lambda m: m["records"][0].update(crc32=1), keep_id=True)
    with pytest.raises(StoreError, match="store_id"):
        Store(copy)


def test_missing_and_duplicate_records(copy):
    edit_manifest(copy, lambda m: m["records"].pop())
    with pytest.raises(StoreError, match="missing"):
        Store(copy)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not an sti store"):
        Store(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        Store(tmp_path)
    (tmp_path / MANIFEST).write_text("[]")
    with pytest.raises(StoreError, match="not an sti store manifest"):
        Store(tmp_path)


def test_huge_manifest_refused(tmp_path):
    with open(tmp_path / MANIFEST, "wb") as f:
        f.truncate(17 << 20)
    with pytest.raises(StoreError, match="larger than 16 MiB"):
        Store(tmp_path)


def test_build_cancel_leaves_nothing(tmp_path, tiny_weights):
    with pytest.raises(Cancelled):
        build_store(tiny_weights, tmp_path / "s", bits=(4, 32), progress=lambda done, total: done < 5)
    assert list(tmp_path.iterdir()) == []


def test_build_refuses_bad_options(tmp_path, tiny_weights):
    with pytest.raises(ConfigError, match="codec"):
        build_store(tiny_weights, tmp_path / "s", codec="zip")
    with pytest.raises(ConfigError, match="bitwidths"):
        build_store(tiny_weights, tmp_path / "s", bits=(1, 32))


# --- the manifest is untrusted: fuzz it ------------------------------------------------------
def _mutations():
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=8), st.lists(st.integers(-5, 5), max_size=3), st.just({}))
    return st.lists(st.tuples(st.integers(0, 10**6), leaf), min_size=1, max_size=4)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3] + obj[-2:]):
            yield from _paths(v, prefix + ((i if i < 3 else i - 5),))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(muts=_mutations(), reseal=st.booleans())
def test_fuzzed_manifest_gives_only_store_errors(built, tmp_path_factory, muts, reseal):
    _, path = built
    base = json.loads((path / MANIFEST).read_text())
    paths = [p for p in _paths(base) if p]
    m = json.loads(json.dumps(base))
    for pick, value in muts:
        p = paths[pick % len(paths)]
        target = m
        try:
            for key in p[:-1]:
                target = target[key]
            target[p[-1]] = json.loads(json.dumps(value))  # a copy: hypothesis may reuse one {}
        except (KeyError, IndexError, TypeError):
            continue
    if reseal:  # also get past the store_id check, to reach the deeper validation
        try:
            m["store_id"] = compute_store_id(m)
        except Exception:
            pass
    d = tmp_path_factory.mktemp("fuzz")
    (d / MANIFEST).write_text(json.dumps(m))
    (d / DATA).symlink_to(path / DATA)
    try:
        with Store(d) as s:
            s.load_model(2)
    except StoreError:
        pass


def test_store_records_its_model_file_and_the_demo_rebuilds_a_stale_one(tmp_path, tiny_weights, monkeypatch):
    import hashlib
    from rich.console import Console
    from sti.demo import demo_store
    from sti.weights import ModelWeights, save_model_dir
    from tests.conftest import word_tokenizer

    monkeypatch.setenv("STI_HOME", str(tmp_path / "home"))
    tok = word_tokenizer(tmp_path / "tok")
    model = save_model_dir(tiny_weights, tmp_path / "m", tokenizer_from=tok)
    with open(tmp_path / "log.txt", "w") as log:
        console = Console(file=log)
        store = demo_store(model, console)
        digest = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
        manifest = json.loads((store / MANIFEST).read_text())
        assert manifest["source"]["model_sha256"] == digest
        built = (store / MANIFEST).stat().st_mtime_ns
        assert demo_store(model, console) == store
        assert (store / MANIFEST).stat().st_mtime_ns == built  # reused, not rebuilt

        save_model_dir(ModelWeights.random(tiny_weights.config, seed=7), model, tokenizer_from=tok)  # retrained
        demo_store(model, console)
        assert json.loads((store / MANIFEST).read_text())["store_id"] != manifest["store_id"]
    assert "was built from another version" in (tmp_path / "log.txt").read_text()


def test_building_from_a_missing_model_names_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_store(tmp_path / "nowhere", tmp_path / "store")


def test_the_manifest_says_how_the_model_pools_and_the_head_record_holds_its_dense_layer(tmp_path):
    """FORMAT.md, "The manifest" (`pooling`, `head_act`, `position_offset`, `elastic`) and the
    `head` record's parts: written as the model has them, read back into the same answers."""
    import dataclasses
    from sti.config import PRESETS
    from sti.encoder import classify
    from sti.weights import ModelWeights
    c = dataclasses.replace(PRESETS["tiny"], family="roberta", position_offset=2, pooling="cls", head_act="tanh",
                            labels=("x", "y"))
    weights = ModelWeights.random(c, seed=4)
    path = build_store(weights, tmp_path / "store", bits=(32,))
    m = json.loads((path / MANIFEST).read_text())
    assert {k: m["model"][k] for k in ("family", "position_offset", "pooling", "head_act", "elastic")} == \
        {"family": "roberta", "position_offset": 2, "pooling": "cls", "head_act": "tanh", "elastic": False}
    head = next(r for r in m["records"] if r["kind"] == "head")
    assert [p["name"] for p in head["parts"]] == ["w", "b", "dense_w", "dense_b"]
    ids, mask = random_ids(c)
    with Store(path) as s:
        assert s.config == c
        assert torch.equal(classify(s.load_model(32), ids, mask), classify(weights, ids, mask))
    edit_manifest(path, lambda m: m["model"].update(pooling="max"))
    with pytest.raises(StoreError, match="pooling must be one of mean, cls"):
        Store(path)
    edit_manifest(path, lambda m: m["model"].update(pooling="mean", head_act="none"))
    with pytest.raises(StoreError, match="record head: parts"):  # the dense parts are now unexpected
        Store(path)


@pytest.mark.parametrize("codec", ["linear", "gobo"])
def test_a_shard_decoded_into_a_group_equals_its_decoded_parts(tiny_weights, tmp_path, codec):
    # the engine's one-call decode (every part of a shard straight into its group slot, the
    # output columns into their block of the group's output matrix, in float32 or bfloat16)
    # against decode_parts, bit for bit
    from sti.groups import ATTN, FFN, ShardGroup
    from tests.conftest import word_tokenizer
    path = build_store(tiny_weights, tmp_path / "s", bits=(2, 3, 32), codec=codec,
                       tokenizer_from=word_tokenizer(tmp_path / "t"))
    c = tiny_weights.config
    with Store(path) as s:
        for bits in (2, 3, 32):
            for dtype in (torch.float32, torch.bfloat16):
                for phase in (ATTN, FFN):
                    fast, ref = ShardGroup(phase, 3, c, dtype), ShardGroup(phase, 3, c, dtype)
                    for g, j in enumerate((2, 0, 3)):
                        rec = s.shard_record(1, j, bits)
                        buf = s.read(rec)
                        fast.fill(j, s, rec, buf)
                        ref.add(j, s.decode_parts(rec, buf))
                        for t_fast, t_ref in ((fast.w[g], ref.w[g]), (fast.b[g], ref.b[g]),
                                              (fast.columns(g, 1), ref.columns(g, 1))):
                            assert torch.equal(t_fast, t_ref), (bits, dtype, phase, g)
