"""Your own data end to end on a tiny store: sentence pairs through the engine, `sti eval`'s
served figures against the engine's own answers, `sti run` from standard input against the
same texts as arguments, importance measured on a file, fine-tuning on files."""

import dataclasses
import importlib
import json

import pytest
import torch
from typer.testing import CliRunner

from sti import api
from sti.cli import app
from sti.config import ModelConfig
from sti.data import Example
from sti.datafile import read_examples
from sti.encoder import Submodel, classify
from sti.errors import InputError
from sti.evaluate import accuracy
from sti.profile_importance import measure_importance
from sti.profiles import save_profile
from sti.rowcache import token_counts
from sti.store import Store, build_store
from sti.tokenizer import Tokenizer
from sti.weights import ModelWeights, load_model_dir, save_model_dir
from tests.conftest import generous_profiles, word_tokenizer

ft = importlib.import_module("sti.finetune")
QUIET = {"log": lambda *a: None}
ENGINE = {"storage": "warm", "calibrate": False, "seq_len": 16}  # no built-in data needed


def rows_tsv(path, n=14, pairs=True):
    lines = ["text\ttext_pair\tlabel" if pairs else "text\tlabel"]
    for i in range(n):
        text = " ".join(f"w{(7 * i + k) % 110 + 4}" for k in range(2 + i % 5))
        pair = " ".join(f"w{(3 * i + k) % 50 + 4}" for k in range(1 + i % 3))
        label = "positive" if i % 3 else "negative"
        lines.append(f"{text}\t{pair}\t{label}" if pairs else f"{text}\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def store(tmp_path, tiny_config):
    weights = ModelWeights.random(tiny_config, seed=5)
    with torch.no_grad():  # token types that matter, and labels that differ
        weights.embeddings.token_type.mul_(40.0)
        weights.head.w.mul_(300.0)
    path = build_store(weights, tmp_path / "store", bits=(2, 4, 32), tokenizer_from=word_tokenizer(tmp_path / "tok"))
    generous_profiles(path)
    return path


def cli(*args, input=None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.stdout


def test_pairs_reach_the_engine_as_token_types(store):
    tok = Tokenizer(store)
    batch = tok.encode(["w1 w2"], pairs=["w3 w4 w5"])
    assert batch.input_ids[0].tolist() == [2, 5, 6, 3, 7, 8, 9, 3]
    assert batch.token_type_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    with Store(store) as s:
        weights = s.load_model(32)
    want = classify(weights, batch.input_ids, batch.attention_mask, token_type_ids=batch.token_type_ids)[0]
    untyped = classify(weights, batch.input_ids, batch.attention_mask)[0]
    assert (want - untyped).abs().max() > 1e-2, "token types must change the answer, or this test proves nothing"
    with api.open_engine(store, 1e5, 1000, **ENGINE, **QUIET) as engine:
        got = engine.run("w1 w2", "w3 w4 w5").logits
    assert (got - want).abs().max().item() < 1e-5


def test_eval_scores_the_labels_the_engine_returned(store, tmp_path):
    data = rows_tsv(tmp_path / "test.tsv")
    served = api.evaluate_file(store, data, 1e5, 1000, **ENGINE, **QUIET)
    examples = read_examples(data, ("negative", "positive"))
    with api.open_engine(store, 1e5, 1000, **ENGINE, **QUIET) as engine:
        labels = [engine.run(e.text, e.text_pair).label for e in examples]
    gold = [("negative", "positive")[e.label] for e in examples]
    assert served.requests == served.total == len(examples) and not served.interrupted
    assert served.served_accuracy == pytest.approx(sum(a == b for a, b in zip(labels, gold)) / len(gold))
    assert 0 < served.served_accuracy < 1, "labels that all agree (or all differ) would hide a scoring bug"
    with Store(store) as s:
        full = accuracy(s.load_model(32), Tokenizer(store), examples)
    assert served.full_accuracy == pytest.approx(full)
    assert served.hit_rate == 1.0 and served.data["examples"] == len(examples)

    figures = json.loads(cli("eval", store, "--data", data, "--latency-ms", 1e5, "--memory-mb", 1000,
                             "--storage", "warm", "--no-calibrate", "--json"))
    assert figures["served_accuracy"] == pytest.approx(served.served_accuracy)
    assert figures["data"]["sha256"] == served.data["sha256"]

    stopped = api.evaluate_file(store, data, 1e5, 1000, progress=lambda done, total: done < 5, **ENGINE, **QUIET)
    assert stopped.requests == 5 and stopped.interrupted and stopped.total == len(examples)


def test_eval_resizes_the_engine_between_requests_and_reports_it(store, tmp_path):
    data = rows_tsv(tmp_path / "rows.tsv", n=10)
    args = ("eval", store, "--data", data, "--latency-ms", 1e5, "--memory-mb", 1000, "--storage", "warm",
            "--no-calibrate")
    figures = json.loads(cli(*args, "--resize-after", "4:0.01", "--follow", "--json"))
    assert figures["requests"] == 10 and len(figures["changes"]) == 1
    change = figures["changes"][0]
    assert change["kind"] == "retarget" and change["from_request"] == 4
    assert change["old"]["memory_bytes"] == 1000 * 10**6 and change["new"]["memory_bytes"] == 10**4
    assert change["new"]["preload_bytes"] < min(10**4, change["old"]["preload_bytes"])
    assert "from request 4: new targets: T 100000 ms, M 0.01 MB" in cli(*args, "--resize-after", "4:0.01")
    # a budget nothing fits: said, and the engine serves on with its plans
    assert "no plan fits 0 MB, the plans are kept" in cli(*args, "--resize-after", "4:0")
    with pytest.raises(InputError, match="N:MB"):
        cli(*args, "--resize-after", "four")
    with pytest.raises(InputError, match="emulated storage only"):
        cli(*args, "--slow-after", "3")


def test_macro_f1_for_more_than_two_labels():
    from sti.evaluate import macro_f1
    # label 0: P 1/2 R 1 -> 2/3; label 1: P 1 R 1/2 -> 2/3; label 2: 1
    assert macro_f1([0, 0, 1, 2], [0, 1, 1, 2], 3) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_run_from_standard_input_equals_the_same_texts_as_arguments(store):
    texts = ["w1 w2 w3", "w9", "w4 w4 w8 w100"]
    as_args = [json.loads(x) for x in cli("run", store, *texts, "--exact", "--json").splitlines()]
    piped = [json.loads(x) for x in cli("run", store, "--input", "-", "--exact", "--json",
                                        input="\n".join(texts) + "\n").splitlines()]
    assert as_args == piped and [a["text"] for a in as_args] == texts
    engine_args = ("--latency-ms", 1e5, "--memory-mb", 1000, "--storage", "warm", "--no-calibrate", "--seq-len", 16,
                   "--json")
    a = [json.loads(x) for x in cli("run", store, *texts, *engine_args).splitlines()]
    b = [json.loads(x) for x in cli("run", store, "--input", "-", *engine_args, input="\n".join(texts)).splitlines()]
    assert [x["logits"] for x in a] == [x["logits"] for x in b]
    assert [x["label"] for x in a] == [x["label"] for x in as_args]


def test_run_takes_pairs_from_options_and_jsonl(store):
    jsonl = "\n".join(json.dumps({"text": t, "text_pair": p}) for t, p in [("w1 w2", "w3"), ("w5", "w6 w7")])
    piped = [json.loads(x) for x in cli("run", store, "--input", "-", "--exact", "--json", input=jsonl).splitlines()]
    given = [json.loads(x) for x in cli("run", store, "w1 w2", "w5", "--pair", "w3", "--pair", "w6 w7", "--exact",
                                        "--json").splitlines()]
    assert piped == given and given[0]["text_pair"] == "w3"
    exact = api.classify_exact(store, ["w1 w2", "w5"], pairs=["w3", "w6 w7"])
    assert [g["logits"] for g in given] == [e["logits"] for e in exact]
    result = CliRunner().invoke(app, ["run", str(store), "w1", "w2", "--pair", "w3", "--exact"])
    assert result.exit_code != 0 and "one --pair per text" in str(result.exception or result.output)
    with pytest.raises(InputError, match="give texts to classify, or --input FILE"):
        cli("run", store, "--exact")


def test_importance_on_a_data_file_is_recorded_and_planned_for(store, tmp_path, monkeypatch):
    data = rows_tsv(tmp_path / "dev.tsv", n=20)
    prof = measure_importance(store, method="gradient", data=data, batch_size=6)
    examples = read_examples(data, ("negative", "positive"))
    with Store(store) as s:
        weights, c = s.load_model(32), s.config
    tok = Tokenizer(store)
    assert prof.split == "file" and prof.data["examples"] == 20
    assert prof.full_accuracy == pytest.approx(accuracy(weights, tok, examples))
    assert prof.submodel_accuracy["2,2"] == pytest.approx(accuracy(weights, tok, examples, Submodel.of(c, 2, 2)))
    save_profile(prof, api.importance_profile_path(store, "gradient", data=True))
    # the profile of the user's data is preferred to the (built-in data's) degrade one saved beside it,
    # which stays (the benchmark, on the built-in task, asks for it)
    assert api.importance_profile(store, **QUIET).data == prof.data
    assert api.importance_profile(store, builtin=True, **QUIET).data is None
    requests, source = api.sample_requests(prof)
    assert requests == [(e.text, e.text_pair) for e in examples] and "dev.tsv" in source
    lengths = api.request_lengths(store, requests=requests)
    assert lengths == tok.lengths([e.text for e in examples], [e.text_pair for e in examples])
    # the row cache's token frequencies are the whole file's
    ids = Tokenizer(store, max_length=16).ids([e.text for e in examples], [e.text_pair for e in examples])
    assert api.row_counts(store, 16, prof) == token_counts(ids)
    data.write_text(data.read_text() + "w1\tw2\tpositive\n")  # changed: its lengths are no longer the profile's
    monkeypatch.setattr(api, "dev_texts", lambda: ["w1"])
    assert api.sample_requests(prof) == ([("w1", None)], "dev split")
    assert api.importance_profile(store, **QUIET).data is None  # nor is the profile of the old file preferred
    import sti.data
    monkeypatch.setattr(sti.data, "load_split", lambda name: [Example("t0", "w4 w4 w2", 0)] if name == "train" else [])
    assert api.row_counts(store, 16, prof) == token_counts(Tokenizer(store, max_length=16).ids(["w4 w4 w2"]))


def small_base(tmp_path):
    config = ModelConfig(hidden_size=48, num_layers=6, num_heads=12, intermediate_size=96, vocab_size=120,
                         max_position=64)
    return save_model_dir(ModelWeights.random(config, seed=3), tmp_path / "base",
                          tokenizer_from=word_tokenizer(tmp_path / "tok"))


def test_finetune_on_your_own_pairs(tmp_path):
    base = small_base(tmp_path)
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    for path, n in ((train, 48), (dev, 12)):
        path.write_text("\n".join(json.dumps({"premise": f"w{i % 90 + 4} w{i % 7 + 4}", "hypothesis": f"w{i % 5 + 9}",
                                              "gold_label": ["yes", "no", "maybe"][i % 3]}) for i in range(n)))
    cfg = ft.FinetuneConfig(preset="quick", batch_size=8, teacher_epochs=0.5, elastic_epochs=0.25, max_length=32)
    task = ft.user_task(train, dev)
    assert task.labels == ("maybe", "no", "yes")
    out = ft.finetune(tmp_path / "mine", cfg=cfg, base_dir=base, task=task, **QUIET)
    model = load_model_dir(out)
    assert model.config.labels == ("maybe", "no", "yes") and model.config.elastic
    metrics = ft.read_metrics(out)
    assert metrics["split"] == "dev.jsonl" and metrics["test_size"] == 12
    assert metrics["data"]["train"]["examples"] == 48 and metrics["labels"] == ["maybe", "no", "yes"]
    stamp = json.loads((tmp_path / "mine.teacher" / "teacher.json").read_text())["stamp"]
    assert stamp["train_sha256"] == metrics["data"]["train"]["sha256"]


def test_finetune_refuses_what_it_cannot_write(tmp_path):
    base = small_base(tmp_path)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "model_type": "distilbert", "dim": 48, "n_layers": 6,
                                                  "n_heads": 12, "hidden_dim": 96}))
    with pytest.raises(InputError, match="writes BERT models only, and this base is distilbert"):
        ft.finetune(tmp_path / "out", cfg=ft.FinetuneConfig(), base_dir=base, **QUIET)
    with pytest.raises(InputError, match="needs an output directory"):
        ft.finetune(None, task=dataclasses.replace(ft.Task(), train=tmp_path / "t.tsv"), **QUIET)


