"""Hugging Face checkpoints in: which family, which head, which file format.

A model directory as `save_pretrained` writes it (config.json and weights) becomes a
ModelConfig and tensors under one naming, BERT's without the "bert." prefix, so the rest of
sti knows one layout. Nothing is guessed:
  - the family comes from `model_type`: BERT (MiniLM is one), RoBERTa (position ids start
    after its padding index) and DistilBERT (other tensor names, no token types) run
    exactly; anything else is refused, naming what it is;
  - the head comes from config.json's "sti" entry (models sti wrote), else from
    `architectures` (the *ForSequenceClassification heads: BERT's pooler, RoBERTa's
    classification head, DistilBERT's pre-classifier), else from sentence-transformers'
    modules.json and its Pooling config (mean or first-token pooling); a checkpoint whose
    head cannot be told, or whose head tensors are missing, is refused;
  - weights come from model.safetensors, sharded safetensors (model.safetensors.index.json)
    or pytorch_model.bin, the last loaded with `weights_only=True` so that a pickle holding
    code is refused, never run.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .assets import sha256_file
from .config import ModelConfig
from .errors import ConfigError

SUPPORTED = ("bert", "roberta", "distilbert")
CLASSIFIER = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
              "distilbert": "DistilBertForSequenceClassification"}
# (pooling, dense activation) of each family's sequence-classification head
CLASSIFIER_HEAD = {"bert": ("cls", "tanh"), "roberta": ("cls", "tanh"), "distilbert": ("cls", "relu")}
# head tensors of each family's classifier -> our (BERT's) names
HEAD_NAMES = {
    "bert": {"pooler.dense.weight": "pooler.dense.weight", "pooler.dense.bias": "pooler.dense.bias",
             "classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"},
    "roberta": {"classifier.dense.weight": "pooler.dense.weight", "classifier.dense.bias": "pooler.dense.bias",
                "classifier.out_proj.weight": "classifier.weight", "classifier.out_proj.bias": "classifier.bias"},
    "distilbert": {"pre_classifier.weight": "pooler.dense.weight", "pre_classifier.bias": "pooler.dense.bias",
                   "classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"},
}
# DistilBERT's layer tensors -> BERT's (below "transformer.layer.{i}." / "encoder.layer.{i}.")
DISTILBERT_LAYER = {
    "attention.q_lin": "attention.self.query", "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value", "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm", "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense", "output_layer_norm": "output.LayerNorm",
}
CONVERT_HINT = ("convert it with transformers: AutoModelForSequenceClassification.from_pretrained(DIR)"
                ".save_pretrained(OUT) writes model.safetensors")


def read_checkpoint(path: str | Path, fresh_head: bool = False,
                    labels: tuple[str, ...] = ("negative", "positive")) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, tensors under BERT's names) of a Hugging Face model directory. With
    `fresh_head` the checkpoint's head is ignored: the config pools by the mean into
    `labels` (by default the built-in task's two), and the tensors hold the encoder only."""
    path = Path(path)
    hf = read_config_json(path)
    family = family_of(hf, path)
    tensors = to_bert_names(family, read_tensors(path), path)
    if fresh_head:
        config = config_of(hf, family, path, pooling="mean", head_act="none", elastic=False, labels=tuple(labels))
        return config, {k: v for k, v in tensors.items() if not k.startswith(("classifier.", "pooler."))}
    pooling, head_act, elastic = head_of(hf, family, tensors, path)
    labels = labels_of(hf, path)
    return config_of(hf, family, path, pooling, head_act, elastic, labels), tensors


