"""Measuring which shards matter: the importance profile (an N x M table) and the numbers
that turn it into a predicted accuracy for any plan (profiles.py gives that model).

Every measurement runs over one split (dev by default; never test), cut into batches of
sentences of equal or near-equal token count (sorted by token count, not by characters as
evaluate.batches_by_length does: on the dev split, batches of 64 then hold 29.9k tokens with
padding instead of 37.5k, for 28.0k real ones).

Common to both methods (whole-model evaluations):
  - `full_accuracy`: every shard at 32 bits;
  - `submodel_accuracy` for the elastic grid (`grid_sizes`): n in ceil(N/2)..N layers times
    m in {M/4, M/2, 3M/4, M} shards (for MiniLM-L6: n in 3..6, m in 3, 6, 9, 12), 32 bits;
  - every stored bitwidth b applied to the whole model: mean KL(p_full || p_b) and accuracy.
    `bits_error[b]` = KL at b / KL at the lowest bitwidth (1 there, 0 at 32, made
    non-increasing in b); `kl_to_acc` is the least-squares slope, through the origin, of the
    accuracy lost at b against (sum of shard_kl) * bits_error[b], floored at KL_TO_ACC_FLOOR.

The two methods for the N x M table `shard_kl`:
  - `degrade` (the paper's): each shard alone is dropped to the store's lowest bitwidth,
    everything else at 32 bits; its score is the mean KL divergence of the output
    distribution from the full model's, and `shard_acc_drop` the accuracy lost. Exact, and
    made cheap by running batch by batch: the full model's hidden states entering each layer
    are computed once per batch, and for shard (i, j) only layers i.. are rerun, with shard j's
    low-bit weights swapped into layer i in place (no model copies).
  - `gradient` (a cheap estimate, one forward and one backward pass per batch): the second
    order (Fisher) approximation of the same KL, KL_n ~ 0.5 * dl_n' F_n dl_n, where dl_n is
    the change of sentence n's logits under the shard's weight change dw (to first order,
    J_n dw) and F_n = diag(p_n) - p_n p_n' the Fisher matrix of the softmax. The directional
    derivatives J_n dw are obtained for every shard and every sentence at once, exactly (per
    sentence, not per batch), by adding to each shard-split projection x W' a zero "probe" e
    times x dw' and reading d(v.l)/de in one backward pass, with v_n a square-root factor of
    F_n (F_n has rank K-1: for two labels, one pass). The table is rescaled so that its total
    equals the measured KL of the whole model at the lowest bitwidth (same units as degrade).
    `shard_acc_drop` is None for this method.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .data import Example, load_split
from .encoder import Submodel, attention_keep, encode, grid_key, head_logits, layer_forward
from .errors import Cancelled, InputError, StiError
from .profiles import ImportanceProfile
from .store import MATRICES, Store
from .evaluate import encode_examples
from .tokenizer import Batch, Tokenizer
from .weights import ModelWeights, shard_slice, split_dim

Progress = Callable[[int, int], bool]  # (done, total) -> keep going? (False cancels)
METHODS = ("degrade", "gradient")
KL_TO_ACC_FLOOR = 1e-3
GRAD_TOKENS = 4096  # at most this many (padded) tokens per backward pass, to bound memory


# --- the elastic grid -------------------------------------------------------------------------
def grid_layers(num_layers: int) -> list[int]:
    """Depths of the submodel grid: ceil(N/2)..N (DynaBERT's depth range; for N = 6: 3..6)."""
    return list(range(max(1, math.ceil(num_layers / 2)), num_layers + 1))


def grid_shards(num_shards: int) -> list[int]:
    """Widths of the submodel grid: M/4, M/2, 3M/4, M rounded (DynaBERT's width multipliers;
    for M = 12: 3, 6, 9, 12), without duplicates for small M."""
    return sorted({max(1, round(num_shards * k / 4)) for k in range(1, 5)})


def grid(num_layers: int, num_shards: int) -> list[tuple[int, int]]:
    return [(n, m) for n in grid_layers(num_layers) for m in grid_shards(num_shards)]


# --- data ---------------------------------------------------------------------------------------
@dataclass
class _Data:
    """The split as batches of sentences sorted by token count (ties by position), with labels."""
    batches: list[tuple[torch.Tensor, Batch]]
    size: int


def _examples(split: str, data, limit: int | None, labels: tuple[str, ...], columns=None):
    """The examples to measure on (a built-in split, or a user's data file with its labels
    mapped onto the model's) and, for a file, where they came from."""
    if data is None:
        examples = load_split(split)[:limit]
        if not examples:
            raise InputError(f"the {split} split has no sentences to profile on")
        return examples, None
    from .datafile import Columns, read_examples, source_of
    columns = columns or Columns()
    examples = read_examples(data, labels, columns, limit=limit)
    return examples, source_of(data, len(examples), columns)


def _load_data(examples: list[Example], tokenizer: Tokenizer, batch_size: int) -> _Data:
    full = encode_examples(tokenizer, examples)
    lengths = full.attention_mask.sum(1).tolist()
    order = sorted(range(len(examples)), key=lambda i: (lengths[i], i))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(lengths[i] for i in idx)
        batch = full.take(idx, width)
        batches.append((torch.tensor([examples[i].label for i in idx]), batch))
    return _Data(batches=batches, size=len(examples))


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    # float64 so that the KL of nearly equal distributions is not lost to rounding
    return F.log_softmax(logits.double(), -1)


def _kl_sum(logp: torch.Tensor, ref: torch.Tensor) -> float:
    """sum over sentences of KL(ref || this), both given as log-probabilities."""
    return float(F.kl_div(logp, ref, log_target=True, reduction="sum"))


def _logits(weights: ModelWeights, batch: Batch, submodel: Submodel | None = None) -> torch.Tensor:
    hidden = encode(weights, batch.input_ids, batch.attention_mask, submodel, token_type_ids=batch.token_type_ids)
    return head_logits(weights.head, hidden, batch.attention_mask)


# --- the measuring session -----------------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    """An importance profile together with the whole-model numbers behind it."""
    profile: ImportanceProfile
    accuracy_by_bits: dict[int, float]   # every shard at b bits (32: the full model)
    kl_by_bits: dict[int, float]         # mean KL(full || every shard at b bits)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase


class _Session:
    """One store, one split: the full model's outputs and the whole-model evaluations, which
    both methods share (so `compare` computes them once)."""

    def __init__(self, store: Store, split: str, seed: int, limit: int | None, batch_size: int,
                 max_length: int, tick: Callable[[], None], data: str | Path | None = None, columns=None):
        self.store, self.seed, self.tick = store, seed, tick
        self.split = split if data is None else "file"
        c = self.config = store.config
        if 32 not in store.bits:
            raise InputError(f"store {store.path} holds no 32-bit shards: importance is measured against them")
        # a store of 32-bit shards only has no bitwidth to choose: its shards' importance is
        # zero (nothing to degrade to) and only the submodel grid is measured
        self.lowest = min(store.bits)
        self.tokenizer = Tokenizer(store.path, max_length=min(max_length, c.max_tokens))
        examples, self.source = _examples(split, data, limit, c.labels, columns)
        self.data = _load_data(examples, self.tokenizer, batch_size)
        self.weights = store.load_model(32)
        self.seconds: dict[str, float] = {}

    @property
    def num_batches(self) -> int:
        return len(self.data.batches)

    def common_units(self) -> int:
        return self.num_batches * (1 + len(grid(self.config.num_layers, self.config.num_shards)) - 1
                                   + len(self.store.bits) - 1)

    def method_units(self, method: str) -> int:
        if self.lowest == 32:
            return 0
        return self.num_batches * (self.config.num_layers if method == "degrade" else 1)

    def _score(self, logits_of) -> tuple[float, float]:
        """(mean KL(full || this), accuracy) of `logits_of(batch)` over the split."""
        kl, correct = 0.0, 0
        for k, (labels, batch) in enumerate(self.data.batches):
            logp = _log_probs(logits_of(batch))
            kl += _kl_sum(logp, self.full_logp[k])
            correct += int((logp.argmax(-1) == labels).sum())
            self.tick()
        return kl / self.data.size, correct / self.data.size

    def common(self) -> None:
        """Full model, submodel grid, uniform bitwidths."""
        t0 = time.perf_counter()
        c, w = self.config, self.weights
        with torch.inference_mode():
            self.full_logp = []
            for _, batch in self.data.batches:
                self.full_logp.append(_log_probs(_logits(w, batch)))
                self.tick()
            labels = torch.cat([lab for lab, _ in self.data.batches])
            self.full_acc = int((torch.cat(self.full_logp).argmax(-1) == labels).sum()) / self.data.size
            self.sub_acc = {}
            for n, m in grid(c.num_layers, c.num_shards):
                if (n, m) == (c.num_layers, c.num_shards):
                    self.sub_acc[grid_key(n, m)] = self.full_acc
                    continue
                sub = Submodel.of(c, n, m)
                # the layers cut to their first m shards once, not once per batch
                ws = ModelWeights(config=c, embeddings=w.embeddings, head=w.head,
                                  layers=[w.submodel_layer(i, range(m)) if i in sub.layers else w.layers[i]
                                          for i in range(c.num_layers)])
                self.sub_acc[grid_key(n, m)] = self._score(lambda b: _logits(ws, b, sub))[1]
            self.kl_by_bits, self.acc_by_bits = {32: 0.0}, {32: self.full_acc}
            for bits in sorted(self.store.bits):
                if bits != 32:
                    wb = at_bits(self.store, w, bits)
                    self.kl_by_bits[bits], self.acc_by_bits[bits] = self._score(lambda b: _logits(wb, b))
        self.bits_error = bits_error_of(self.kl_by_bits, self.lowest)
        self.seconds["common"] = time.perf_counter() - t0

    def table(self, method: str):
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        c = self.config
        if self.lowest == 32:
            kl = np.zeros((c.num_layers, c.num_shards))
            drop = kl.copy() if method == "degrade" else None
        elif method == "degrade":
            kl, drop = self.degrade_table()
        else:
            kl, drop = self.gradient_table(), None
        self.seconds[method] = time.perf_counter() - t0
        return kl, drop

    def degrade_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Per shard: mean KL and accuracy drop with that shard alone at the lowest bitwidth."""
        c, w = self.config, self.weights
        N, M = c.num_layers, c.num_shards
        kl, correct = np.zeros((N, M)), np.zeros((N, M))
        low = [[self.store.shard(i, j, self.lowest) for j in range(M)] for i in range(N)]
        with torch.inference_mode():
            for k, (labels, batch) in enumerate(self.data.batches):
                keep = attention_keep(batch.attention_mask)
                states = encode(w, batch.input_ids, batch.attention_mask, all_hidden=True,
                                token_type_ids=batch.token_type_ids)
                for i in range(N):
                    layer = w.layers[i]
                    for j in range(M):
                        with _swapped(layer, j, low[i][j], c):
                            x = layer_forward(states[i], keep, layer, c)
                        for later in w.layers[i + 1:]:
                            x = layer_forward(x, keep, later, c)
                        logp = _log_probs(head_logits(w.head, x, batch.attention_mask))
                        kl[i, j] += _kl_sum(logp, self.full_logp[k])
                        correct[i, j] += int((logp.argmax(-1) == labels).sum())
                    self.tick()
        return kl / self.data.size, self.full_acc - correct / self.data.size

    def gradient_table(self) -> np.ndarray:
        """Per shard: the Fisher estimate of the KL at the lowest bitwidth (see module docstring),
        rescaled so that the table sums to the measured KL of the whole model at that bitwidth."""
        c, w = self.config, self.weights
        N, M = c.num_layers, c.num_shards
        deltas = {}
        for i in range(N):
            low = self.store.layer(i, range(M), self.lowest)
            for part in MATRICES:
                d = getattr(low, part) - getattr(w.layers[i], part)
                if bool(d.any()):
                    deltas[(i, part)] = (getattr(w.layers[i], part), d)
        est = np.zeros((N, M))
        for _, batch in self.data.batches:
            rows = max(1, GRAD_TOKENS // batch.input_ids.shape[1])
            for start in range(0, batch.input_ids.shape[0], rows):
                chunk = batch.take(slice(start, start + rows))
                est += self._fisher(chunk, deltas)
            self.tick()
        est = 0.5 * est / self.data.size
        total, target = float(est.sum()), self.kl_by_bits[self.lowest]
        return est * (target / total) if total > 0 else est

    def _fisher(self, batch: Batch, deltas: dict) -> np.ndarray:
        """sum over the batch's sentences of dl' F dl for every shard (dl = J dw, first order)."""
        c = self.config
        probes = _Probes(deltas)
        with torch.enable_grad(), probes:
            logits = _logits(self.weights, batch)
        missing = set(deltas) - set(probes.probes)
        if missing:
            raise StiError(f"gradient importance: the encoder did not call F.linear on {sorted(missing)[:3]}; "
                           "the probes need it")
        p = torch.softmax(logits.detach().double(), -1)
        fisher = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        lam, vec = torch.linalg.eigh(fisher)  # ascending; the smallest is the all-ones null direction
        keys = list(probes.probes)
        out = np.zeros((c.num_layers, c.num_shards))
        K = logits.shape[1]
        for r in range(1, K):
            v = (vec[:, :, r] * lam[:, r].clamp(min=0).sqrt()[:, None]).to(logits.dtype)
            grads = torch.autograd.grad((v * logits).sum(), [probes.probes[key] for key in keys],
                                        retain_graph=r < K - 1)
            a = torch.zeros(logits.shape[0], c.num_layers, c.num_shards, dtype=torch.float64)
            for (i, part), g in zip(keys, grads):  # g: [B, 1, features of the shard-split dim]
                a[:, i] += g.double().reshape(g.shape[0], c.num_shards, -1).sum(-1)
            out += (a ** 2).sum(0).numpy()
        return out

    def profile(self, method: str, kl, drop, cost_s: float) -> ImportanceProfile:
        kl = np.maximum(np.asarray(kl, dtype=float), 0.0)
        return ImportanceProfile(
            store_id=self.store.store_id, method=method, split=self.split, seed=self.seed,
            lowest_bits=self.lowest, full_accuracy=self.full_acc, submodel_accuracy=dict(self.sub_acc),
            shard_kl=tuple(tuple(float(v) for v in row) for row in kl),
            shard_acc_drop=None if drop is None else tuple(tuple(float(max(-1.0, v)) for v in row) for row in drop),
            bits_error=dict(self.bits_error),
            kl_to_acc=kl_to_acc_of(kl, self.bits_error, self.acc_by_bits, self.full_acc),
            cost_s=cost_s, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            data=None if self.source is None else self.source.to_dict())


@contextlib.contextmanager
def _swapped(layer, j: int, low, config):
    """Layer `layer` with shard j's matrices replaced, in place, by `low`'s; restored on exit."""
    saved = []
    try:
        for part in MATRICES:
            sl = shard_slice(part, j, config)
            view = getattr(layer, part).narrow(split_dim(part), sl.start, sl.stop - sl.start)
            saved.append((view, view.clone()))
            view.copy_(getattr(low, part))
        yield layer
    finally:
        for view, original in saved:
            view.copy_(original)


class _Probes(TorchFunctionMode):
    """While active, every F.linear on a tracked matrix W (with low-bit change dW) also adds a
    zero probe term: x dW' * e for row-split matrices (e per sentence and output feature), or
    (x * e) dW' for column-split ones (e per sentence and input feature). The output is
    unchanged; d(output)/de holds, per sentence, the directional derivative along each shard's
    slice of dW (x is detached in the probe term: with e = 0 its gradient through x is zero)."""

    def __init__(self, deltas: dict):
        super().__init__()
        self.by_id = {id(W): (key, W, d) for key, (W, d) in deltas.items()}
        self.probes: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            hit = self.by_id.get(id(weight))
            if hit is not None and hit[1] is weight:
                (i, part), _, delta = hit
                x = args[0].detach()
                shape = (x.shape[0],) + (1,) * (x.dim() - 2)  # one probe per sentence and feature
                if split_dim(part) == 0:
                    e = torch.zeros(shape + (delta.shape[0],), requires_grad=True)
                    out = out + F.linear(x, delta) * e
                else:
                    e = torch.zeros(shape + (delta.shape[1],), requires_grad=True)
                    out = out + F.linear(x * e, delta)
                self.probes[(i, part)] = e
        return out


# --- progress ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _reporter(progress: Progress | None, label: str):
    """The caller's callback, or a rich progress bar on an interactive stderr, or nothing."""
    if progress is not None or not sys.stderr.isatty():
        yield progress
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    with Bar(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
             TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total) or True


class _Ticker:
    def __init__(self, progress: Progress | None):
        self.progress, self.done, self.total = progress, 0, 0

    def __call__(self) -> None:
        self.done += 1
        if self.progress is not None and self.progress(self.done, max(self.total, self.done)) is False:
            raise Cancelled("importance profiling cancelled; nothing was saved")


@contextlib.contextmanager
def _session(store, split, seed, limit, batch_size, max_length, progress, label, data=None, columns=None):
    _check_args(split, seed, limit, batch_size)
    own = not isinstance(store, Store)
    opened = Store(store) if own else store
    try:
        with _reporter(progress, label) as report:
            ticker = _Ticker(report)
            torch.manual_seed(seed)
            yield _Session(opened, split, seed, limit, batch_size, max_length, ticker, data, columns), ticker
    finally:
        if own:
            opened.close()


def _check_args(split, seed, limit, batch_size) -> None:
    if split == "test":
        raise InputError("importance is measured on dev (or train): the test split is kept for reporting")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise InputError(f"seed must be an integer in 0..2^32-1, got {seed!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive integer or None, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")


# --- public API ----------------------------------------------------------------------------------
def measure(store: str | Path | Store, method: str = "degrade", split: str = "dev", seed: int = 0,
            limit: int | None = None, batch_size: int = 64, max_length: int = 128,
            progress: Progress | None = None, data: str | Path | None = None, columns=None) -> Measurement:
    """Like `measure_importance`, with the whole-model accuracy and KL per bitwidth as well."""
    if method not in METHODS:
        raise InputError(f"unknown importance method {method!r}: choose {' or '.join(METHODS)}")
    t0 = time.perf_counter()
    with _session(store, split, seed, limit, batch_size, max_length, progress, f"importance ({method})",
                  data, columns) as (s, ticker):
        ticker.total = s.common_units() + s.method_units(method)
        s.common()
        kl, drop = s.table(method)
        prof = s.profile(method, kl, drop, time.perf_counter() - t0)
        return Measurement(prof, dict(s.acc_by_bits), dict(s.kl_by_bits), dict(s.seconds))


def measure_importance(store: str | Path | Store, method: str = "degrade", split: str = "dev", seed: int = 0,
                       limit: int | None = None, batch_size: int = 64, max_length: int = 128,
                       progress: Progress | None = None, data: str | Path | None = None,
                       columns=None) -> ImportanceProfile:
    """The importance profile of a store's shards, measured on `split` (not test), or on the
    labelled examples of a `data` file (TSV, CSV or JSONL, see datafile.py; the profile
    records its path, sha256 and size). `limit` keeps the first examples; `progress(done,
    total)` returning False cancels (raises Cancelled). Same store, data and arguments give
    the same tables. `columns` (datafile.Columns) names the file's columns if need be."""
    return measure(store, method, split, seed, limit, batch_size, max_length, progress, data, columns).profile


def compare(store: str | Path | Store, split: str = "dev", seed: int = 0, limit: int | None = None,
            batch_size: int = 64, max_length: int = 128, progress: Progress | None = None
            ) -> tuple[ImportanceProfile, ImportanceProfile, float]:
    """Both methods on the same data (the shared whole-model evaluations run once; each
    profile's cost_s counts them plus its own table): (degrade, gradient, Spearman rho)."""
    with _session(store, split, seed, limit, batch_size, max_length, progress, "importance (both)") as (s, ticker):
        ticker.total = s.common_units() + s.method_units("degrade") + s.method_units("gradient")
        s.common()
        out = []
        for method in METHODS:
            kl, drop = s.table(method)
            out.append(s.profile(method, kl, drop, s.seconds["common"] + s.seconds[method]))
    return out[0], out[1], rank_correlation(out[0], out[1])


def accuracy_by_bits(store: str | Path | Store, split: str = "dev", limit: int | None = None,
                     batch_size: int = 64, max_length: int = 128,
                     progress: Progress | None = None) -> dict[int, float]:
    """{bits: accuracy on `split` with every shard of the model at that bitwidth}."""
    with _session(store, split, 0, limit, batch_size, max_length, progress, "accuracy by bits") as (s, ticker):
        ticker.total = s.num_batches * len(s.store.bits)
        out = {}
        with torch.inference_mode():
            for bits in sorted(s.store.bits):
                wb = s.weights if bits == 32 else at_bits(s.store, s.weights, bits)
                correct = 0
                for labels, batch in s.data.batches:
                    correct += int((_logits(wb, batch).argmax(-1) == labels).sum())
                    ticker()
                out[bits] = correct / s.data.size
        return out


def at_bits(store: Store, weights: ModelWeights, bits: int) -> ModelWeights:
    """`weights` with every layer's shards read from the store at `bits` (embeddings and head
    are stored in float32 only, so they are shared, not reread)."""
    c = store.config
    return ModelWeights(config=c, embeddings=weights.embeddings, head=weights.head,
                        layers=[store.layer(i, range(c.num_shards), bits) for i in range(c.num_layers)])


def bits_error_of(kl_by_bits: dict[int, float], lowest: int) -> dict[int, float]:
    """Output KL at b bits relative to the lowest: 1 there, 0 at 32, never rising with b."""
    if lowest == 32:
        return {32: 0.0}
    base = kl_by_bits[lowest]
    out, running = {}, 1.0
    for b in sorted(kl_by_bits):
        v = 1.0 if b == lowest else 0.0 if b == 32 else (kl_by_bits[b] / base if base > 0 else 0.0)
        running = min(running, max(0.0, v))
        out[b] = running
    return out


def kl_to_acc_of(kl, bits_error: dict[int, float], acc_by_bits: dict[int, float], full_acc: float) -> float:
    """Least squares through the origin of the whole-model accuracy drop at b bits against
    (sum of shard KL) * bits_error[b], over the bitwidths below 32; at least KL_TO_ACC_FLOOR."""
    total = float(np.sum(kl))
    below = [b for b in sorted(acc_by_bits) if b != 32]
    xs = np.array([total * bits_error[b] for b in below])
    ys = np.array([full_acc - acc_by_bits[b] for b in below])
    fit = float(xs @ ys / (xs @ xs)) if xs.size and float(xs @ xs) > 0 else 0.0
    return max(KL_TO_ACC_FLOOR, fit)


def rank_correlation(a: ImportanceProfile, b: ImportanceProfile) -> float:
    """Spearman correlation of two profiles' shard_kl tables (ties get average ranks; 0.0 if
    either table is constant)."""
    va, vb = np.asarray(a.shard_kl, dtype=float), np.asarray(b.shard_kl, dtype=float)
    if va.shape != vb.shape:
        raise InputError(f"importance tables of shapes {va.shape} and {vb.shape} cannot be compared")
    ra, rb = _ranks(va.ravel()), _ranks(vb.ravel())
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    try:
        from scipy.stats import rankdata
        return rankdata(v).astype(float)
    except ImportError:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(1, len(v) + 1)
        for value in np.unique(v):
            tie = v == value
            r[tie] = r[tie].mean()
        return r
