"""GPTQ rounding (gptq.py): lower output error than nearest rounding, on the same grid, kept
inside each shard, and measured on the inputs the model really sees."""

import random

import numpy as np
import pytest
import torch

import sti.codec as codecs
from conftest import word_tokenizer
from sti import gptq
from sti.api import calibration_texts
from sti.encoder import encode
from sti.errors import ConfigError, InputError
from sti.store import Store, build_store
from sti.tokenizer import Tokenizer
from sti.weights import shard_slice


def correlated_inputs(n: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose dimensions are correlated and of unequal energy, as activations are."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=gen) * torch.linspace(0.2, 2.0, width)
    return torch.randn(n, width, generator=gen) @ mix


def nearest(w: torch.Tensor, bits: int):
    codes, scale, zero = codecs.linear_choice(w.numpy().ravel(), bits)
    return codes, scale, zero


def gptq_codes(w: torch.Tensor, x: torch.Tensor, bits: int):
    _, scale, zero = nearest(w, bits)
    spread = lambda a: gptq._spread(a, tuple(w.shape))  # noqa: E731
    order, u = gptq.inverse_factor((x.T @ x).double())
    codes = gptq.round_columns(w, spread(scale), spread(zero), bits, order, u)
    return codes.numpy().ravel().astype(np.uint8), scale, zero


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_lowers_the_output_error(bits):
    """||(W - Q) X|| computed directly on the inputs: GPTQ's is well below nearest's."""
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(48, 256, generator=gen) * 0.05, correlated_inputs(2000, 256)
    err = {}
    for name, choice in (("nearest", nearest(w, bits)), ("gptq", gptq_codes(w, x, bits))):
        q = torch.from_numpy(codecs.linear_values(torch.from_numpy(choice[0].astype(np.float32)).view(-1, 128),
                                                  torch.from_numpy(choice[1]), torch.from_numpy(choice[2])
                                                  ).numpy().ravel()).view_as(w)
        err[name] = float(((w - q) @ x.T).square().sum())
    assert err["gptq"] < 0.7 * err["nearest"], err


def test_gptq_codes_are_stored_on_the_nearest_grid():
    """Only the codes differ: the scale and zero sections are nearest rounding's byte for byte,
    and the blob decodes to zero + code * scale of the chosen codes."""
    gen = torch.Generator().manual_seed(2)
    w, x = torch.randn(16, 384, generator=gen) * 0.05, correlated_inputs(500, 384)
    codes, scale, zero = gptq_codes(w, x, 2)
    assert not np.array_equal(codes, nearest(w, 2)[0])
    mine = codecs.encode(w.numpy(), 2, "linear", choice=(codes, scale, zero))
    plain = codecs.encode(w.numpy(), 2, "linear")
    layout = codecs.check(mine, tuple(w.shape))
    assert mine[:layout.sections[2]] == plain[:layout.sections[2]]
    expect = codecs.linear_values(torch.from_numpy(codes.astype(np.float32)).view(-1, 128),
                                  torch.from_numpy(scale), torch.from_numpy(zero)).numpy().ravel()
    assert np.array_equal(codecs.decode(mine, tuple(w.shape)).ravel(), expect)


def test_a_choice_the_format_cannot_hold_is_refused():
    w = np.random.default_rng(0).normal(0, 0.05, (8, 128)).astype(np.float32)
    codes, scale, zero = codecs.linear_choice(w.ravel(), 2)
    for bad in (codes + 3, codes.astype(np.int16) - 1, codes + 0.5):
        with pytest.raises(codecs.CodecError, match="whole numbers in 0..3"):
            codecs.encode(w, 2, "linear", choice=(bad, scale, zero))
    for bad in (scale + 1e-6, scale * np.inf):
        with pytest.raises(codecs.CodecError, match="not a finite float16 value"):
            codecs.encode(w, 2, "linear", choice=(codes, bad, zero))
    with pytest.raises(codecs.CodecError, match="negative"):
        codecs.encode(w, 2, "linear", choice=(codes, -scale, zero))
    with pytest.raises(codecs.CodecError, match="needs 1024 codes"):
        codecs.encode(w, 2, "linear", choice=(codes[:-1], scale, zero))
    with pytest.raises(codecs.CodecError, match="linear codec"):
        codecs.encode(w, 2, "gobo", choice=(codes, scale, zero))


def random_grams(config, seed: int = 0) -> dict:
    widths = {"x": config.hidden_size, "ctx": config.hidden_size, "mid": config.hidden_size,
              "act": config.intermediate_size}
    return {k: (lambda x: (x.T @ x).double())(correlated_inputs(300, n, seed)) for k, n in widths.items()}


def test_error_stays_inside_each_shard(tiny_weights):
    """A shard's codes depend on its own weights only: changing another shard's columns of
    the output projection and FFN-out, or the Gram matrix across shards, leaves them as
    they are (the other shard may be absent or at another bitwidth when this one runs)."""
    c, layer = tiny_weights.config, tiny_weights.layers[0]
    grams = random_grams(c)
    before = gptq.layer_choices(layer, c, 2, grams)
    gen = torch.Generator().manual_seed(5)
    for name in ("o_w", "f_w"):
        cols = getattr(layer, name)[:, shard_slice(name, 1, c)]
        cols += torch.randn(cols.shape, generator=gen) * 0.05
    crossed = {k: v.clone() for k, v in grams.items()}
    for kind, name in (("ctx", "o_w"), ("act", "f_w")):
        a, b = shard_slice(name, 0, c), shard_slice(name, 2, c)
        crossed[kind][a, b] += 5.0
        crossed[kind][b, a] += 5.0
    after = gptq.layer_choices(layer, c, 2, crossed)
    for name in ("o_w", "f_w"):
        for j in (0, 2, 3):
            assert np.array_equal(before[(name, j)][0], after[(name, j)][0]), (name, j)
        assert not np.array_equal(before[(name, 1)][0], after[(name, 1)][0])


def test_a_given_grid_is_the_one_rounded_to(tiny_weights):
    """`grid` replaces the codec's grid part by part (benchmarks/bench_rounding.py compares
    grids this way): the choices carry its scale and zero, and the codes are GPTQ's on that
    grid (rebuilt here for q by `round_columns`). Here the unclipped grid (the group's full
    range), which the codec's clipping search would not pick for every group."""
    c, layer = tiny_weights.config, tiny_weights.layers[0]
    calls = []

    def full_range(name, pos, part, bits):
        calls.append((name, pos))
        groups = torch.from_numpy(codecs._pad(part.contiguous().numpy().ravel(), codecs.GROUP, edge=True)
                                  .reshape(-1, codecs.GROUP))
        lo, hi = groups.amin(1), groups.amax(1)
        scale, zero = ((hi - lo) / 3).half().float(), lo.half().float()
        codes = torch.clamp(torch.round((groups - zero[:, None]) / scale[:, None]), 0, 3)
        return codes.numpy().ravel()[:part.numel()].astype(np.uint8), scale.numpy(), zero.numpy()

    grams = random_grams(c)
    mine, codec = gptq.layer_choices(layer, c, 2, grams, grid=full_range), gptq.layer_choices(layer, c, 2, grams)
    assert len(calls) == len(gptq.INPUTS) * len(layer.shard_ids)
    differ = 0
    for (name, j), (codes, scale, zero) in mine.items():
        part = getattr(layer.shard(j, c), name).contiguous().numpy().ravel()
        _, s, z = full_range(name, 0, torch.from_numpy(part), 2)
        assert np.array_equal(scale, s) and np.array_equal(zero, z), (name, j)
        differ += not np.array_equal(scale, codec[(name, j)][1])
    assert differ > 0  # the codec's own search clips some groups: the hook changed something
    parts = [layer.shard(j, c).q_w for j in layer.shard_ids]
    grids = [full_range("q_w", 0, p, 2) for p in parts]
    scale = torch.cat([gptq._spread(g[1], tuple(p.shape)) for g, p in zip(grids, parts)])
    zero = torch.cat([gptq._spread(g[2], tuple(p.shape)) for g, p in zip(grids, parts)])
    expected = gptq.round_columns(layer.q_w, scale, zero, 2, *gptq.inverse_factor(grams["x"]))
    for pos, j in enumerate(layer.shard_ids):
        want = expected[shard_slice("q_w", pos, c)].contiguous().numpy().ravel().astype(np.uint8)
        assert np.array_equal(mine[("q_w", j)][0], want), j


def inputs_by_hand(x: torch.Tensor, layer, c) -> dict:
    """The inputs of a layer's projections for one request's states x [S, H], written out
    head by head (softmax attention, no torch attention kernel), each projection fed the
    input `gptq.INPUTS` names for it, beside the layer's output (so a wrong name in INPUTS
    gives a wrong output)."""
    ins = {"x": x}
    sh, ln = layer.shared, torch.nn.functional.layer_norm

    def proj(name: str, bias=0.0):
        return ins[gptq.INPUTS[name]] @ getattr(layer, name).T + bias

    q, k, v = proj("q_w", layer.q_b), proj("k_w", layer.k_b), proj("v_w", layer.v_b)
    heads = []
    for j in range(c.num_heads):
        sl = slice(j * c.head_dim, (j + 1) * c.head_dim)
        heads.append(torch.softmax(q[:, sl] @ k[:, sl].T / c.head_dim ** 0.5, dim=-1) @ v[:, sl])
    ins["ctx"] = torch.cat(heads, dim=1)
    ins["mid"] = ln(x + proj("o_w") + sh.o_b, (c.hidden_size,), sh.ln1_w, sh.ln1_b, c.layer_norm_eps)
    ins["act"] = torch.nn.functional.gelu(proj("i_w", layer.i_b))
    out = ln(ins["mid"] + proj("f_w") + sh.f_b, (c.hidden_size,), sh.ln2_w, sh.ln2_b, c.layer_norm_eps)
    return {**ins, "out": out}


def test_grams_are_the_inputs_the_model_sees(tiny_weights, tmp_path):
    """Each Gram matrix equals X^T X over the real (unpadded) tokens of that projection's
    input, computed by hand from the hidden states `encoder.encode` returns (padding and a
    second text included: batches of 2 mix lengths)."""
    c = tiny_weights.config
    tok = Tokenizer(word_tokenizer(tmp_path / "t"))
    texts = [("w1 w2 w3", None), ("w4 w5 w6 w7 w8 w9 w10", None), ("w11", "w12 w13")]
    cal = gptq.measure(tiny_weights, tok, texts, batch_size=2)
    assert cal.texts == 3 and cal.tokens == 5 + 9 + 6
    want = [{} for _ in tiny_weights.layers]
    for text, pair in texts:
        b = tok.encode([text], pairs=[pair] if pair else None)
        states = encode(tiny_weights, b.input_ids, b.attention_mask, all_hidden=True, token_type_ids=b.token_type_ids)
        for i, layer in enumerate(tiny_weights.layers):
            ins = inputs_by_hand(states[i][0], layer, c)
            assert torch.allclose(ins.pop("out"), states[i + 1][0], atol=1e-5)  # the hand-written layer is right
            for kind, t in ins.items():
                want[i][kind] = want[i].get(kind, 0) + t.double().T @ t.double()
    for i, kinds in enumerate(want):
        assert set(cal.grams[i]) == set(gptq.INPUTS.values())
        for kind, gram in kinds.items():
            assert torch.allclose(cal.grams[i][kind], gram, rtol=1e-4, atol=1e-5), (i, kind)


def test_with_uncorrelated_inputs_gptq_is_nearest_rounding():
    """With a diagonal H there is nothing to compensate: GPTQ's codes are nearest rounding's,
    on a shape whose rows are not a whole number of groups (the last group padded)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(9, 100, generator=gen) * 0.05
    gram = torch.diag(torch.rand(100, generator=gen, dtype=torch.float64) + 0.5)
    codes, scale, zero = nearest(w, 3)
    spread = lambda a: gptq._spread(a, tuple(w.shape))  # noqa: E731
    mine = gptq.round_columns(w, spread(scale), spread(zero), 3, *gptq.inverse_factor(gram))
    assert np.array_equal(mine.numpy().ravel().astype(np.uint8), codes)


def output_error(w: torch.Tensor, decoded: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - Q) X||^2 = trace((W - Q) G (W - Q)^T) for the Gram matrix G = X^T X."""
    d = (w - decoded).double()
    return float(torch.einsum("ri,ij,rj->", d, gram, d))


def texts_for(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(116)}" for _ in range(rng.randrange(3, 14))) for _ in range(n)]


def test_a_calibrated_store_errs_less_on_what_the_model_sees(tiny_weights, tmp_path):
    """End to end through the store: at 2 and 3 bits, every projection's output error on
    the calibration inputs is lower in the GPTQ store than in the nearest one, the manifest
    says how the store was rounded, and 32-bit shards are the weights themselves."""
    tok = word_tokenizer(tmp_path / "t")
    texts = texts_for(96)
    build_store(tiny_weights, tmp_path / "g", bits=(2, 3, 32), tokenizer_from=tok, calibration=texts)
    build_store(tiny_weights, tmp_path / "n", bits=(2, 3, 32))
    cal = gptq.measure(tiny_weights, Tokenizer(tok), [(t, None) for t in texts])
    with Store(tmp_path / "g") as g, Store(tmp_path / "n") as n:
        assert g.rounding["method"] == "gptq" and g.rounding["texts"] == 96 and n.rounding == {"method": "nearest"}
        assert g.store_id != n.store_id
        for bits in (2, 3):
            mg, mn = g.load_model(bits), n.load_model(bits)
            for i, layer in enumerate(tiny_weights.layers):
                for name, kind in gptq.INPUTS.items():
                    w = getattr(layer, name)
                    eg = output_error(w, getattr(mg.layers[i], name), cal.grams[i][kind])
                    en = output_error(w, getattr(mn.layers[i], name), cal.grams[i][kind])
                    assert eg < en, (bits, i, name, eg, en)
        assert torch.equal(g.load_model(32).layers[1].f_w, tiny_weights.layers[1].f_w)


def test_calibration_is_refused_where_it_cannot_run(tiny_weights, tmp_path):
    with pytest.raises(ConfigError, match="linear codec"):
        build_store(tiny_weights, tmp_path / "s", bits=(2, 32), codec="gobo", calibration=["w1 w2"])
    with pytest.raises(ConfigError, match="tokenizer"):
        build_store(tiny_weights, tmp_path / "s", bits=(2, 32), calibration=["w1 w2"])
    for bad in ("w1 w2", {"w1": 1}, [None], ["w1", 3], [("w1", "w2", "w3")]):
        with pytest.raises(ConfigError, match="list of texts"):
            build_store(tiny_weights, tmp_path / "s", bits=(2, 32), calibration=bad,
                        tokenizer_from=word_tokenizer(tmp_path / "t"))
    with pytest.raises(ConfigError, match="none were given"):
        build_store(tiny_weights, tmp_path / "s", bits=(2, 32), calibration=[], tokenizer_from=tmp_path / "t")
    assert not (tmp_path / "s").exists()


def test_calibration_texts_from_a_file(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("text\tlabel\n" + "".join(f"sentence {i}\tpos\n" for i in range(100)))
    texts = calibration_texts(f, count=10)
    assert len(texts) == 10 and texts[0] == ("sentence 0", None) and texts[1] == ("sentence 10", None)
    assert calibration_texts(f, count=40)[-1] == ("sentence 97", None)   # spread over the whole file
    assert len(calibration_texts(f, count=500)) == 100
    with pytest.raises(InputError, match="positive integer"):
        calibration_texts(f, count=0)


def test_builtin_calibration_draws_follow_their_seed(real_data_dir):
    """The built-in draw is the training split's, fixed by its seed: seed 0 is the default
    (what `sti build` calibrates on), another seed another sample, never a dev or test text."""
    from sti.data import load_split
    default, again, other = calibration_texts(count=64), calibration_texts(count=64, seed=0), calibration_texts(count=64, seed=1)
    assert default == again and len(default) == 64 and len(set(default)) == 64
    assert len(set(default) & set(other)) < 16
    held_out = {(e.text, e.text_pair) for split in ("dev", "test") for e in load_split(split)}
    assert not (set(default) | set(other)) & held_out


def test_a_store_manifest_with_a_bad_rounding_is_refused(tiny_weights, tmp_path):
    import json
    from sti.errors import StoreError
    from sti.store import MANIFEST, compute_store_id
    build_store(tiny_weights, tmp_path / "s", bits=(2, 32))
    m = json.loads((tmp_path / "s" / MANIFEST).read_text())
    m["rounding"] = {"method": "magic"}
    m["store_id"] = compute_store_id(m)
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError, match="rounding"):
        Store(tmp_path / "s")
    del m["rounding"]  # a store written before stores said: rounded to nearest
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(m))
    with Store(tmp_path / "s") as s:
        assert s.rounding == {"method": "nearest"}