# --- config.json ---------------------------------------------------------------------------
def read_json(f: Path, missing: str):
    """A JSON file of the checkpoint; `missing` is the message when it is not there."""
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise ConfigError(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{f} is not valid JSON: {exc}") from None


def read_config_json(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"{path} does not exist: give a Hugging Face model directory")
    if not path.is_dir():
        raise ConfigError(f"{path} is a file: give the model directory that holds config.json and the weights")
    f = path / "config.json"
    hf = read_json(f, f"no config.json in {path}: is this a Hugging Face model directory?")
    if not isinstance(hf, dict):
        raise ConfigError(f"{f} is not a JSON object")
    return hf


def architectures(hf: dict, path: Path) -> list[str]:
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{path}/config.json: architectures must be a list of class names, got {archs!r:.80}")
    return archs


def family_of(hf: dict, path: Path) -> str:
    model_type = hf.get("model_type")
    archs = architectures(hf, path)
    if model_type not in SUPPORTED:
        what = f"model_type {model_type!r}" + (f" ({', '.join(map(str, archs))})" if archs else "")
        raise ConfigError(f"{path}: {what} is not supported: sti runs BERT (and MiniLM), RoBERTa and "
                          "DistilBERT encoders (model_type bert, roberta or distilbert)")
    for flag in ("is_decoder", "add_cross_attention"):
        if hf.get(flag):
            raise ConfigError(f"{path}: {flag} is set: sti runs encoders only")
    act = hf.get("activation" if model_type == "distilbert" else "hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"{path}: activation {act!r} is not supported (only 'gelu', the exact one): "
                          "sti refuses to run a model approximately")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"{path}: position_embedding_type {hf['position_embedding_type']!r} is not "
                          "supported (only 'absolute')")
    return model_type


def labels_of(hf: dict, path: Path) -> tuple[str, ...]:
    """Label names as the model has them (id2label, in id order)."""
    if hf.get("problem_type") in ("regression", "multi_label_classification"):
        raise ConfigError(f"{path}: problem_type {hf['problem_type']!r} is not supported: sti answers "
                          "one label per text (single_label_classification)")
    id2label = hf.get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            by_id = {int(k): v for k, v in id2label.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: id2label keys must be integers, got {sorted(id2label)[:5]}") from None
        if sorted(by_id) != list(range(len(id2label))):
            raise ConfigError(f"{path}: id2label must number the labels 0..{len(id2label) - 1}, got "
                              f"{sorted(id2label)[:10]}")
        labels = tuple(str(by_id[i]) for i in range(len(by_id)))
    else:
        n = hf.get("num_labels", 2)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"{path}: num_labels must be a positive integer, got {n!r}")
        labels = tuple(f"LABEL_{i}" for i in range(n))
    if len(labels) == 1:
        raise ConfigError(f"{path}: one output (a regression head) is not supported: sti answers one of "
                          "two or more labels")
    return labels


def config_of(hf: dict, family: str, path: Path, pooling: str, head_act: str, elastic: bool,
              labels: tuple[str, ...]) -> ModelConfig:
    keys = ({"hidden_size": "dim", "num_layers": "n_layers", "num_heads": "n_heads", "intermediate_size": "hidden_dim"}
            if family == "distilbert" else
            {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "intermediate_size": "intermediate_size"})
    try:
        shape = {ours: hf[theirs] for ours, theirs in keys.items()}
        shape["vocab_size"] = hf["vocab_size"]
    except KeyError as exc:
        raise ConfigError(f"{path}/config.json ({family}): missing field {exc}") from None
    if family == "roberta":
        pad = hf.get("pad_token_id", 1)
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ConfigError(f"{path}: pad_token_id must be a non-negative integer, got {pad!r}")
        offset = pad + 1  # RoBERTa numbers positions from padding_idx + 1
    else:
        offset = 0
    return ModelConfig(
        **shape, max_position=hf.get("max_position_embeddings", 512),
        # DistilBERT has no token types: a zero row (added by to_bert_names) is exact
        type_vocab_size=1 if family == "distilbert" else hf.get("type_vocab_size", 2),
        layer_norm_eps=1e-12 if family == "distilbert" else hf.get("layer_norm_eps", 1e-12),
        num_labels=len(labels), labels=labels, family=family, position_offset=offset,
        pooling=pooling, head_act=head_act, elastic=elastic)


