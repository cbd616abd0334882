"""Elastic fine-tuning on a small random model of the real model's shape (6 layers, 12
shards) and a slice of the real data: batching, the whole command, the teacher cache,
Ctrl-C. Accuracy targets need the real model and an hour; they are in metrics.json."""

import dataclasses
import importlib
import json
import random
import shutil
from collections import Counter
from dataclasses import replace

import pytest
import torch

from sti.config import ModelConfig
from sti.data import load_split
from sti.errors import Cancelled
from sti.tokenizer import Tokenizer
from sti.weights import ModelWeights, load_model_dir, save_model_dir
from tests.conftest import word_tokenizer

ft = importlib.import_module("sti.finetune")  # the module; `sti.finetune` is the function

SMALL = ModelConfig(hidden_size=48, num_layers=6, num_heads=12, intermediate_size=96,
                    vocab_size=120, max_position=64)


@pytest.fixture()
def base_dir(tmp_path, real_data_dir):
    tok_dir = word_tokenizer(tmp_path / "tok")
    return save_model_dir(ModelWeights.random(SMALL, seed=3), tmp_path / "base", tokenizer_from=tok_dir)


def tiny_cfg(**changes):
    cfg = ft.FinetuneConfig(preset="quick", batch_size=8, teacher_epochs=0.5, elastic_epochs=0.25,
                            qat_epochs=0.25, train_limit=64, eval_limit=24, max_length=32)
    return replace(cfg, **changes)


def test_length_buckets_cover_each_example_once_with_little_padding():
    gen = random.Random(5)
    lengths = [gen.randint(5, 60) for _ in range(1000)]
    batches = ft._length_buckets(lengths, 32, random.Random(0), pool=10)
    assert Counter(i for b in batches for i in b) == Counter(range(1000))
    assert Counter(len(b) for b in batches) == {32: 31, 8: 1}  # the last pool's remainder
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    shuffled = list(range(1000))
    random.Random(0).shuffle(shuffled)
    plain = sum(max(lengths[i] for i in shuffled[s:s + 32]) * len(shuffled[s:s + 32]) for s in range(0, 1000, 32))
    assert padded < 0.7 * plain  # random batches pad to their longest, buckets nearly not
    # Random across pools and epochs: a different seed gives a different order.
    assert batches != ft._length_buckets(lengths, 32, random.Random(1), pool=10)


@pytest.mark.real
def test_steps_count_fractional_epochs_and_bucket_real_texts(real_model_dir, real_data_dir):
    train = load_split("train")[:400]
    cfg = ft.FinetuneConfig(batch_size=20)
    steps = list(ft._steps(train, Tokenizer(real_model_dir, max_length=64), cfg, 1.5, random.Random(0)))
    assert len(steps) == 30
    widths = [b.input_ids.shape[1] for b, _ in steps[:20]]
    lengths = [n for b, _ in steps[:20] for n in b.lengths]
    assert sum(widths) * 20 < 1.3 * sum(lengths)  # under 30% padding in the first epoch
    assert all(labels.shape == (20,) for _, labels in steps)