@pytest.mark.real
def test_gptq_brings_the_real_model_closer_at_2_bits(real_model_dir, real_data_dir, tmp_path):
    """The real MiniLM at 2 bits: sentence embeddings (mean of the last hidden states) of
    held-out texts are closer to the fp32 model's with GPTQ rounding than with nearest."""
    from sti.data import load_split
    from sti.encoder import mean_pool
    from sti.weights import load_model_dir
    weights = load_model_dir(real_model_dir, fresh_head=True)
    texts = calibration_texts(count=128)
    build_store(weights, tmp_path / "g", bits=(2, 32), tokenizer_from=real_model_dir, calibration=texts)
    build_store(weights, tmp_path / "n", bits=(2, 32))
    tok = Tokenizer(real_model_dir)
    batch = tok.encode([e.text for e in load_split("dev")[:64]])

    def pooled(w):
        with torch.no_grad():
            return mean_pool(encode(w, batch.input_ids, batch.attention_mask), batch.attention_mask)

    ref = pooled(weights)
    with Store(tmp_path / "g") as g, Store(tmp_path / "n") as n:
        err_g = (pooled(g.load_model(2)) - ref).norm(dim=1).mean().item()
        err_n = (pooled(n.load_model(2)) - ref).norm(dim=1).mean().item()
    assert err_g < 0.8 * err_n, (err_g, err_n)


