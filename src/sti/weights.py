"""Model weights as plain tensors, and their Hugging Face-style directory on disk.

The encoder (encoder.py) is a set of functions over these dataclasses, not an nn.Module,
so that later stages can hand it weights from anywhere: the original checkpoint, decoded
shards from the store, or a subset of shards.

A layer's weights are split by shard (STI.md, key idea 1). Shard j of a layer holds
  - head j: rows [j*d, (j+1)*d) of the Q, K, V projections and their biases, and the same
    columns of the attention-output projection (d = head_dim);
  - FFN slice j: rows [j*f, (j+1)*f) of the FFN-in projection and bias, and the same
    columns of the FFN-out projection (f = intermediate_size / num_heads).
The attention-output bias, the FFN-out bias and both LayerNorms belong to the layer.
`LayerWeights` holds the shard-split tensors of some shards stacked in `shard_ids` order,
so the full layer is the special case shard_ids = (0, ..., M-1).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import ConfigError

# Shard-split parts: split along dim 0 (rows) or dim 1 (columns).
ROW_PARTS = ("q_w", "q_b", "k_w", "k_b", "v_w", "v_b", "i_w", "i_b")
COL_PARTS = ("o_w", "f_w")
SHARD_PARTS = ROW_PARTS + COL_PARTS
LAYER_PARTS = ("o_b", "ln1_w", "ln1_b", "f_b", "ln2_w", "ln2_b")
# Which parts are attention (per head) and which are FFN (per neuron slice).
ATTN_PARTS = ("q_w", "q_b", "k_w", "k_b", "v_w", "v_b", "o_w")
FFN_PARTS = ("i_w", "i_b", "f_w")

# Our part names -> Hugging Face BertModel names (below "encoder.layer.{i}.").
HF_LAYER_NAMES = {
    "q_w": "attention.self.query.weight", "q_b": "attention.self.query.bias",
    "k_w": "attention.self.key.weight", "k_b": "attention.self.key.bias",
    "v_w": "attention.self.value.weight", "v_b": "attention.self.value.bias",
    "o_w": "attention.output.dense.weight", "o_b": "attention.output.dense.bias",
    "ln1_w": "attention.output.LayerNorm.weight", "ln1_b": "attention.output.LayerNorm.bias",
    "i_w": "intermediate.dense.weight", "i_b": "intermediate.dense.bias",
    "f_w": "output.dense.weight", "f_b": "output.dense.bias",
    "ln2_w": "output.LayerNorm.weight", "ln2_b": "output.LayerNorm.bias",
}
HF_EMBED_NAMES = {
    "word": "embeddings.word_embeddings.weight",
    "position": "embeddings.position_embeddings.weight",
    "token_type": "embeddings.token_type_embeddings.weight",
    "ln_w": "embeddings.LayerNorm.weight", "ln_b": "embeddings.LayerNorm.bias",
}
# The head under BERT's names: BertForSequenceClassification's pooler and classifier (hf.py
# maps RoBERTa's classifier.dense / out_proj and DistilBERT's pre_classifier onto these).
HF_HEAD_NAMES = {"w": "classifier.weight", "b": "classifier.bias"}
HF_DENSE_NAMES = {"dense_w": "pooler.dense.weight", "dense_b": "pooler.dense.bias"}


def shard_slice(part: str, j: int, config: ModelConfig) -> slice:
    """The slice of a full-layer tensor (along its split dim) that belongs to shard j."""
    width = config.head_dim if part in ATTN_PARTS else config.ffn_slice
    return slice(j * width, (j + 1) * width)


def split_dim(part: str) -> int:
    return 1 if part in COL_PARTS else 0


@dataclass
class Embeddings:
    word: torch.Tensor        # [vocab, H]
    position: torch.Tensor    # [max_position, H]
    token_type: torch.Tensor  # [type_vocab, H]
    ln_w: torch.Tensor
    ln_b: torch.Tensor


@dataclass
class Head:
    """How the last token states become logits: pool (the mean of the real tokens' states,
    or the first token's), optionally a dense layer with an activation (BERT's pooler and
    RoBERTa's head: tanh; DistilBERT's pre-classifier: ReLU), then a linear classifier.
    Our elastic model pools by the mean with no dense layer, as the MiniLM sentence model
    was trained to."""
    w: torch.Tensor  # [num_labels, H]
    b: torch.Tensor  # [num_labels]
    dense_w: torch.Tensor | None = None  # [H, H], present iff act != "none"
    dense_b: torch.Tensor | None = None  # [H]
    pooling: str = "mean"
    act: str = "none"

    def tensors(self) -> dict[str, torch.Tensor]:
        """The head's tensors by field name (w, b and, with a dense layer, dense_w, dense_b)."""
        out = {"w": self.w, "b": self.b}
        if self.act != "none":
            out.update(dense_w=self.dense_w, dense_b=self.dense_b)
        return out


