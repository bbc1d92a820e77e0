"""The harvest's mergeable state: exact running top-k, priority samples and statistics.

Everything here is vectorised over the features of a source; nothing loops over features in
Python. A state computed over shards of a corpus merges into exactly the state of one pass,
whatever the order of the shards: every ranking is a total order on (score desc, sequence asc),
and each (sequence, feature) pair contributes at most one candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from app.histogram import HIST_BASE, HIST_BINS, HIST_SHIFT
from workers.relations import CoFiring

EMPTY_SEQ = torch.iinfo(torch.int64).max


def batch_reduce(acts: Tensor, first: int) -> tuple[Tensor, ...]:
    """One batch of one source, reduced.

    acts: [batch, seq, n_features]; positions before `first` (the BOS) are ignored.
    Returns per (sequence, feature) the peak and trough with their positions, each [batch, F],
    and per feature the sum, sum of squares, count of active (> 0) tokens and histogram
    counts [F, HIST_BINS] (the bins of app/histogram.py).
    """
    a = acts[:, first:, :].float()
    n_feat = a.shape[-1]
    mx, amx = a.max(dim=1)
    mn, amn = a.min(dim=1)
    s = a.sum(dim=(0, 1), dtype=torch.float64)
    ss = (a * a).sum(dim=(0, 1), dtype=torch.float64)
    n_active = (a > 0).sum(dim=(0, 1))
    k = ((a.contiguous().view(torch.int32) >> HIST_SHIFT) - HIST_BASE).clamp_(0, HIST_BINS - 1)
    k = k.long() + torch.arange(n_feat, device=a.device) * HIST_BINS
    hist = torch.zeros(n_feat * HIST_BINS, dtype=torch.int64, device=a.device)
    hist.index_add_(0, k.flatten(), torch.ones(k.numel(), dtype=torch.int64, device=a.device))
    return mx, amx + first, mn, amn + first, s, ss, n_active, hist.view(n_feat, HIST_BINS)


@dataclass
class SparseCodes:
    """An SAE's codes for `n_tokens` tokens as (token, feature, value) entries; every entry not
    listed is 0. Entries may hold a 0 value too (a topk code's ReLU'd pre-activation)."""

    n_tokens: int
    n_features: int
    tok: Tensor
    """[nnz] int64: the token's flat index, batch row * seq_len + position."""
    feat: Tensor
    """[nnz] int64"""
    val: Tensor
    """[nnz] in the SAE's dtype, >= 0."""


def sparse_reduce(codes: SparseCodes, batch: int, seq_len: int, first: int
                  ) -> tuple[Tensor, ...]:
    """batch_reduce's results from a batch's non-zero codes alone, for codes >= 0.

    Returns per (sequence, feature) the peak and its position, each [batch, F] (0 at the first
    counted position where the feature never fired, as torch's max over zeros), and per
    feature the minimum, sum, sum of squares, active count and histogram [F, HIST_BINS]. The
    zeros are not read: they add nothing to the sums, they are the tokens the active count
    leaves out (histogram bin 0), and they make the minimum 0 unless the feature fired on
    every token. Same values as batch_reduce of the dense codes; the float64 sums may differ
    in their last bits (another order of addition).
    """
    n_feat, dev = codes.n_features, codes.val.device
    row, pos = codes.tok // seq_len, codes.tok % seq_len
    val = codes.val.float()
    ok = (pos >= first) & (val > 0)
    val = torch.where(ok, val, 0.0)  # entries before `first`, or 0, weigh nothing
    weight = ok.long()
    n_tokens = batch * (seq_len - first)
    def per_feature(x: Tensor) -> Tensor:
        return torch.zeros(n_feat, dtype=x.dtype, device=dev).index_add_(0, codes.feat, x)

    n_active, s, ss = per_feature(weight), per_feature(val.double()), per_feature(
        (val * val).double())
    key = row * n_feat + codes.feat
    mx = torch.zeros(batch * n_feat, device=dev).scatter_reduce_(0, key, val, "amax")
    peak = ok & (val == mx[key])
    amx = torch.full((batch * n_feat,), seq_len, dtype=torch.int64, device=dev).scatter_reduce_(
        0, key, torch.where(peak, pos, seq_len), "amin")
    amx = torch.where(amx < seq_len, amx, first)
    bins = ((val.view(torch.int32) >> HIST_SHIFT) - HIST_BASE).clamp_(0, HIST_BINS - 1)
    hist = torch.zeros(n_feat * HIST_BINS, dtype=torch.int64, device=dev).index_add_(
        0, codes.feat * HIST_BINS + bins, weight).view(n_feat, HIST_BINS)
    hist[:, 0] += n_tokens - n_active
    low = torch.full((n_feat,), float("inf"), device=dev).scatter_reduce_(
        0, codes.feat, torch.where(ok, val, float("inf")), "amin")
    mn = torch.where(n_active < n_tokens, 0.0, low)
    return mx.view(batch, n_feat), amx.view(batch, n_feat), mn, s, ss, n_active, hist


