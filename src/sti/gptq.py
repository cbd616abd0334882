"""Rounding that minds the layer's output: GPTQ codes for the linear codec, kept per shard.

Rounding each weight to its nearest code minimises each weight's own error, but what a
request sees is the error of a projection's output, (W - Q) X over the inputs X it meets.
GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", 2022) rounds a matrix one input column at a time and spreads each column's
rounding error over the columns not yet rounded, weighted by the inverse of H = X^T X, the
Gram matrix of the inputs measured on calibration texts. At 2-3 bits this roughly halves
the model's error (docs/CODECS.md has the measurement).

Two choices make it fit sti's shards:
  - **Error stays inside a shard.** The output-projection and FFN-out parts of a shard are
    the columns of its own head and neurons, and when the shard is used its neighbours may
    be absent or at another bitwidth; so their error is spread only over the shard's own
    columns (H restricted to them: a block-diagonal H). The rows of q, k, v and FFN-in are
    independent of one another, so those parts use the whole input Gram matrix.
  - **The grid is the nearest-rounding one.** Each group's scale and zero are chosen from
    the original weights exactly as `codec.linear_grid` chooses them; only the codes differ.
    The blob format and the decoders are unchanged (a store records which rounding it used).

Written here rather than taken from a library: the GPTQ packages target LLM layers on GPUs
with their own packed formats; what sti needs is a few dozen lines over its own codec.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numba
import numpy as np
import torch

from . import codec as codecs
from .config import ModelConfig
from .encoder import attention_keep, embed, layer_forward
from .errors import Cancelled, ConfigError
from .weights import LayerWeights, ModelWeights, shard_slice, split_dim

INPUTS = {"q_w": "x", "k_w": "x", "v_w": "x", "o_w": "ctx", "i_w": "mid", "f_w": "act"}
DAMP = 0.01             # added to H's diagonal, as a share of its mean: keeps H invertible
CALIBRATION_TEXTS = 512  # texts measured by default (about 13k tokens of the built-in data)


@dataclass(frozen=True)
class Calibration:
    """Per layer, the Gram matrix X^T X of the input of each projection kind (`x`, `ctx`,
    `mid`, `act`: see `encoder.layer_forward`) over the calibration tokens (each batch's
    product in float32, summed in float64). Held for every layer at once: 135 MB for
    MiniLM, about 1 GB for BERT-base."""
    grams: tuple[dict[str, torch.Tensor], ...]
    texts: int
    tokens: int
    sha256: str         # of the texts, to say in the manifest what the store was calibrated on

    def manifest(self) -> dict:
        return {"method": "gptq", "damp": DAMP, "texts": self.texts, "tokens": self.tokens,
                "texts_sha256": self.sha256}


def measure(weights: ModelWeights, tokenizer, texts: list[tuple[str, str | None]], batch_size: int = 64,
            progress=None) -> Calibration:
    """Run the fp32 model over `texts` ((text, second text or None) pairs, each at its own
    length) and sum each projection's input Gram matrix, padding excluded.
    `progress(done, total)` may return False to cancel."""
    if not texts:
        raise ConfigError("GPTQ rounding needs calibration texts, and none were given")
    c = weights.config
    grams = tuple({} for _ in weights.layers)
    tokens, total = 0, -(-len(texts) // batch_size)
    with torch.no_grad():
        for done, batch in enumerate(batches(tokenizer, texts, batch_size), 1):
            real = batch.attention_mask.bool()
            tokens += int(real.sum())
            keep = attention_keep(batch.attention_mask)
            x = embed(weights.embeddings, batch.input_ids, c, token_type_ids=batch.token_type_ids)
            for layer, gram in zip(weights.layers, grams):
                x = layer_forward(x, keep, layer, c, observe=lambda **ins: _add(gram, ins, real))
            if progress is not None and progress(done, total) is False:
                raise Cancelled("calibration cancelled")
    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    return Calibration(grams, len(texts), tokens, digest)


def batches(tokenizer, texts: list[tuple[str, str | None]], batch_size: int = 64):
    """The calibration texts tokenized in batches of `batch_size`, similar lengths together
    (little padding), one batch at a time."""
    order = sorted(texts, key=lambda t: len(t[0]) + len(t[1] or ""))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        pairs = [p for _, p in chunk]
        yield tokenizer.encode([t for t, _ in chunk], pairs=pairs if any(p is not None for p in pairs) else None)


def _add(gram: dict, inputs: dict, real: torch.Tensor) -> None:
    for name, t in inputs.items():
        rows = t[real]                                   # [tokens, width], padding left out
        g = (rows.T @ rows).double()
        gram[name] = gram[name] + g if name in gram else g


def layer_choices(layer: LayerWeights, config: ModelConfig, bits: int, grams: dict,
                  factors: dict | None = None, grid=None) -> dict[tuple[str, int], tuple]:
    """Every matrix part of every shard of `layer` at `bits`: (name, shard id) -> (codes,
    scale, zero) for `codec.encode`'s `choice`. `factors` caches the inverse-Hessian factors
    across bitwidths (they do not depend on b). `grid(name, position, part, bits)` -> (codes,
    scale, zero) picks a part's grid; only its scale and zero are kept, GPTQ chooses the
    codes on them (default: the codec's, `codec.linear_choice`; another is for comparing
    choices, benchmarks/bench_rounding.py: a store's decoder reads any grid)."""
    factors = {} if factors is None else factors
    grid = grid or (lambda name, pos, part, b: codecs.linear_choice(part.contiguous().numpy().ravel(), b))
    out = {}
    parts = [layer.shard(j, config) for j in layer.shard_ids]
    for name, kind in INPUTS.items():
        grids = [grid(name, pos, getattr(p, name), bits) for pos, p in enumerate(parts)]
        dim = split_dim(name)  # 0: the shards' rows are stacked; 1: their columns are
        scale = torch.cat([_spread(g[1], getattr(p, name).shape) for g, p in zip(grids, parts)], dim)
        zero = torch.cat([_spread(g[2], getattr(p, name).shape) for g, p in zip(grids, parts)], dim)
        if (kind, dim) not in factors:  # q, k and v share theirs
            slices = [shard_slice(name, pos, config) for pos in range(len(parts))] if dim else None
            factors[(kind, dim)] = inverse_factor(grams[kind], slices)
        codes = round_columns(getattr(layer, name), scale, zero, bits, *factors[(kind, dim)])
        for pos, (j, g) in enumerate(zip(layer.shard_ids, grids)):
            sl = shard_slice(name, pos, config)
            mine = codes[:, sl] if dim else codes[sl]
            out[(name, j)] = (mine.contiguous().numpy().ravel().astype(np.uint8), g[1], g[2])
    return out


def _spread(per_group: np.ndarray, shape) -> torch.Tensor:
    """A group's value at each of its weights, as a tensor of `shape` (row-major groups)."""
    n = int(np.prod(shape))
    return torch.from_numpy(np.repeat(per_group, codecs.GROUP)[:n].reshape(shape))


def inverse_factor(gram: torch.Tensor, blocks: list[slice] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, U): the columns in decreasing order of their input's energy, and the upper
    Cholesky factor of the damped inverse Gram matrix in that order. With `blocks`, only
    the diagonal blocks are kept (and damped each on its own), so error never crosses
    from one block's columns to another's."""
    n = gram.shape[0]
    h = torch.zeros_like(gram)
    for sl in blocks or [slice(0, n)]:
        b = gram[sl, sl].clone()
        diag = torch.diagonal(b)
        diag[diag <= 0] = 1.0                   # an input that never fires: any code will do
        diag += DAMP * diag.mean()
        h[sl, sl] = b
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    h = h[order][:, order]
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return order, torch.linalg.cholesky(inverse, upper=True)


def round_columns(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  order: torch.Tensor, u: torch.Tensor, block: int = 128) -> torch.Tensor:
    """GPTQ's loop: the codes of w [rows, cols] on the element-wise grid (scale, zero),
    column by column in `order`, each column's error (decoded with the decoder's float32
    arithmetic) spread over the later columns by the factor `u`. The spreading is done
    within a block of columns as it is rounded (`_round_block`), and onto the columns after
    the block in one product (GPTQ's lazy batch: the same result, less memory traffic)."""
    # transposed, so that a column is a contiguous row
    w = w.double().T[order].contiguous()
    scale, zero = scale.T[order].contiguous(), zero.T[order].contiguous()
    codes = np.empty(tuple(w.shape), dtype=np.float32)
    ww, uu = w.numpy(), u.numpy()
    for b0 in range(0, w.shape[0], block):
        b1 = min(b0 + block, w.shape[0])
        errs = _round_block(ww, scale.numpy(), zero.numpy(), uu, codes, b0, b1, (1 << bits) - 1)
        w[b1:] -= u[b0:b1, b1:].T @ torch.from_numpy(errs)
    out = torch.empty(codes.shape, dtype=torch.float32)
    out[order] = torch.from_numpy(codes)
    return out.T


# A column's work is a few operations on a few hundred weights: as torch calls, their
# overhead is most of GPTQ's time (3,456 columns a MiniLM layer), so the block is one
# compiled loop.
@numba.njit(nogil=True, cache=True)
def _round_block(w, scale, zero, u, codes, b0, b1, levels):
    rows = w.shape[1]
    errs = np.empty((b1 - b0, rows))
    for i in range(b0, b1):
        for r in range(rows):
            s, z = scale[i, r], zero[i, r]
            q = np.float32(0.0)
            if s > 0:
                q = np.float32(min(max(np.round((w[i, r] - z) / s), 0.0), levels))
            decoded = np.float32(q * s) + z        # zero + code * scale, as the decoder does
            err = (w[i, r] - np.float64(decoded)) / u[i, i]
            errs[i - b0, r] = err
            codes[i, r] = q
        for k in range(i + 1, b1):
            f = u[i, k]
            for r in range(rows):
                w[k, r] -= f * errs[i - b0, r]
    return errs