@dataclass
class ShardWeights:
    """The tensors of one shard of one layer (see module docstring)."""
    q_w: torch.Tensor
    q_b: torch.Tensor
    k_w: torch.Tensor
    k_b: torch.Tensor
    v_w: torch.Tensor
    v_b: torch.Tensor
    o_w: torch.Tensor
    i_w: torch.Tensor
    i_b: torch.Tensor
    f_w: torch.Tensor


@dataclass
class LayerShared:
    """The tensors of a layer that are not split by shard."""
    o_b: torch.Tensor
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    f_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor


@dataclass
class LayerWeights:
    """One layer restricted to `shard_ids`: shard-split tensors stacked in that order."""
    shared: LayerShared
    q_w: torch.Tensor
    q_b: torch.Tensor
    k_w: torch.Tensor
    k_b: torch.Tensor
    v_w: torch.Tensor
    v_b: torch.Tensor
    o_w: torch.Tensor
    i_w: torch.Tensor
    i_b: torch.Tensor
    f_w: torch.Tensor
    shard_ids: tuple[int, ...]

    @property
    def num_shards(self) -> int:
        return len(self.shard_ids)

    def shard(self, j: int, config: ModelConfig) -> ShardWeights:
        """Shard j (a shard id, not a position) as views into this layer's tensors."""
        pos = self.shard_ids.index(j)
        parts = {}
        for part in SHARD_PARTS:
            t = getattr(self, part)
            idx = shard_slice(part, pos, config)
            parts[part] = t[:, idx] if split_dim(part) else t[idx]
        return ShardWeights(**parts)

    def select(self, shard_ids, config: ModelConfig) -> "LayerWeights":
        """The same layer restricted to `shard_ids` (a new, contiguous copy)."""
        return LayerWeights.from_shards(self.shared, {j: self.shard(j, config) for j in shard_ids})

    @staticmethod
    def from_shards(shared: LayerShared, shards: dict[int, ShardWeights]) -> "LayerWeights":
        """Stack shards (in the dict's order) into one layer."""
        if not shards:
            raise ConfigError("a layer needs at least one shard")
        stacked = {
            part: torch.cat([getattr(s, part) for s in shards.values()], dim=split_dim(part))
            for part in SHARD_PARTS
        }
        return LayerWeights(shared=shared, shard_ids=tuple(shards), **stacked)


