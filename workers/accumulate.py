"""One source's state while a pass runs: batches in, a finished SourceState out.

Windows of per-token activations are captured only for candidates that enter a ranking (most
batches admit few), into a pool of slots; rankings carry slot ids, so re-sorting a ranking
moves integers, not windows. The pool is compacted when it holds many evicted windows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from workers.relations import CoFiring
from workers.state import (
    EMPTY_SEQ,
    Ranked,
    SourceState,
    SparseCodes,
    Stats,
    batch_reduce,
    sample_keys,
    sparse_reduce,
)

ReduceFn = Callable[[Tensor, int], tuple[Tensor, ...]]


def window_lead(window: int) -> int:
    """How many tokens of a window come before its peak, where the sequence allows: about three
    quarters of it."""
    return window - window // 4 - 1


def window_start(pos: Tensor, seq_len: int, window: int) -> Tensor:
    """Where the window around a peak at `pos` starts: `window_lead` tokens before the peak,
    moved inside the sequence."""
    return (pos - window_lead(window)).clamp(0, seq_len - window)


def sparse_windows(codes: SparseCodes, batch: int, seq_len: int, pos: Tensor, window: int, *,
                   rows: Tensor | None = None, feats: Tensor | None = None) -> Tensor:
    """Windows of sparse codes (float16) around peaks at pos, where window_start cuts them:
    for the n candidates (batch rows, features) given, [n, window]; without rows and feats,
    for every (row, feature) of the batch, pos [batch, F] -> [batch, F, window]. Each entry
    of the codes lands in the window of its (row, feature), if it falls inside it."""
    n_feat, dev = codes.n_features, codes.val.device
    all_pairs = rows is None
    if all_pairs:
        rows = torch.arange(batch, device=dev).repeat_interleave(n_feat)
        feats = torch.arange(n_feat, device=dev).repeat(batch)
        pos = pos.reshape(-1)
    n = rows.numel()
    which = torch.full((batch * n_feat,), -1, dtype=torch.int64, device=dev)
    which[rows * n_feat + feats] = torch.arange(n, device=dev)
    start = window_start(pos, seq_len, window)
    row, tpos = codes.tok // seq_len, codes.tok % seq_len
    c = which[row * n_feat + codes.feat]
    off = tpos - start[c.clamp(min=0)]
    inside = (c >= 0) & (off >= 0) & (off < window)
    out = torch.zeros(n * window + 1, dtype=torch.float16, device=dev)
    # entries outside every window are written to the spare last element
    out[torch.where(inside, c * window + off, n * window)] = codes.val.to(torch.float16)
    out = out[:-1].view(n, window)
    return out.view(batch, n_feat, window) if all_pairs else out


class Accumulator:
    """Feeds batches of one source's activations [batch, seq, F] into its rankings and stats."""

    def __init__(
        self,
        n_features: int,
        *,
        top_k: int,
        sample_size: int,
        window: int,
        zero_size: int = 0,
        bottom: bool,
        first: int,
        seed: int,
        device: torch.device | str = "cpu",
        reduce_fn: ReduceFn = batch_reduce,
        sync_free: bool = False,
        native: bool = False,
        cofire: bool = False,
    ):
        self.n_features = n_features
        self.window = window
        self.width = window
        """Values kept per window in the pool (a subclass may keep more than `window`)."""
        self.first = first
        self.seed = seed
        self.reduce_fn = reduce_fn
        self.state = SourceState(
            top=Ranked.empty(top_k, n_features, device),
            bottom=Ranked.empty(top_k, n_features, device) if bottom else None,
            sample=Ranked.empty(sample_size, n_features, device),
            stats=Stats.empty(n_features, device),
            cofire=CoFiring.empty(n_features, device) if cofire else None,
            zero=Ranked.empty(zero_size, n_features, device) if zero_size else None,
        )
        self.sync_free = sync_free
        self.native = native and not sync_free and torch.device(device).type == "cpu"
        """Insert candidates with the C loop of workers/native.py instead of Ranked.offer."""
        if sync_free:
            for ranking in self.state.rankings().values():
                ranking.windows = torch.zeros(ranking.size, n_features, window,
                                              dtype=torch.float16, device=device)
        self._chunks: list[Tensor] = []
        self._pool_size = 0
        self._live_slots = sum(r.score.numel() for r in self.state.rankings().values())

    def update(self, acts: Tensor, seq0: int) -> None:
        """acts: [batch, seq_len, F] for sequences seq0 .. seq0 + batch - 1."""
        b, t, f = acts.shape
        if f != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got {f}")
        mx, amx, mn, amn, s, ss, n_active, hist = self.reduce_fn(acts, self.first)
        self._add_stats(b, t, mx, mn.min(0).values, s, ss, n_active, hist)
        if self.state.cofire is not None:
            self.state.cofire.update(acts, self.first)
        offers = self._offers(mx, amx, mn, amn, seq0)
        if self.native and acts.dtype == torch.float32:
            # Early in a pass most candidates enter: then one copy of the batch laid out
            # [batch, F, seq] makes every window a contiguous read instead of `window` strided
            # ones (the copy pays for itself from about one window per 8 values).
            entering = sum(int((score > r.score[-1]).sum()) for r, score, _, _ in offers)
            src = acts
            if entering * self.window * 8 > acts.numel():
                from workers.native import scratch

                src = scratch("transposed", acts.numel(), acts.dtype).view(b, f, t)
                src = src.copy_(acts.transpose(1, 2)).transpose(1, 2)
            for ranking, score, pos, value in offers:
                self._admit_native(ranking, score, pos, value, src, seq0)
        else:
            for ranking, score, pos, value in offers:
                cand = self._candidates(score, pos, value, seq0)
                if self.sync_free:
                    self._admit_all(ranking, cand, self._cut_all(acts, cand.pos))
                else:
                    self._admit(ranking, cand, seq0,
                                lambda rows, feats, pos: self._cut(acts, rows, feats, pos))
        self._maybe_compact()

    def update_sparse(self, codes: SparseCodes, batch: int, seq_len: int, seq0: int) -> None:
        """The same as update() with the dense codes [batch, seq_len, F], from the non-zero
        codes of an SAE alone (codes >= 0, so there is no bottom ranking): statistics, peaks and
        windows are read off the entries, and the zeros follow from counts."""
        if codes.n_features != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got {codes.n_features}")
        if self.state.bottom is not None or self.state.cofire is not None:
            raise ValueError("sparse codes fill sources without bottom examples or co-firing")
        mx, amx, mn, s, ss, n_active, hist = sparse_reduce(codes, batch, seq_len, self.first)
        self._add_stats(batch, seq_len, mx, mn, s, ss, n_active, hist)
        every: list[Tensor] = []  # the rankings share their peaks (amx), hence their windows
        for ranking, score, pos, value in self._offers(mx, amx, None, None, seq0):
            cand = self._candidates(score, pos, value, seq0)
            if self.sync_free:
                if not every:
                    every.append(sparse_windows(codes, batch, seq_len, amx, self.window))
                self._admit_all(ranking, cand, every[0])
            else:
                self._admit(ranking, cand, seq0, lambda rows, feats, pos: sparse_windows(
                    codes, batch, seq_len, pos, self.window, rows=rows, feats=feats))
        self._maybe_compact()

    def _add_stats(self, b: int, t: int, mx: Tensor, mn: Tensor, s: Tensor, ss: Tensor,
                   n_active: Tensor, hist: Tensor) -> None:
        """One batch's reductions into the statistics (mn: per feature)."""
        st = self.state.stats
        st.n_tokens += b * (t - self.first)
        st.n_active += n_active
        st.sum += s
        st.sumsq += ss
        st.max = torch.maximum(st.max, mx.max(0).values)
        st.min = torch.minimum(st.min, mn)
        st.hist += hist
        self.state.n_sequences += b

    def _offers(self, mx: Tensor, amx: Tensor, mn: Tensor | None, amn: Tensor | None,
                seq0: int) -> list[tuple[Ranked, Tensor, Tensor, Tensor]]:
        """Each ranking's candidates of one batch: (ranking, score (-inf: not a candidate),
        position, value), each [batch, F]."""
        b, f = mx.shape
        neg_inf = float("-inf")
        fired = mx > 0
        offers = [(self.state.top, torch.where(fired, mx, neg_inf), amx, mx)]
        if self.state.bottom is not None:
            offers.append((self.state.bottom, torch.where(mn < 0, -mn, neg_inf), amn, mn))
        keys = sample_keys(torch.arange(seq0, seq0 + b, device=mx.device), f, self.seed)
        offers.append((self.state.sample, torch.where(fired, keys, neg_inf), amx, mx))
        if self.state.zero is not None:
            offers.append((self.state.zero, torch.where(fired, neg_inf, keys), amx, mx))
        return offers

    @staticmethod
    def _candidates(score: Tensor, pos: Tensor, value: Tensor, seq0: int) -> Ranked:
        b, f = score.shape
        seq = torch.arange(seq0, seq0 + b, device=score.device)[:, None].expand(b, f)
        ok = torch.isfinite(score)
        return Ranked(score=score, seq=torch.where(ok, seq, EMPTY_SEQ), pos=pos.int(),
                      value=value, slot=torch.full_like(seq, -1))

    def _maybe_compact(self) -> None:
        if self._pool_size > 4 * self._live_slots + 65536:
            self._compact()

    def _cut_all(self, acts: Tensor, pos: Tensor) -> Tensor:
        """Every candidate's window [batch, F, window] (float16) around its peak pos [batch, F]."""
        t = acts.shape[1]
        tok = window_start(pos.long(), t, self.window)[:, None, :] + torch.arange(
            self.window, device=acts.device)[None, :, None]  # [batch, window, F]
        return acts.gather(1, tok).to(torch.float16).permute(0, 2, 1)

    def _admit_all(self, ranking: Ranked, cand: Ranked, windows: Tensor) -> None:
        """Without a host synchronisation (for GPUs): every candidate comes with its window
        [batch, F, W], and the ranking, windows included, is re-sorted whole. Same result as
        _admit."""
        cand.windows = windows
        merged = ranking.merge(cand)
        ranking.score, ranking.seq, ranking.pos, ranking.value, ranking.windows = (
            merged.score, merged.seq, merged.pos, merged.value, merged.windows)

    def _admit_native(self, ranking: Ranked, score: Tensor, pos: Tensor, value: Tensor,
                      acts: Tensor, seq0: int) -> None:
        from workers.native import native_offer

        *_, windows = native_offer(ranking, score, pos, value, seq0, self._pool_size, acts,
                                   self.window)
        if windows.shape[0]:
            self._chunks.append(windows)
            self._pool_size += windows.shape[0]

    def _admit(self, ranking: Ranked, cand: Ranked, seq0: int,
               cut: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
        """Insert the candidates; `cut(rows, feats, pos)` gives the windows [n, width] of
        those that entered (batch rows, features, peaks)."""
        new = ranking.offer(cand)
        rows, feats = new.nonzero(as_tuple=True)
        n = rows.numel()
        if n == 0:
            return
        b = ranking.seq[rows, feats] - seq0
        self._chunks.append(cut(b, feats, ranking.pos[rows, feats].long()))
        ranking.slot[rows, feats] = torch.arange(
            self._pool_size, self._pool_size + n, device=rows.device)
        self._pool_size += n

    def _cut(self, acts: Tensor, b: Tensor, feats: Tensor, pos: Tensor) -> Tensor:
        """The float16 windows [n, width] of n entering candidates: batch rows b, features
        feats, peaks at pos."""
        start = window_start(pos, acts.shape[1], self.window)
        tok = start[:, None] + torch.arange(self.window, device=acts.device)
        return acts[b[:, None], tok, feats[:, None]].to(torch.float16)

    def _pool(self) -> Tensor:
        if not self._chunks:
            dev = self.state.top.score.device
            return torch.zeros(0, self.width, dtype=torch.float16, device=dev)
        pool = torch.cat(self._chunks)
        self._chunks = [pool]
        return pool

    def _compact(self) -> None:
        """Drop windows no ranking refers to any more, and renumber the slots."""
        pool = self._pool()
        kept = []
        offset = 0
        for ranking in self.state.rankings().values():
            live = ranking.slot >= 0
            ids = ranking.slot[live]
            kept.append(ids)
            ranking.slot[live] = torch.arange(offset, offset + ids.numel(), device=ids.device)
            offset += ids.numel()
        self._chunks = [pool[torch.cat(kept)]]
        self._pool_size = offset

    def finish(self) -> SourceState:
        """The finished state, with windows [size, F, window] in every ranking."""
        if self.sync_free:
            return self.state
        pool = self._pool()
        pool = torch.cat([pool, pool.new_zeros(1, self.width)])
        for ranking in self.state.rankings().values():
            idx = torch.where(ranking.slot >= 0, ranking.slot, pool.shape[0] - 1)
            ranking.windows = pool[idx]
            ranking.slot = torch.full_like(ranking.slot, -1)
        self._chunks = []
        self._pool_size = 0
        return self.state