def sample_keys(seq: Tensor, n_features: int, seed: int) -> Tensor:
    """Deterministic random priority keys in [0, 2**24) for every (sequence, feature): [B, F].

    A function of (seed, sequence index, feature index) alone, so every shard draws the same
    key for the same pair, which is what makes priority samples merge exactly.
    """
    m31 = 0x7FFFFFFF
    f = torch.arange(n_features, device=seq.device, dtype=torch.int64)
    h = (seq[:, None] % 0x40000000) * 0x9E3779B1 + f[None, :] * 0x85EBCA77 + seed * 0x27D4EB2F
    h = h & m31
    for mul in (0x2C1B3C6D, 0x297A2D39, 0x5BD1E995):
        h = h ^ (h >> 15)
        h = (h * mul) & m31
    h = h ^ (h >> 13)
    return (h & 0xFFFFFF).float()


def _best_rows(score: Tensor, seq: Tensor, keep: int) -> Tensor:
    """Row indices of the `keep` best entries per column under (score desc, seq asc): [keep, F]."""
    by_seq = torch.argsort(seq, dim=0, stable=True)
    order = torch.argsort(score.gather(0, by_seq), dim=0, descending=True, stable=True)
    return by_seq.gather(0, order[:keep])


_FIELDS = ("score", "seq", "pos", "value", "slot")


@dataclass
class Ranked:
    """The best `size` candidates per feature under one score: all tensors [size, F].

    `slot` indexes the window pool while a pass runs; `windows` [size, F, W] (float16) holds the
    per-token activations once the state is finished. Empty entries have score -inf.
    """

    score: Tensor
    seq: Tensor
    pos: Tensor
    value: Tensor
    slot: Tensor
    windows: Tensor | None = None

    @classmethod
    def empty(cls, size: int, n_features: int, device: torch.device | str = "cpu") -> Ranked:
        shape = (size, n_features)
        return cls(
            score=torch.full(shape, float("-inf"), device=device),
            seq=torch.full(shape, EMPTY_SEQ, dtype=torch.int64, device=device),
            pos=torch.zeros(shape, dtype=torch.int32, device=device),
            value=torch.zeros(shape, device=device),
            slot=torch.full(shape, -1, dtype=torch.int64, device=device),
        )

    @property
    def size(self) -> int:
        return self.score.shape[0]

    def _take(self, other: Ranked, rows: Tensor) -> Ranked:
        cat = {name: torch.cat([getattr(self, name), getattr(other, name)]) for name in _FIELDS}
        out = {name: t.gather(0, rows) for name, t in cat.items()}
        if self.windows is not None and other.windows is not None:
            w = torch.cat([self.windows, other.windows])
            out["windows"] = w.gather(0, rows[:, :, None].expand(-1, -1, w.shape[-1]))
        return Ranked(**out)

    def offer(self, cand: Ranked) -> Tensor:
        """Merge a batch of candidates in place; returns a bool mask [size, F] of the entries
        that came from `cand` (they need windows).

        Within a pass, batches come in increasing sequence order, so a candidate enters only by
        beating the current last entry outright: features where none does are left untouched,
        which makes a late batch nearly free.
        """
        size = self.size
        new = torch.zeros_like(self.score, dtype=torch.bool)
        cols = (cand.score > self.score[-1]).any(0).nonzero().squeeze(1)
        if cols.numel() == 0:
            return new
        mine, theirs = self._columns(cols), cand._columns(cols)
        # Every candidate's sequence comes after every entry's, and both sides are already in
        # (score desc, seq asc) order among equal scores, so one stable sort by score gives
        # the (score desc, seq asc) order that _best_rows computes with two.
        rows = torch.argsort(torch.cat([mine.score, theirs.score]), dim=0, descending=True,
                             stable=True)[:size]
        merged = mine._take(theirs, rows)
        for name in _FIELDS:
            getattr(self, name)[:, cols] = getattr(merged, name)
        new[:, cols] = (rows >= size) & torch.isfinite(merged.score)
        return new

    def _columns(self, cols: Tensor) -> Ranked:
        return Ranked(*(getattr(self, name)[:, cols] for name in _FIELDS))

    def merge(self, other: Ranked) -> Ranked:
        """The exact merge of two finished states (windows included)."""
        rows = _best_rows(torch.cat([self.score, other.score]), torch.cat([self.seq, other.seq]),
                          self.size)
        return self._take(other, rows)


