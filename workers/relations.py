"""Relations between features: co-firing statistics kept in the harvest's single pass, and the
lists finalize makes of them (Jaccard, Pearson) and of output directions (cosine).

Co-firing statistics are sufficient and merge by addition: over the tokens a harvest counts
(the BOS left out), `co` = A^T A of the active indicators (act > 0) and `xx` = X^T X of the
activations, with the per-feature sums. Both are dense [F, F] on the host: at 16,384 features
`co` (int32, exact to 2**31 tokens) is 1 GiB and `xx` (float64) 2 GiB, 3 GiB per source state;
a harvest holds at most three states of a source at once (the merged one, a shard's, their
sum), 9 GiB. Per batch they grow by dense products (neurons: nearly every activation is
nonzero) or by sparse ones over the nonzero activations (SAE features), whichever the batch's
density makes cheaper: counts in float32 (exact below 2**24 tokens a batch), cross-products in
float64 (in float32 the small covariances of dense neurons drown in rounding).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from app.db.tables import RelationKind

N_RELATED = 10
"""Entries of each list of related features."""
MAX_COFIRING_FEATURES = 16384
"""The widest source whose co-firing statistics are kept (two [F, F] matrices: 3.2 GB here)."""
ROW_CHUNK = 1024
"""Features whose lists are computed together (bounds the [chunk, F] working matrices)."""
SPARSE_BELOW = 0.05
"""A batch with fewer nonzero activations than this fraction takes the sparse products (here
and in workers/match.py)."""


@dataclass
class CoFiring:
    """Sufficient statistics for the Jaccard and Pearson lists of one source."""

    n_tokens: int
    sum: Tensor  # [F] float64
    co: Tensor  # [F, F] int32: tokens where both are active; the diagonal counts each alone
    xx: Tensor  # [F, F] float64: sum over tokens of x_i * x_j

    @classmethod
    def empty(cls, n_features: int, device: torch.device | str = "cpu") -> CoFiring:
        f = n_features
        return cls(0, torch.zeros(f, dtype=torch.float64, device=device),
                   torch.zeros(f, f, dtype=torch.int32, device=device),
                   torch.zeros(f, f, dtype=torch.float64, device=device))

    def update(self, acts: Tensor, first: int) -> None:
        """acts: [batch, seq, F]; positions before `first` are left out."""
        f = acts.shape[-1]
        x = acts[:, first:, :].reshape(-1, f).float()
        self.n_tokens += x.shape[0]
        self.sum += x.sum(0, dtype=torch.float64)
        rows, cols = x.nonzero(as_tuple=True)
        if rows.numel() < SPARSE_BELOW * x.numel():
            vals = x[rows, cols]
            self._add_pairs(self.xx, rows, cols, vals.double(), x.shape[0])
            on = vals > 0
            self._add_pairs(self.co, rows[on], cols[on], torch.ones_like(vals[on]), x.shape[0])
        else:
            a = (x > 0).float()
            self.co += (a.T @ a).to(torch.int32)
            xd = x.double()  # float32 products lose the small covariances of dense units
            self.xx += xd.T @ xd

    @staticmethod
    def _add_pairs(into: Tensor, rows: Tensor, cols: Tensor, vals: Tensor, n: int) -> None:
        """into += S^T S for the sparse [n, F] matrix S with entries (rows, cols, vals)."""
        f = into.shape[0]
        if rows.numel() == 0:
            return
        s = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, f),
                                    check_invariants=False).coalesce()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            p = torch.sparse.mm(s.t().coalesce(), s).coalesce()
        i, j = p.indices()
        into.view(-1).index_add_(0, i * f + j, p.values().to(into.dtype))

    def merge(self, other: CoFiring) -> CoFiring:
        return CoFiring(self.n_tokens + other.n_tokens, self.sum + other.sum,
                        self.co + other.co, self.xx + other.xx)

    def to(self, device: torch.device | str) -> CoFiring:
        return CoFiring(self.n_tokens, self.sum.to(device), self.co.to(device),
                        self.xx.to(device))

    def jaccard(self, lo: int, hi: int) -> Tensor:
        """[hi - lo, F] float64: |active on both| / |active on either| (NaN where neither)."""
        co = self.co[lo:hi].double()
        n = self.co.diagonal().double()
        return co / (n[lo:hi, None] + n[None, :] - co)

    def pearson(self, lo: int, hi: int) -> Tensor:
        """[hi - lo, F] float64: correlation of the activations over all tokens (NaN where a
        feature is constant)."""
        n = max(self.n_tokens, 1)
        mean = self.sum / n
        var = (self.xx.diagonal() / n - mean**2).clamp_min(0)
        cov = self.xx[lo:hi] / n - mean[lo:hi, None] * mean[None, :]
        return cov / (var[lo:hi, None] * var[None, :]).sqrt()


def keep_best(v: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per row of v [n, m] (finite or -inf; ids [n, m] ascending along each row, m >= k), the
    k best entries by (value desc, id asc), in id order: values and ids, [n, k] each.

    A top-k, not a sort: the entries above the row's k-th best value, and of those equal to it
    the first, as many as fit."""
    n = v.shape[0]
    kth = v.topk(k, dim=1).values[:, -1:]
    above = v > kth
    tie = v == kth
    room = k - above.sum(1)
    take = above | tie
    crowded = (tie.sum(1) > room).nonzero().squeeze(1)  # more ties than room: the first ones
    if crowded.numel():
        t = tie[crowded]
        take[crowded] = above[crowded] | (t & (t.cumsum(1) <= room[crowded, None]))
    idx = take.nonzero()[:, 1].view(n, k)  # row-major: positions ascending within a row
    return v.gather(1, idx), ids.gather(1, idx)


