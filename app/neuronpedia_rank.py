"""What Neuronpedia's live endpoints compute from the activations of a text, on plain numpy
arrays (`ServedModel.run` gives one [T, F] float32 array per source; T counts the BOS token):

- `ranked_features` (search-all): features ranked by their max over the text, or by the sum
  of their values at chosen positions, after its inference server's activation/all.py;
- `top_by_token` (search-topk-by-token): each position's highest features, after its
  activation/topk_by_token.py;
- `active_features` (activation/source): every non-zero value, after its activation/source.py.

Ties, which Neuronpedia leaves to torch, go to the earlier source, then the lower index.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Ranked(NamedTuple):
    source: str
    index: int
    key: float
    """max_value, or the sum of the values at the sort positions"""
    max_value: float
    max_index: int
    values: list[float]


def ranked_features(acts: dict[str, np.ndarray], sources: list[str], *, zero_first: bool,
                    sort_indexes: list[int], n: int) -> list[Ranked]:
    """The n features of `sources` with the highest key, highest first. zero_first: the first
    position (a BOS token) counts as 0 everywhere, in the values returned too (ignoreBos)."""
    cands: list[tuple[float, int, int]] = []
    cols: dict[str, np.ndarray] = {}
    for order, slug in enumerate(sources):
        a = acts[slug]
        if zero_first:
            a = a.copy()
            a[0] = 0
        cols[slug] = a
        key = a[sort_indexes].sum(0) if sort_indexes else a.max(0)
        best = np.argsort(-key, kind="stable")[:n]
        cands += [(float(key[f]), order, int(f)) for f in best]
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    out = []
    for key, order, f in cands[:n]:
        col = cols[sources[order]][:, f]
        at = int(np.argmax(col))
        out.append(Ranked(sources[order], f, key, float(col[at]), at, col.tolist()))
    return out


def top_by_token(acts: np.ndarray, k: int, *, first: int) -> list[list[tuple[int, float]]]:
    """For each position from `first` on, the k features with the highest values there as
    (index, value), highest first (ties: lower index first), zeros and negatives included."""
    k = max(1, min(k, acts.shape[1]))
    kth = np.partition(acts, acts.shape[1] - k, axis=1)[:, acts.shape[1] - k]
    out = []
    for t in range(first, acts.shape[0]):
        row = acts[t]
        above = np.flatnonzero(row > kth[t])
        tied = np.flatnonzero(row == kth[t])[:k - len(above)]
        picked = np.concatenate([above, tied])
        picked = picked[np.lexsort((picked, -row[picked]))]
        out.append([(int(f), float(row[f])) for f in picked])
    return out


def active_features(acts: np.ndarray, *, first: int) -> dict[str, list[tuple[int, float]]]:
    """Every non-zero value from position `first` on: feature index (as a string) ->
    [(position, value), ...], by feature index, then position."""
    f_idx, t_idx = np.nonzero(acts[first:].T)
    out: dict[str, list[tuple[int, float]]] = {}
    values = acts[first:].T[f_idx, t_idx].tolist()
    for f, t, v in zip(f_idx.tolist(), (t_idx + first).tolist(), values, strict=True):
        out.setdefault(str(f), []).append((t, v))
    return out
