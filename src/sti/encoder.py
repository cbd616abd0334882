"""Our plain-PyTorch BERT encoder, able to run any submodel.

A submodel is a choice of layers and, per chosen layer, of shards (head j + FFN slice j).
Dropping a shard removes exactly that head and those FFN neurons: the attention output
and the FFN output are sums over heads / neurons, so a subset is a partial sum. The
attention scale stays 1/sqrt(head_dim) whatever the number of heads.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import ConfigError
from .weights import Embeddings, Head, LayerWeights, ModelWeights


@dataclass(frozen=True)
class Submodel:
    """Which layers run, and which shards of each (`shards[k]` belongs to `layers[k]`)."""
    layers: tuple[int, ...]
    shards: tuple[tuple[int, ...], ...]

    @staticmethod
    def full(config: ModelConfig) -> "Submodel":
        return Submodel.of(config, config.num_layers, config.num_shards)

    @staticmethod
    def of(config: ModelConfig, n: int, m: int) -> "Submodel":
        """n layers (see `depth_layers`) with their first m shards: the elastic model
        is rewired so that the first m shards of a layer are its most important."""
        if not 1 <= m <= config.num_shards:
            raise ConfigError(f"m={m} shards per layer is outside 1..{config.num_shards}")
        layers = depth_layers(config.num_layers, n)
        return Submodel(layers=layers, shards=tuple(tuple(range(m)) for _ in layers))

    def validate(self, config: ModelConfig) -> None:
        if not self.layers:
            raise ConfigError("a submodel needs at least one layer")
        if len(self.layers) != len(self.shards):
            raise ConfigError(f"{len(self.layers)} layers but {len(self.shards)} shard lists")
        if list(self.layers) != sorted(set(self.layers)):
            raise ConfigError(f"submodel layers {self.layers} must be increasing and distinct")
        if self.layers[0] < 0 or self.layers[-1] >= config.num_layers:
            raise ConfigError(f"submodel layers {self.layers} outside 0..{config.num_layers - 1}")
        for layer, ids in zip(self.layers, self.shards):
            if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= config.num_shards:
                raise ConfigError(
                    f"layer {layer}: shards {ids} must be distinct, non-empty, within 0..{config.num_shards - 1}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)



def grid_key(n: int, m: int) -> str:
    """The key of submodel (n layers, m shards) in profiles and metrics: "n,m"."""
    return f"{n},{m}"


def parse_grid_key(key) -> tuple[int, int]:
    """(n, m) of a grid key; ValueError if it is not "n,m"."""
    n, m = (int(x) for x in str(key).split(","))
    return n, m


@functools.lru_cache(maxsize=4096)
def depth_layers(num_layers: int, n: int) -> tuple[int, ...]:
    """The n layers kept out of num_layers, dropping evenly spaced ones as DynaBERT does
    (for n = N/2 it keeps layers 0, 2, 4, ...): drop floor((k+1)*N/(N-n)) - 1, k < N-n."""
    if not 1 <= n <= num_layers:
        raise ConfigError(f"n={n} layers is outside 1..{num_layers}")
    drop = {(k + 1) * num_layers // (num_layers - n) - 1 for k in range(num_layers - n)}
    return tuple(i for i in range(num_layers) if i not in drop)


def embed(emb: Embeddings, input_ids: torch.Tensor, config: ModelConfig,
          word_rows: torch.Tensor | None = None, position_rows: torch.Tensor | None = None,
          token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Token + position + token-type embeddings, then LayerNorm. Positions start at
    `config.position_offset` (RoBERTa's after its padding index; padding comes after the
    real tokens, so their positions are the same as in a batch of one). Token types (a
    pair's second text is type 1) count only in a model with more than one type: RoBERTa
    has one and DistilBERT none, and both ignore them, as transformers does. `word_rows`
    and `position_rows`, when given, are the rows already looked up (the runtime reads only
    those rows from the store)."""
    seq = input_ids.shape[1]
    words = word_rows if word_rows is not None else F.embedding(input_ids, emb.word)
    if position_rows is None:
        position_rows = emb.position[config.position_offset:config.position_offset + seq]
    if token_type_ids is None or emb.token_type.shape[0] == 1:
        types = emb.token_type[0]
    else:
        types = F.embedding(token_type_ids, emb.token_type)
    x = words + position_rows + types
    return F.layer_norm(x, (x.shape[-1],), emb.ln_w, emb.ln_b, config.layer_norm_eps)