def test_sti_build_calibrates_on_a_file_or_not_at_all(tiny_weights, tmp_path):
    """`sti build --calibration FILE` rounds by GPTQ on the file's texts, `none` to nearest,
    and a file with a codec that has no GPTQ rounding is refused with a message."""
    from typer.testing import CliRunner
    from sti.cli import app
    from sti.weights import save_model_dir
    model = save_model_dir(tiny_weights, tmp_path / "m", tokenizer_from=word_tokenizer(tmp_path / "t"))
    data = tmp_path / "d.txt"
    data.write_text("\n".join(texts_for(40)) + "\n")
    run = CliRunner().invoke
    ok = run(app, ["build", str(model), str(tmp_path / "g"), "--bits", "2,32", "--calibration", str(data)])
    assert ok.exit_code == 0, ok.output
    assert Store(tmp_path / "g").rounding["texts"] == 40
    ok = run(app, ["build", str(model), str(tmp_path / "n"), "--bits", "2,32", "--calibration", "none"])
    assert ok.exit_code == 0 and Store(tmp_path / "n").rounding == {"method": "nearest"}
    bad = run(app, ["build", str(model), str(tmp_path / "b"), "--codec", "gobo", "--calibration", str(data)])
    assert isinstance(bad.exception, ConfigError) and "linear codec" in str(bad.exception)  # main() prints it
    assert not (tmp_path / "b").exists()