@dataclass
class Stats:
    """Per-feature statistics that merge by addition (and max / min)."""

    n_tokens: int
    n_active: Tensor  # [F] int64
    sum: Tensor  # [F] float64
    sumsq: Tensor  # [F] float64
    max: Tensor  # [F] float32
    min: Tensor  # [F] float32
    hist: Tensor  # [F, HIST_BINS] int64

    @classmethod
    def empty(cls, n_features: int, device: torch.device | str = "cpu") -> Stats:
        return cls(
            n_tokens=0,
            n_active=torch.zeros(n_features, dtype=torch.int64, device=device),
            sum=torch.zeros(n_features, dtype=torch.float64, device=device),
            sumsq=torch.zeros(n_features, dtype=torch.float64, device=device),
            max=torch.full((n_features,), float("-inf"), device=device),
            min=torch.full((n_features,), float("inf"), device=device),
            hist=torch.zeros(n_features, HIST_BINS, dtype=torch.int64, device=device),
        )

    def merge(self, other: Stats) -> Stats:
        return Stats(
            n_tokens=self.n_tokens + other.n_tokens,
            n_active=self.n_active + other.n_active,
            sum=self.sum + other.sum,
            sumsq=self.sumsq + other.sumsq,
            max=torch.maximum(self.max, other.max),
            min=torch.minimum(self.min, other.min),
            hist=self.hist + other.hist,
        )

    @property
    def mean(self) -> Tensor:
        return self.sum / max(self.n_tokens, 1)

    @property
    def std(self) -> Tensor:
        n = max(self.n_tokens, 1)
        return (self.sumsq / n - self.mean**2).clamp_min(0).sqrt()


@dataclass
class SourceState:
    """Everything the harvest keeps for one source: four rankings and the statistics.

    top: peak value per sequence (> 0 only); bottom: the trough, for sources that go negative
    (< 0 only); sample: a uniform sample of the sequences where the feature fired, by priority
    sampling (the best random keys), from which quantile examples are picked at the end;
    zero: the same kind of sample of the sequences where it never fired (no token > 0), the
    non-activating examples that scorers of explanations need. None in states saved before it
    existed: a merge with one of those has no zero sample.
    """

    top: Ranked
    bottom: Ranked | None
    sample: Ranked
    stats: Stats
    n_sequences: int = 0
    shards: frozenset[int] = field(default_factory=frozenset)
    cofire: CoFiring | None = None
    """Co-firing statistics (workers/relations.py), where the harvest keeps them."""
    sums: dict[str, Tensor] = field(default_factory=dict)
    """Further per-source totals that merge by addition (a heads source's metric sums)."""
    zero: Ranked | None = None

    def rankings(self) -> dict[str, Ranked]:
        out = {"top": self.top, "sample": self.sample}
        if self.bottom is not None:
            out["bottom"] = self.bottom
        if self.zero is not None:
            out["zero"] = self.zero
        return out

    def merge(self, other: SourceState) -> SourceState:
        """Combine two finished states of disjoint shards; the order does not matter."""
        if self.shards & other.shards:
            raise ValueError(f"shards {sorted(self.shards & other.shards)} merged twice")
        return SourceState(
            top=self.top.merge(other.top),
            bottom=None if self.bottom is None else self.bottom.merge(other.bottom),
            sample=self.sample.merge(other.sample),
            stats=self.stats.merge(other.stats),
            n_sequences=self.n_sequences + other.n_sequences,
            shards=self.shards | other.shards,
            cofire=None if self.cofire is None else self.cofire.merge(other.cofire),
            sums={k: v + other.sums[k] for k, v in self.sums.items()},
            zero=None if self.zero is None or other.zero is None else self.zero.merge(other.zero),
        )

    def to(self, device: torch.device | str) -> SourceState:
        def move(r: Ranked | None) -> Ranked | None:
            if r is None:
                return None
            return Ranked(*(None if t is None else t.to(device) for t in (
                r.score, r.seq, r.pos, r.value, r.slot, r.windows)))

        st = self.stats
        return SourceState(
            top=move(self.top), bottom=move(self.bottom), sample=move(self.sample),
            stats=Stats(st.n_tokens, *(t.to(device) for t in (
                st.n_active, st.sum, st.sumsq, st.max, st.min, st.hist))),
            n_sequences=self.n_sequences, shards=self.shards, zero=move(self.zero),
            cofire=None if self.cofire is None else self.cofire.to(device),
            sums={k: v.to(device) for k, v in self.sums.items()},
        )