# --- the head ------------------------------------------------------------------------------
def head_of(hf: dict, family: str, tensors: dict, path: Path) -> tuple[str, str, bool]:
    """(pooling, dense activation, elastic) of the checkpoint's head, from what it declares;
    refused when it declares nothing sti can run exactly, or lacks the tensors."""
    ours = hf.get("sti")
    archs = architectures(hf, path)
    if CLASSIFIER[family] in archs:
        # what transformers would compute wins: a model sti wrote, then saved again as a
        # sequence classifier, keeps the "sti" entry, but its pooler is now transformers'
        (pooling, head_act), elastic = CLASSIFIER_HEAD[family], False
        source = CLASSIFIER[family]
    elif isinstance(ours, dict):
        pooling, head_act, elastic = ours.get("pooling"), ours.get("head_act", "none"), ours.get("elastic", False)
        source = "config.json's sti entry"
    elif any(not a.endswith("Model") for a in archs):
        raise ConfigError(f"{path}: architecture {', '.join(archs)} is not a sequence classifier: sti runs "
                          f"{CLASSIFIER[family]} (one label per text) or a sentence-transformers model with "
                          "a classifier")
    elif (path / "modules.json").exists():
        pooling, head_act, elastic = sentence_transformers_pooling(path), "none", False
        source = "sentence-transformers' Pooling module"
    elif "classifier.weight" in tensors:
        raise ConfigError(
            f"{path}: the checkpoint has a classifier but config.json does not say how it pools (architectures "
            f"says {', '.join(archs) or 'nothing'}, no modules.json, no 'sti' entry). A model written by sti "
            "before store format 2 lacks the entry: retrain it with `sti finetune --force`")
    else:
        raise ConfigError(
            f"{path}: no classification head: architectures says {', '.join(archs) or 'nothing'} and there is no "
            f"modules.json saying how to pool. sti runs {CLASSIFIER[family]} checkpoints (or fine-tune this "
            "encoder with `sti finetune`)")
    if pooling not in ("mean", "cls") or head_act not in ("none", "tanh", "relu") or not isinstance(elastic, bool):
        raise ConfigError(f"{path}: {source} gives pooling {pooling!r}, head_act {head_act!r}, elastic {elastic!r}: "
                          "expected pooling mean or cls, head_act none, tanh or relu, elastic true or false")
    need = ["classifier.weight", "classifier.bias"] + (["pooler.dense.weight", "pooler.dense.bias"]
                                                       if head_act != "none" else [])
    missing = [n for n in need if n not in tensors]
    if missing:
        theirs = {v: k for k, v in HEAD_NAMES[family].items()}
        theirs = {k: f"bert.{v}" if v.startswith("pooler.") else v for k, v in theirs.items()}  # BERT's pooler
        names = ", ".join(repr(theirs.get(n, n)) for n in missing)
        if source.startswith("sentence-transformers"):
            raise ConfigError(f"{path}: a sentence-embedding model with no classifier ({names} missing): it "
                              "gives vectors, not labels; fine-tune it for a task first")
        raise ConfigError(f"{path}: {source} needs head tensors {names}, which the checkpoint lacks "
                          "(transformers would fill them with random numbers): the checkpoint is incomplete")
    return pooling, head_act, elastic


