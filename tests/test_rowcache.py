"""The resident embedding rows: compact rows within their bound, misses always read and
hits never, the planner's split of M, and the engine's answers with rows resident."""

import dataclasses

import pytest
import torch

from sti.encoder import classify
from sti.planning import PlanError, PlanSet, make_plan_set_with_rows
from sti.planning.rows import plans_with
from sti.rowcache import ROW_BOUND, ResidentRows, RowCache, compact, expand, most_frequent, token_counts
from sti.runtime import Engine
from sti.store import Store, build_store
from sti.tokenizer import Tokenizer
from sti.weights import Embeddings
from tests.conftest import word_tokenizer
from tests.test_runtime import TEXTS, profiles

SAMPLE = ["w1 w2 w3", "w1 w2 w9 w9", "w1 w5", "w2 w3 w7 w8 w1", "w1 w2 w3 w4 w5 w6 w7", "w11 w1"] * 4


@pytest.fixture()
def store(tiny_weights, tmp_path):
    return build_store(tiny_weights, tmp_path / "store", bits=(2, 4, 32), tokenizer_from=word_tokenizer(tmp_path / "t"))


def slow_rows(device):
    """A profile under which reading embedding rows is what the request waits for."""
    return dataclasses.replace(device, embed_ms=(0.5, 0.3))


def test_compact_rows_stay_within_their_bound():
    rows = torch.randn(50, 32) * torch.logspace(-3, 1, 50)[:, None]
    codes, scale = compact(rows)
    assert codes.dtype == torch.int8 and scale.shape == (50,)
    err = (expand(codes, scale) - rows).abs()
    assert (err <= ROW_BOUND * scale[:, None] + 1e-12).all()
    assert err.max() > 0  # int8 is not exact: the bound is what is promised


def test_hits_come_from_the_cache_and_misses_are_always_read(store, monkeypatch):
    with Store(store) as s:
        fp32 = s.table_rows("word", range(s.config.vocab_size))
        cache = RowCache((2, 3, 5, 6), positions=8, hidden=s.config.hidden_size)
        rows = ResidentRows(s, cache)
        asked = []
        original = s.table_rows
        monkeypatch.setattr(s, "table_rows", lambda table, ids: asked.append((table, list(ids))) or original(table, ids))
        ids = [2, 5, 40, 6, 40, 77, 2, 3]
        got, hits, misses = rows.words(ids)
    assert asked == [("word", [40, 77])] and misses == [40, 77] and hits == 4
    for k, i in enumerate(ids):
        if i in cache.held:
            scale = fp32[i].abs().max() / 127
            assert (got[k] - fp32[i]).abs().max() <= ROW_BOUND * scale + 1e-9
        else:
            assert torch.equal(got[k], fp32[i])  # a row read is the fp32 row, exactly
    assert rows.positions(9) is None and rows.positions(8).shape == (8, cache.hidden)


def test_counts_take_a_token_once_per_request():
    counts = token_counts([[2, 5, 5, 3], [2, 3], [2, 9]])
    assert counts == {2: 3, 3: 2, 5: 1, 9: 1}
    assert most_frequent(counts, 3) == (2, 3, 5)  # ties by token id


def test_engine_with_resident_rows_answers_as_the_encoder_on_those_rows(store):
    with Store(store, "warm") as s:
        device, importance = profiles(s)
        tok = Tokenizer(store)
        tokens = tok.ids(SAMPLE)
        cache = RowCache(most_frequent(token_counts(tokens), 6), 16, s.config.hidden_size)
        plans = plans_with(cache, device, importance, s.store_id, 1e4, 1e7, tokens, 16, s.tables["word"][1],
                           fixed_bytes=0)
        weights = s.load_model(32)
    e = weights.embeddings
    word = e.word.clone()
    held = torch.tensor(cache.words)
    word[held] = expand(*compact(e.word[held]))
    position = e.position.clone()
    position[:16] = expand(*compact(e.position[:16]))
    reference = dataclasses.replace(weights, embeddings=Embeddings(word, position, e.token_type, e.ln_w, e.ln_b))
    with Engine(Store(store, "warm"), plans, device, storage="warm", guard=False, max_length=16) as engine:
        assert engine.rows.nbytes == cache.nbytes and engine.resident_bytes >= cache.nbytes
        for text in TEXTS:
            r = engine.run(text)
            batch = tok.encode([text])
            want = classify(reference, batch.input_ids, batch.attention_mask)[0]
            assert (r.logits - want).abs().max().item() < 1e-5
            ids = batch.input_ids[0].tolist()
            assert r.report.embed_misses == len(cache.misses(ids))
            assert r.report.embed_hits == len(set(ids)) - r.report.embed_misses