def _lists(vals: Tensor, ids: Tensor) -> list[list[tuple[int, float]]]:
    """Rows of kept (values, ids) in id order as lists by (value desc, id asc), -inf left out."""
    order = torch.argsort(vals, dim=1, descending=True, stable=True)
    return [[(c, x) for c, x in zip(cs, xs, strict=True) if x != float("-inf")]
            for cs, xs in zip(ids.gather(1, order).tolist(), vals.gather(1, order).tolist(),
                              strict=True)]


def best(values: Tensor, k: int = N_RELATED, *, exclude_from: int | None = None
         ) -> list[list[tuple[int, float]]]:
    """Per row of values [n, F], the k best finite columns as (column, value) by (value desc,
    column asc); with exclude_from, row r leaves out column exclude_from + r (itself)."""
    v = values.clone()
    n, width = v.shape
    if exclude_from is not None:
        r = torch.arange(n, device=v.device)
        v[r, r + exclude_from] = float("nan")
    k = min(k, width)
    if n == 0 or k == 0:
        return [[] for _ in range(n)]
    return _lists(*_block_best(torch.where(torch.isfinite(v), v, float("-inf")), 0, k))


def _block_best(x: Tensor, c0: int, k: int) -> tuple[Tensor, Tensor]:
    """keep_best of a block x [n, m] whose columns are ids c0, c0 + 1, ...: a top-k of the
    block, redone exactly for the rows where ties at the k-th value may have been cut
    arbitrarily; values and ids [n, min(k, m)] in id order."""
    kk = min(k, x.shape[1])
    vals, idx = x.topk(kk, dim=1)
    crowded = ((x >= vals[:, -1:]).sum(1) > kk).nonzero().squeeze(1)
    if crowded.numel():
        cols = torch.arange(x.shape[1], device=x.device).expand(crowded.numel(), -1)
        vals[crowded], idx[crowded] = keep_best(x[crowded], cols, kk)
    order = idx.argsort(1)
    return vals.gather(1, order), idx.gather(1, order) + c0