def sentence_transformers_pooling(path: Path) -> str:
    """'mean' or 'cls' from a sentence-transformers model's Pooling module; other pooling
    modes, and modules after pooling (Dense, Normalize), are refused."""
    modules = read_json(path / "modules.json", f"no modules.json in {path}")
    if not isinstance(modules, list):
        raise ConfigError(f"{path}/modules.json is not a list of modules")
    kinds = [str(m.get("type", "")) if isinstance(m, dict) else "" for m in modules]
    pools = [i for i, k in enumerate(kinds) if k.endswith("Pooling")]
    if len(pools) != 1:
        raise ConfigError(f"{path}/modules.json holds {len(pools)} Pooling modules, expected one")
    after = [k for k in kinds[pools[0] + 1:]]
    if after:
        raise ConfigError(f"{path}/modules.json: modules after pooling ({', '.join(after)}) are not supported")
    rel = str(modules[pools[0]].get("path", ""))
    cfg_file = (path / rel / "config.json").resolve()
    if path.resolve() not in cfg_file.parents:
        raise ConfigError(f"{path}/modules.json: the Pooling module's path {rel!r} leaves the model directory")
    cfg = read_json(cfg_file, f"{path}: the Pooling module has no {rel}/config.json")
    if not isinstance(cfg, dict):
        raise ConfigError(f"{cfg_file} is not a JSON object")
    modes = [k.removeprefix("pooling_mode_") for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
    if modes == ["mean_tokens"]:
        return "mean"
    if modes == ["cls_token"]:
        return "cls"
    raise ConfigError(f"{cfg_file}: pooling modes {modes or 'none'} are not supported (only mean_tokens or cls_token)")


# --- weights -------------------------------------------------------------------------------
def weight_files(path: Path) -> tuple[str, list[Path]]:
    """('safetensors' or 'bin', the files) of a model directory, preferring safetensors."""
    for fmt, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                               ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).exists():
            return fmt, [path / single]
        if (path / index).exists():
            return fmt, index_files(path, path / index)
    others = [p.name for p in sorted(path.iterdir())
              if p.suffix in (".h5", ".msgpack", ".onnx", ".pt", ".ckpt", ".gguf", ".bin", ".safetensors")]
    found = f" (found {', '.join(others)})" if others else ""
    raise ConfigError(f"no model.safetensors or pytorch_model.bin in {path}{found}: sti reads safetensors "
                      f"(single or sharded) and PyTorch .bin checkpoints; {CONVERT_HINT}")


def checkpoint_sha256(path: str | Path) -> str:
    """The sha256 of a model directory's weights: of its one weight file, or, for a sharded
    checkpoint, of the list of its files' names and sha256s."""
    _, files = weight_files(Path(path))
    if len(files) == 1:
        return sha256_file(files[0])
    listing = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def index_files(path: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{index} is not a valid index (a JSON object with a weight_map): {exc}") from None
    files = []
    for name in names:
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise ConfigError(f"{index}: weight file name {name!r} is not a plain file name")
        if not (path / name).exists():
            raise ConfigError(f"{index} names {name}, which is missing: the checkpoint is incomplete")
        files.append(path / name)
    return files


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    fmt, files = weight_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        part = _read_safetensors(f) if fmt == "safetensors" else _read_bin(f)
        tensors.update(part)
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def _read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(f))
    except Exception as exc:  # safetensors raises its own types for corrupt files
        raise ConfigError(f"{f} could not be read ({exc}); the file is corrupt or truncated") from None


def _read_bin(f: Path) -> dict[str, torch.Tensor]:
    # weights_only=True: the unpickler builds tensors and plain containers only, so a
    # checkpoint carrying code is refused here instead of running it
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "unsafe content"
        raise ConfigError(f"{f} holds pickled objects that are not plain tensors ({first}); refused without "
                          f"running them. Use a safetensors checkpoint from a source you trust") from None
    except Exception as exc:
        raise ConfigError(f"{f} could not be read ({str(exc)[:200]}); the file is corrupt or truncated") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ConfigError(f"{f} is not a state dict (a mapping of names to tensors)")
    return obj


def to_bert_names(family: str, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under BERT's names, without the model prefix."""
    prefix = f"{family}."
    out = {}
    for name, t in tensors.items():
        name = name.removeprefix(prefix)
        if name in HEAD_NAMES[family]:
            out[HEAD_NAMES[family][name]] = t
        elif family == "distilbert":
            out[_distilbert_name(name)] = t
        elif not (family == "roberta" and name.startswith(("classifier.", "pooler."))):
            out[name] = t  # RoBERTa's base pooler is unused by its classifier: left out above
    if family == "distilbert" and "embeddings.word_embeddings.weight" in out:
        h = out["embeddings.word_embeddings.weight"].shape[1]
        out["embeddings.token_type_embeddings.weight"] = torch.zeros(1, h)
    return out


def _distilbert_name(name: str) -> str:
    m = re.fullmatch(r"transformer\.layer\.(\d+)\.(.+)\.(weight|bias)", name)
    if m and m.group(2) in DISTILBERT_LAYER:
        return f"encoder.layer.{m.group(1)}.{DISTILBERT_LAYER[m.group(2)]}.{m.group(3)}"
    return name
