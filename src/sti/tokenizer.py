"""Tokenisation with the model's own `tokenizer.json` (Hugging Face `tokenizers`).

The shipped tokenizer pads every input to 128; we turn that off and pad per batch (to the
longest input, or to a fixed length when asked, as the paper's setting does). A text may
come with a second text (a sentence pair): the tokenizer's own post-processor joins them
(BERT: [CLS] a [SEP] b [SEP], token types 0 then 1; RoBERTa: <s> a </s></s> b </s>) and a
pair longer than max_length is cut longest-first, as transformers does.
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
    token_type_ids: torch.Tensor | None = None  # [B, S] int64, 1 for a pair's second text (None: all 0)

    @property
    def lengths(self) -> list[int]:
        return self.attention_mask.sum(1).tolist()

    def take(self, rows, width: int | None = None) -> "Batch":
        """The batch of some rows (a list of indices or a slice), cut to `width` columns."""
        cols = slice(None) if width is None else slice(0, width)
        picked = list(range(len(self.truncated)))[rows] if isinstance(rows, slice) else list(rows)

        def cut(t):
            return None if t is None else t[rows, cols].contiguous()
        return Batch(cut(self.input_ids), cut(self.attention_mask), [self.truncated[i] for i in picked],
                     cut(self.token_type_ids))


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

    def lengths(self, texts: list[str], pairs: list[str | None] | None = None) -> list[int]:
        """Token count of each text (with its pair, if any) after truncation (special tokens included)."""
        return [len(ids) for ids in self.ids(texts, pairs)]

    def ids(self, texts: list[str], pairs: list[str | None] | None = None) -> list[list[int]]:
        """Token ids of each text (with its pair, if any) after truncation."""
        return [list(e.ids) for e in self._tok.encode_batch(_inputs(texts, pairs))]

    def encode(self, texts: list[str], pad_to: int | None = None, pairs: list[str | None] | None = None) -> Batch:
        """Token ids, mask and token types for a batch; pads to the longest (or to `pad_to`).
        `pairs[i]`, when given and not None, is text i's second text."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise InputError("no texts to encode")
        if pairs is not None and len(pairs) != len(texts):
            raise InputError(f"{len(texts)} texts but {len(pairs)} pairs: give one second text (or None) per text")
        for i, t in enumerate(texts):
            _check_text(t, f"text {i}")
            if pairs is not None and pairs[i] is not None:
                _check_text(pairs[i], f"the pair of text {i}")
        encs = self._tok.encode_batch(_inputs(texts, pairs))
        width = max(len(e.ids) for e in encs)
        if pad_to is not None:
            if pad_to < width:
                raise InputError(f"pad_to={pad_to} is shorter than the longest input ({width} tokens)")
            width = pad_to
        if len(encs) == 1 and width == len(encs[0].ids):
            # one request, unpadded: the engine's every call, whose clock counts this (three
            # tensors made directly take a third of the time of filling padded ones)
            e = encs[0]
            return Batch(torch.tensor([e.ids]), torch.ones((1, width), dtype=torch.long),
                         [bool(e.overflowing)], torch.tensor([e.type_ids]))
        ids = torch.full((len(encs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), width), dtype=torch.long)
        types = torch.zeros((len(encs), width), dtype=torch.long)
        for row, e in enumerate(encs):
            ids[row, :len(e.ids)] = torch.tensor(e.ids)
            mask[row, :len(e.ids)] = 1
            types[row, :len(e.ids)] = torch.tensor(e.type_ids)
        return Batch(ids, mask, [bool(e.overflowing) for e in encs], types)


def _inputs(texts: list[str], pairs: list[str | None] | None) -> list:
    """What `tokenizers` encodes: a text, or a (text, pair) tuple."""
    if pairs is None:
        return list(texts)
    return [t if p is None else (t, p) for t, p in zip(texts, pairs)]


def _check_text(t, what: str) -> None:
    if not isinstance(t, str):
        raise InputError(f"{what} is {type(t).__name__}, not a string")
    try:
        t.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} is not valid UTF-8 text (it holds undecodable bytes): "
                         "pass UTF-8 encoded text") from None
    if not t.strip():
        raise InputError(f"{what} is empty or whitespace only: give some words to classify")