def self_cosine_best(u: Tensor, k: int = N_RELATED, block: int = 2048
                     ) -> list[list[tuple[int, float]]]:
    """best(u @ u.T, exclude_from=0) for unit rows u [F, d] (a NaN row: a zero direction, in no
    list), from the blocks on and above the diagonal only, each also serving the rows of its
    columns transposed: half the products. Every row block sees its column blocks in
    increasing order, so the ids kept stay ascending."""
    f = u.shape[0]
    ok = torch.isfinite(u).all(1).nonzero().squeeze(1)
    out: list[list[tuple[int, float]]] = [[] for _ in range(f)]
    u = u[ok]
    n = u.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return out
    vals = torch.full((n, k), float("-inf"), device=u.device)
    ids = torch.arange(-k, 0, device=u.device).expand(n, -1).clone()  # before every column
    starts = list(range(0, n, block))
    for i, lo in enumerate(starts):
        hi = min(lo + block, n)
        for lo2 in starts[i:]:
            hi2 = min(lo2 + block, n)
            sims = u[lo:hi] @ u[lo2:hi2].T
            parts = [(lo, hi, lo2, sims)]
            if lo2 == lo:
                sims.fill_diagonal_(float("-inf"))
            else:
                parts.append((lo2, hi2, lo, sims.T))
            for r0, r1, c0, x in parts:
                bv, bi = _block_best(x, c0, k)
                vals[r0:r1], ids[r0:r1] = keep_best(torch.cat([vals[r0:r1], bv], 1),
                                                    torch.cat([ids[r0:r1], bi], 1), k)
    ids = torch.where(ids >= 0, ok[ids.clamp(min=0)], ids)  # back to the source's indices
    for row, lst in zip(ok.tolist(), _lists(vals, ids), strict=True):
        out[row] = lst
    return out


RelationRow = tuple[int, str, int, str, int, float]
"""(feature index, kind, rank, other source's slug, other feature index, value)."""


def _rows(kind: str, other: str, lo: int, lists: list[list[tuple[int, float]]]
          ) -> list[RelationRow]:
    return [(lo + r, kind, rank, other, j, v)
            for r, lst in enumerate(lists) for rank, (j, v) in enumerate(lst)]


def cofiring_rows(slug: str, cofire: CoFiring) -> list[RelationRow]:
    """The Jaccard and Pearson lists of every feature of a source (zero Jaccard left out: a
    feature that never fires with another is not related to it)."""
    f = cofire.co.shape[0]
    out: list[RelationRow] = []
    for lo in range(0, f, ROW_CHUNK):
        hi = min(lo + ROW_CHUNK, f)
        jac = cofire.jaccard(lo, hi)
        out += _rows(RelationKind.jaccard, slug, lo,
                     best(torch.where(jac > 0, jac, float("nan")), exclude_from=lo))
        out += _rows(RelationKind.pearson, slug, lo, best(cofire.pearson(lo, hi),
                                                          exclude_from=lo))
    return out


def _unit(d: Tensor) -> Tensor:
    d = d.float()
    return d / d.norm(dim=1, keepdim=True)  # a zero direction becomes NaN, never listed


def direction_rows(directions: dict[str, Tensor]) -> dict[str, list[RelationRow]]:
    """The cosine lists of every feature of every source ({slug: [F, d_model]}): its most
    similar directions within its own source, and across the other sources of the same width
    (number of features) as one list, each of N_RELATED."""
    units = {slug: _unit(d) for slug, d in directions.items()}
    out: dict[str, list[RelationRow]] = {}
    for slug, u in units.items():
        peers = [s for s, v in units.items() if s != slug and v.shape == u.shape]
        rows: list[RelationRow] = []
        rows += _rows(RelationKind.cosine, slug, 0, self_cosine_best(u))
        for lo in range(0, u.shape[0], ROW_CHUNK) if peers else ():
            chunk = u[lo:lo + ROW_CHUNK]
            sims = torch.cat([chunk @ units[p].T for p in peers], dim=1)
            width = u.shape[0]
            for r, lst in enumerate(best(sims)):
                rows += [(lo + r, RelationKind.cosine, rank, peers[c // width], c % width, v)
                         for rank, (c, v) in enumerate(lst)]
        out[slug] = rows
    return out
