"""Model configuration: the shape of a BERT-family encoder, and how it answers.

Only the fields that change the computation are kept: the shape, where position ids start
(RoBERTa's begin after its padding index), how token states become a sentence vector
(`pooling`, `head_act`: see `Head` in weights.py) and whether the model was trained to run
as a submodel (`elastic`). hf.py reads these from a Hugging Face checkpoint; `PRESETS`
gives the MiniLM-L6 shape of the real model and the BERT-base and BERT-large shapes used
(with random weights) for scale tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import ConfigError


# Upper bounds on a config (a store manifest is untrusted): far above any BERT-family model.
MAX_SIZE = {"hidden_size": 1 << 16, "num_layers": 1024, "num_heads": 1024, "intermediate_size": 1 << 18,
            "vocab_size": 1 << 22, "max_position": 1 << 16, "type_vocab_size": 1024, "num_labels": 1 << 16}
FAMILIES = ("bert", "roberta", "distilbert")
POOLINGS = ("mean", "cls")        # mean of the real tokens' states, or the first token's
HEAD_ACTS = ("none", "tanh", "relu")  # a dense layer + this activation before the classifier


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    vocab_size: int = 30522
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    num_labels: int = 2
    labels: tuple[str, ...] = field(default=("negative", "positive"))
    family: str = "bert"
    position_offset: int = 0      # position id of the first token (RoBERTa: padding_idx + 1)
    pooling: str = "mean"
    head_act: str = "none"
    # trained to run any (n layers, m shards) submodel (sti finetune); a plain model is only
    # ever run whole: the planner then chooses bitwidths and the preload buffer, nothing else
    elastic: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "vocab_size", "max_position", "type_vocab_size", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_SIZE[name]:
                raise ConfigError(f"model config: {name} must be an integer in 1..{MAX_SIZE[name]}, got {value!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < 1):
            raise ConfigError(f"model config: layer_norm_eps must be a number in (0, 1), got {eps!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model config: hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}")
        if self.intermediate_size % self.num_heads:
            raise ConfigError(
                f"model config: intermediate_size {self.intermediate_size} is not divisible by "
                f"num_heads {self.num_heads}, so the FFN cannot be cut into one slice per head")
        if len(self.labels) != self.num_labels:
            raise ConfigError(
                f"model config: {self.num_labels} labels but {len(self.labels)} label names")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"model config: label names must differ, got {list(self.labels)}")
        for name, allowed in (("family", FAMILIES), ("pooling", POOLINGS), ("head_act", HEAD_ACTS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model config: {name} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        off = self.position_offset
        if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off < self.max_position:
            raise ConfigError(f"model config: position_offset must be an integer in 0..{self.max_position - 1}, "
                              f"got {off!r}")
        if not isinstance(self.elastic, bool):
            raise ConfigError(f"model config: elastic must be true or false, got {self.elastic!r}")

    @property
    def max_tokens(self) -> int:
        """The longest input the position embeddings cover (special tokens included)."""
        return self.max_position - self.position_offset
    # Shard geometry (STI.md, key idea 1): shard j = head j + FFN slice j.
    @property
    def num_shards(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_slice(self) -> int:
        """FFN neurons per shard."""
        return self.intermediate_size // self.num_heads

    @property
    def layer_params(self) -> int:
        h, f = self.hidden_size, self.intermediate_size
        return 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h

    @property
    def embedding_params(self) -> int:
        h = self.hidden_size
        return (self.vocab_size + self.max_position + self.type_vocab_size) * h + 2 * h

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"model config must be a JSON object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"model config: unknown fields {sorted(unknown)}")
        missing = known - set(d)
        if missing:  # nothing is filled in by default: a missing pooling must not become "mean"
            raise ConfigError(f"model config: missing fields {sorted(missing)}")
        d = dict(d)
        if "labels" in d:
            if not isinstance(d["labels"], (list, tuple)) or not all(isinstance(x, str) for x in d["labels"]):
                raise ConfigError("model config: labels must be a list of strings")
            d["labels"] = tuple(d["labels"])
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"model config: {exc}") from None

    def to_hf(self) -> dict:
        """The Hugging Face `config.json` of a BERT model with this shape, with an "sti" entry
        saying how it pools and whether it is elastic (hf.py reads it back: never guessed)."""
        if self.family != "bert":
            raise ConfigError(f"only BERT-family models are written by sti, not {self.family}")
        return {
            "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size, "max_position_embeddings": self.max_position,
            "type_vocab_size": self.type_vocab_size, "layer_norm_eps": self.layer_norm_eps,
            "position_embedding_type": "absolute", "pad_token_id": 0,
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "id2label": {str(i): n for i, n in enumerate(self.labels)},
            "label2id": {n: i for i, n in enumerate(self.labels)},
            "sti": {"pooling": self.pooling, "head_act": self.head_act, "elastic": self.elastic},
        }


PRESETS: dict[str, ModelConfig] = {
    "minilm-l6": ModelConfig(),
    "bert-base": ModelConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "bert-large": ModelConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
    # Tiny shape for fast tests.
    "tiny": ModelConfig(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
                        vocab_size=120, max_position=64),
}