@dataclass
class ModelWeights:
    config: ModelConfig
    embeddings: Embeddings
    layers: list[LayerWeights]
    head: Head

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor under its Hugging Face name (the full model only)."""
        out = {HF_EMBED_NAMES[f.name]: getattr(self.embeddings, f.name) for f in fields(Embeddings)}
        for i, layer in enumerate(self.layers):
            if layer.shard_ids != tuple(range(self.config.num_shards)):
                raise ConfigError(f"layer {i} holds shards {layer.shard_ids}, not the full layer")
            for part in SHARD_PARTS:
                out[f"encoder.layer.{i}.{HF_LAYER_NAMES[part]}"] = getattr(layer, part)
            for part in LAYER_PARTS:
                out[f"encoder.layer.{i}.{HF_LAYER_NAMES[part]}"] = getattr(layer.shared, part)
        names = HF_HEAD_NAMES | HF_DENSE_NAMES
        out.update({names[k]: t for k, t in self.head.tensors().items()})
        return out

    def parameters(self) -> list[torch.Tensor]:
        return list(self.tensors().values())

    def clone(self) -> "ModelWeights":
        return ModelWeights.from_tensors(self.config, {k: v.detach().clone() for k, v in self.tensors().items()})

    @staticmethod
    def from_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor],
                     head_seed: int | None = None) -> "ModelWeights":
        """Build from BERT's tensor names (a "bert." prefix is accepted; hf.py maps the other
        families onto them). With `head_seed`, any head in `tensors` is ignored and a fresh
        mean-pooling classifier is made (for fine-tuning); without it the head must be there."""
        t = {k.removeprefix("bert."): v for k, v in tensors.items()}

        def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            if name not in t:
                raise ConfigError(f"checkpoint is missing tensor {name!r}")
            if tuple(t[name].shape) != shape:
                raise ConfigError(f"tensor {name!r} has shape {tuple(t[name].shape)}, config says {shape}")
            return t[name].float()

        c, h = config, config.hidden_size
        emb_shapes = {"word": (c.vocab_size, h), "position": (c.max_position, h),
                      "token_type": (c.type_vocab_size, h), "ln_w": (h,), "ln_b": (h,)}
        embeddings = Embeddings(**{k: take(HF_EMBED_NAMES[k], s) for k, s in emb_shapes.items()})
        layers = []
        for i in range(c.num_layers):
            shapes = layer_shapes(c)
            get = lambda part: take(f"encoder.layer.{i}.{HF_LAYER_NAMES[part]}", shapes[part])  # noqa: E731
            shared = LayerShared(**{p: get(p) for p in LAYER_PARTS})
            layers.append(LayerWeights(shared=shared, shard_ids=tuple(range(c.num_shards)),
                                       **{p: get(p) for p in SHARD_PARTS}))
        if head_seed is not None:
            if c.pooling != "mean" or c.head_act != "none":
                raise ConfigError("a fresh head pools by the mean with no dense layer: the config says "
                                  f"pooling {c.pooling!r}, head_act {c.head_act!r}")
            return ModelWeights(config=c, embeddings=embeddings, layers=layers, head=random_head(c, head_seed))
        parts = {"w": take(HF_HEAD_NAMES["w"], (c.num_labels, h)), "b": take(HF_HEAD_NAMES["b"], (c.num_labels,))}
        if c.head_act != "none":
            parts.update(dense_w=take(HF_DENSE_NAMES["dense_w"], (h, h)), dense_b=take(HF_DENSE_NAMES["dense_b"], (h,)))
        head = Head(**parts, pooling=c.pooling, act=c.head_act)
        return ModelWeights(config=c, embeddings=embeddings, layers=layers, head=head)

    @staticmethod
    def random(config: ModelConfig, seed: int = 0) -> "ModelWeights":
        """Random weights (BERT's init: N(0, 0.02), LayerNorm 1/0) for tests and scale runs."""
        gen = torch.Generator().manual_seed(seed)
        tensors = {}
        for name, shape in hf_shapes(config).items():
            if "LayerNorm.weight" in name:
                tensors[name] = torch.ones(shape)
            elif "LayerNorm.bias" in name:
                tensors[name] = torch.zeros(shape)
            else:
                tensors[name] = torch.randn(shape, generator=gen) * 0.02
        return ModelWeights.from_tensors(config, tensors)

    def submodel_layer(self, i: int, shard_ids) -> LayerWeights:
        layer = self.layers[i]
        if tuple(shard_ids) == layer.shard_ids:
            return layer
        return layer.select(shard_ids, self.config)


def random_head(config: ModelConfig, seed: int) -> Head:
    gen = torch.Generator().manual_seed(seed)
    return Head(w=torch.randn(config.num_labels, config.hidden_size, generator=gen) * 0.02,
                b=torch.zeros(config.num_labels))


def layer_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, f = c.hidden_size, c.intermediate_size
    return {"q_w": (h, h), "q_b": (h,), "k_w": (h, h), "k_b": (h,), "v_w": (h, h), "v_b": (h,),
            "o_w": (h, h), "o_b": (h,), "ln1_w": (h,), "ln1_b": (h,), "i_w": (f, h), "i_b": (f,),
            "f_w": (h, f), "f_b": (h,), "ln2_w": (h,), "ln2_b": (h,)}


def hf_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    h = c.hidden_size
    shapes = {HF_EMBED_NAMES["word"]: (c.vocab_size, h), HF_EMBED_NAMES["position"]: (c.max_position, h),
              HF_EMBED_NAMES["token_type"]: (c.type_vocab_size, h),
              HF_EMBED_NAMES["ln_w"]: (h,), HF_EMBED_NAMES["ln_b"]: (h,)}
    for i in range(c.num_layers):
        for part, shape in layer_shapes(c).items():
            shapes[f"encoder.layer.{i}.{HF_LAYER_NAMES[part]}"] = shape
    shapes[HF_HEAD_NAMES["w"]] = (c.num_labels, h)
    shapes[HF_HEAD_NAMES["b"]] = (c.num_labels,)
    if c.head_act != "none":
        shapes[HF_DENSE_NAMES["dense_w"]] = (h, h)
        shapes[HF_DENSE_NAMES["dense_b"]] = (h,)
    return shapes


# --- model directories -------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def load_model_dir(path: str | Path, fresh_head: bool = False,
                   labels: tuple[str, ...] = ("negative", "positive")) -> ModelWeights:
    """Load a Hugging Face model directory (BERT, RoBERTa or DistilBERT; see hf.py). Its
    head must be one sti runs exactly; with `fresh_head` the head is ignored and a new
    mean-pooling classifier into `labels` (default: the built-in task's) is made (the start
    of fine-tuning)."""
    from .hf import read_checkpoint
    config, tensors = read_checkpoint(path, fresh_head=fresh_head, labels=labels)
    return ModelWeights.from_tensors(config, tensors, head_seed=0 if fresh_head else None)


def save_model_dir(weights: ModelWeights, path: str | Path, tokenizer_from: str | Path | None = None,
                   extra_files: dict[str, str] | None = None) -> Path:
    """Write a model directory atomically: everything goes to a temporary sibling
    directory that is renamed into place only when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(weights.config.to_hf(), indent=2))
        tensors = {k: v.detach().contiguous().float() for k, v in weights.tensors().items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_from) / name
                if src.exists():
                    shutil.copyfile(src, tmp / name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary directory to `final`, replacing an older one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:  # interrupted between the renames: put the old one back
            os.rename(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def with_head(weights: ModelWeights, head: Head) -> ModelWeights:
    return replace(weights, head=head)