def attention_context(x: torch.Tensor, keep: torch.Tensor, layer: LayerWeights, head_dim: int,
                      dropout: float = 0.0) -> torch.Tensor:
    """Multi-head self-attention over the layer's heads: their outputs side by side [B, S,
    heads * head_dim], the input of the output projection. `keep` is [B, 1, 1, S] bool."""
    b, s, _ = x.shape
    heads = layer.num_shards

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, s, heads, head_dim).transpose(1, 2)

    q = split(F.linear(x, layer.q_w, layer.q_b))
    k = split(F.linear(x, layer.k_w, layer.k_b))
    v = split(F.linear(x, layer.v_w, layer.v_b))
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout,
                                         scale=1.0 / math.sqrt(head_dim))
    return ctx.transpose(1, 2).reshape(b, s, heads * head_dim)


def ffn_hidden(x: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
    """The FFN neurons' activations: the input of the FFN-out projection."""
    return F.gelu(F.linear(x, layer.i_w, layer.i_b))


def layer_forward(x: torch.Tensor, keep: torch.Tensor, layer: LayerWeights, config: ModelConfig,
                  dropout: float = 0.0, observe=None) -> torch.Tensor:
    """One layer. Output biases are per layer; the projections are sums over the shards
    present. `observe`, if given, is called with the input of each of the layer's
    projections (`x`: q, k, v; `ctx`: the output projection; `mid`: FFN-in; `act`: FFN-out),
    as the store's GPTQ rounding measures them (gptq.py)."""
    sh, h, eps = layer.shared, config.hidden_size, config.layer_norm_eps
    ctx = attention_context(x, keep, layer, config.head_dim, dropout)
    mid = F.layer_norm(x + _drop(F.linear(ctx, layer.o_w) + sh.o_b, dropout), (h,), sh.ln1_w, sh.ln1_b, eps)
    act = ffn_hidden(mid, layer)
    if observe is not None:
        observe(x=x, ctx=ctx, mid=mid, act=act)
    return F.layer_norm(mid + _drop(F.linear(act, layer.f_w) + sh.f_b, dropout), (h,), sh.ln2_w, sh.ln2_b, eps)


def _drop(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p) if p > 0 else x


def attention_keep(attention_mask: torch.Tensor) -> torch.Tensor:
    return attention_mask.bool()[:, None, None, :]


def encode(weights: ModelWeights, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           submodel: Submodel | None = None, dropout: float = 0.0,
           all_hidden: bool = False, token_type_ids: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
    """Last hidden states [B, S, H] of the submodel (default: the full model); with
    `all_hidden`, the list [embeddings, after each layer]."""
    config = weights.config
    submodel = submodel or Submodel.full(config)
    submodel.validate(config)
    keep = attention_keep(attention_mask)
    x = _drop(embed(weights.embeddings, input_ids, config, token_type_ids=token_type_ids), dropout)
    states = [x]
    for i, ids in zip(submodel.layers, submodel.shards):
        x = layer_forward(x, keep, weights.submodel_layer(i, ids), config, dropout)
        states.append(x)
    return states if all_hidden else x


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu}


def head_logits(head: Head, hidden: torch.Tensor, attention_mask: torch.Tensor,
                dropout: float = 0.0) -> torch.Tensor:
    """Logits from the last hidden states: pool, the optional dense layer, the classifier."""
    pooled = mean_pool(hidden, attention_mask) if head.pooling == "mean" else hidden[:, 0]
    if head.act != "none":
        pooled = ACTIVATIONS[head.act](F.linear(pooled, head.dense_w, head.dense_b))
    return F.linear(_drop(pooled, dropout), head.w, head.b)


def classify(weights: ModelWeights, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             submodel: Submodel | None = None, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, num_labels] of the submodel (inference: no dropout, no grad)."""
    with torch.no_grad():
        hidden = encode(weights, input_ids, attention_mask, submodel, token_type_ids=token_type_ids)
        return head_logits(weights.head, hidden, attention_mask)