def test_planner_buys_rows_when_reading_them_is_slow_and_keeps_to_m(store):
    with Store(store) as s:
        device, importance = profiles(s)
        slow, tokens = slow_rows(device), Tokenizer(store).ids(SAMPLE)
        args = (importance, s.store_id, 2.0)  # so short that reading every row leaves little for shards
        fixed = 1000
        choices = []
        for mem in (2e4, 4e4, 8e4, 1.6e5, 1e6):
            try:
                p = make_plan_set_with_rows(slow, *args, mem, tokens, 16, s.config.hidden_size, s.tables["word"][1],
                                            fixed_bytes=fixed)
            except PlanError:
                continue
            rows = p.rows.nbytes if p.rows else 0
            assert all(plan.request.fixed_bytes == fixed + rows for plan in p.plans)
            # rows + the other fixed parts + the preload buffer within M
            assert all(plan.request.fixed_bytes + plan.predicted.preload_bytes <= mem for plan in p.plans)
            choices.append((mem, rows, p.expected_accuracy))
        fast = make_plan_set_with_rows(device, *args, 1e6, tokens, 16, s.config.hidden_size, s.tables["word"][1],
                                       fixed_bytes=fixed)
    assert len(choices) >= 3 and choices[-1][1] > 0, "with slow rows and room to spare, rows are worth holding"
    accs = [a for _, _, a in choices]
    assert accs == sorted(accs), "more M never plans a lower expected accuracy"
    assert fast.rows is None, "when reading a row costs nothing, M goes to shards"


def test_plan_set_json_keeps_the_rows_and_refuses_rows_outside_m(store):
    with Store(store) as s:
        device, importance = profiles(s)
        tokens = Tokenizer(store).ids(SAMPLE)
        cache = RowCache(most_frequent(token_counts(tokens), 4), 16, s.config.hidden_size)
        plans = plans_with(cache, slow_rows(device), importance, s.store_id, 1e4, 1e7, tokens, 16, s.tables["word"][1])
    again = PlanSet.from_json(plans.to_json())
    assert again.rows == cache and again == plans
    cheat = dataclasses.replace(plans, rows=RowCache(cache.words, 16 + 2000, cache.hidden))
    with pytest.raises(PlanError, match="must be counted in M"):
        PlanSet.from_json(cheat.to_json())


def test_rows_held_are_the_most_frequent_by_the_given_counts(store):
    # the cache is ranked by the frequency sample (e.g. the training split), not by the
    # requests whose misses the plans are costed on
    with Store(store) as s:
        device, importance = profiles(s)
        tokens = Tokenizer(store).ids(SAMPLE)
        other = token_counts(Tokenizer(store).ids(["w7 w8 w9 w10", "w7 w8", "w8"] * 5))
        args = (slow_rows(device), importance, s.store_id, 4.0, 1e6, tokens, 16, s.config.hidden_size,
                s.tables["word"][1])
        own, given = make_plan_set_with_rows(*args), make_plan_set_with_rows(*args, counts=other)
    assert own.rows and given.rows
    assert own.rows.words == most_frequent(token_counts(tokens), len(own.rows.words))
    assert given.rows.words == most_frequent(other, len(given.rows.words)) != own.rows.words[:len(given.rows.words)]