def test_ctrl_c_during_eval_keeps_what_was_measured(store, tmp_path):
    from sti.evaluate import serve
    examples = read_examples(rows_tsv(tmp_path / "t.tsv"), ("negative", "positive"))
    with api.open_engine(store, 1e5, 1000, **ENGINE, **QUIET) as engine:
        run, calls = engine.run, []

        def interrupted_at_the_fourth(*args):
            calls.append(args)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return run(*args)
        engine.run = interrupted_at_the_fourth
        served = serve(engine, examples)
        assert served.requests == 3 and served.interrupted and served.total == len(examples)
        engine.run = run
        assert engine.run(examples[0].text).label in engine.config.labels  # the engine still serves


def test_an_engine_opened_with_a_profile_uses_it_as_it_is(store, monkeypatch):
    # several engines from one calibration (bench_drift does): the profile given is neither
    # loaded nor calibrated again, and the plans are made from it
    device = dataclasses.replace(api.device_profile(store, "warm", log=lambda *a: None), head_ms=0.123)
    monkeypatch.setattr(api, "calibrated_device", lambda *a, **k: pytest.fail("calibrated again"))
    monkeypatch.setattr(api, "device_profile", lambda *a, **k: pytest.fail("loaded again"))
    with api.open_engine(store, 1e5, 1000, device=device, **{**ENGINE, "calibrate": True}, **QUIET) as engine:
        assert engine.device == device
        assert engine.run("w1 w2").label in engine.config.labels
