"""Tokenisation with the model's own `tokenizer.json` (Hugging Face `tokenizers`).

The shipped tokenizer pads every input to 128; we turn that off and pad per batch (to the
longest input, or to a fixed length when asked, as the paper's setting does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer

from .errors import ConfigError, InputError


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, S] int64
    attention_mask: torch.Tensor  # [B, S] int64, 1 for real tokens
    truncated: list[bool]         # per text: was it cut to max_length?

    @property
    def lengths(self) -> list[int]:
        return self.attention_mask.sum(1).tolist()


class Tokenizer:
    def __init__(self, model_dir: str | Path, max_length: int = 128):
        path = Path(model_dir) / "tokenizer.json"
        if not path.exists():
            raise ConfigError(f"no tokenizer.json in {model_dir}")
        if not isinstance(max_length, int) or max_length < 2:
            raise InputError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.max_length = max_length
        self._tok = HFTokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length)
        # BERT's and DistilBERT's pad token, then RoBERTa's (padding is masked out either way)
        self.pad_id = next((i for i in map(self._tok.token_to_id, ("[PAD]", "<pad>")) if i is not None), 0)

    def lengths(self, texts: list[str]) -> list[int]:
        """Token count of each text after truncation (special tokens included)."""
        return [len(e.ids) for e in self._tok.encode_batch(texts)]

    def encode(self, texts: list[str], pad_to: int | None = None) -> Batch:
        """Token ids and mask for a batch; pads to the longest (or to `pad_to`)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise InputError("no texts to encode")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"text {i} is {type(t).__name__}, not a string")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"text {i} is not valid UTF-8 text (it holds undecodable bytes): "
                                 "pass UTF-8 encoded text") from None
            if not t.strip():
                raise InputError(f"text {i} is empty or whitespace only: give some words to classify")
        encs = self._tok.encode_batch(texts)
        width = max(len(e.ids) for e in encs)
        if pad_to is not None:
            if pad_to < width:
                raise InputError(f"pad_to={pad_to} is shorter than the longest input ({width} tokens)")
            width = pad_to
        ids = torch.full((len(encs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), width), dtype=torch.long)
        for row, e in enumerate(encs):
            ids[row, :len(e.ids)] = torch.tensor(e.ids)
            mask[row, :len(e.ids)] = 1
        return Batch(ids, mask, [bool(e.overflowing) for e in encs])