@pytest.mark.real
def test_finetune_writes_model_metrics_and_reuses_the_teacher(tmp_path, base_dir):
    out = tmp_path / "elastic"
    logs = []
    ft.finetune(out, cfg=tiny_cfg(), base_dir=base_dir, log=logs.append)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.json"} <= files
    metrics = ft.read_metrics(out)
    assert [(c["n"], c["m"]) for c in metrics["grid"]] == ft.grid()
    assert all(0 <= c["elastic"] <= 1 and 0 <= c["rewired_only"] <= 1 for c in metrics["grid"])
    assert metrics["test_size"] == 24 and metrics["anchors"] == [list(a) for a in ft.ANCHORS]
    first = load_model_dir(out)
    assert first.config == dataclasses.replace(SMALL, elastic=True)  # the output is marked elastic
    assert not any("reusing" in line for line in logs)

    # Interrupted after the teacher (the output is gone, the cached teacher is not): the rerun
    # reuses the teacher and, with the elastic step's own seeds, trains the same model.
    shutil.rmtree(out)
    shutil.rmtree(out.with_name(out.name + ".elastic"))
    ft.finetune(out, cfg=tiny_cfg(), base_dir=base_dir, log=logs.append)
    assert any("teacher: reusing" in line for line in logs) and not any("elastic: reusing" in line for line in logs)
    again = load_model_dir(out)
    for name, tensor in first.tensors().items():
        assert torch.equal(tensor, again.tensors()[name]), name
    assert ft.read_metrics(out)["train_seconds"]["teacher_s"] == metrics["train_seconds"]["teacher_s"]

    assert set(ft.read_metrics(out)["quantized"]) == {"2", "3", "4"} and "qat_s" in metrics["train_seconds"]

    # Interrupted in the quantization-aware step: the rerun starts there, with the same result.
    logs.clear()
    shutil.rmtree(out)
    ft.finetune(out, cfg=tiny_cfg(), base_dir=base_dir, log=logs.append)
    assert any("elastic: reusing" in line for line in logs)
    assert all(torch.equal(t, load_model_dir(out).tensors()[k]) for k, t in first.tensors().items())

    # Other quantization-aware settings: the elastic model is reused, the last stage is not.
    logs.clear()
    ft.finetune(out, cfg=tiny_cfg(qat_lr=1e-3), base_dir=base_dir, log=logs.append)
    assert any("elastic: reusing" in line for line in logs)
    assert not torch.equal(load_model_dir(out).layers[0].q_w, first.layers[0].q_w)

    # Other teacher settings: the cached teacher is not used.
    logs.clear()
    other_lr = 2 * tiny_cfg().teacher_lr
    ft.finetune(out, cfg=tiny_cfg(teacher_lr=other_lr), base_dir=base_dir, log=logs.append)
    assert any("other settings" in line for line in logs)
    stamp = json.loads((tmp_path / "elastic.teacher" / "teacher.json").read_text())["stamp"]
    assert stamp["teacher_lr"] == other_lr

    # Another base model under the same path: not the cached teacher either.
    logs.clear()
    save_model_dir(ModelWeights.random(SMALL, seed=4), base_dir, tokenizer_from=base_dir)
    ft.finetune(out, cfg=tiny_cfg(teacher_lr=other_lr), base_dir=base_dir, log=logs.append)
    assert any("other settings" in line for line in logs)


@pytest.mark.real
def test_interrupted_finetune_writes_nothing(tmp_path, base_dir, monkeypatch):
    out = tmp_path / "elastic"
    save_model_dir(ModelWeights.random(SMALL, seed=9), out)  # an older model must survive
    before = (out / "model.safetensors").read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ft, "elastic_loss", interrupt)
    with pytest.raises(Cancelled, match="nothing was written"):
        ft.finetune(out, cfg=tiny_cfg(), base_dir=base_dir, log=lambda *a: None)
    assert (out / "model.safetensors").read_bytes() == before
    assert not (out / "metrics.json").exists()
    assert (tmp_path / "elastic.teacher" / "teacher.json").exists()  # finished work is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "elastic", "elastic.teacher", "tok"]


def test_unknown_preset_is_refused():
    from sti.errors import InputError
    with pytest.raises(InputError, match="choose 'full' or 'quick'"):
        ft.FinetuneConfig.preset_named("fast")


def test_targeted_submodels_are_trained_on_every_step():
    assert set(ft.GAP_TARGETS) | {ft.FULL} <= set(ft.ANCHORS) <= set(ft.grid())


def test_target_checks_name_each_target_and_its_verdict():
    cells = {(n, m): 0.80 for n, m in ft.grid()}
    cells.update({(6, 12): 0.861, (6, 6): 0.842, (6, 3): 0.80, (3, 12): 0.83})
    metrics = {"preset": "full", "total_train_seconds": 61 * 60,
               "grid": [{"n": n, "m": m, "elastic": a} for (n, m), a in cells.items()],
               "quantized": {"2": 0.852, "3": 0.857, "4": 0.860}}
    verdicts = [met for _, met in ft.target_checks(metrics)]
    # (6, 3) is 6.1 below; 3 bits 0.4 below (target 0.3); 61 > 60 min
    assert verdicts == [True, True, False, True, True, False, True, False]
    lines = [line for line, _ in ft.target_checks(metrics)]
    assert "(6, 6) 1.9 points below" in lines[1] and "3 bits, nearest rounding, 0.4 points below" in lines[5]
    assert "61.0 min" in lines[7]
    assert "target <= 45" in lines[7]  # 60 with the quantization-aware step
    metrics["train_seconds"] = {"qat_s": 300.0}
    assert ft.target_checks(metrics)[7] == ("training 61.0 min (target <= 60 for the full preset)", False)
    del metrics["quantized"]  # a model trained before the quantized figures: those lines left out
    assert len(ft.target_checks(metrics)) == 5
