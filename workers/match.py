"""Matching two sources' features by activation correlation over the same tokens: the
correlation matrix from sums kept in one pass, each feature's best match in the other source,
a one-to-one matching, and a control (best matches against activations on other sequences),
stored as `match` relations of both sources.

The sources may belong to different models that share a tokenizer (the stored tokenizer hash):
the tokens are the stored sequences of the first source's dataset.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from sqlalchemy import Engine, delete, select, update
from torch import Tensor

from app.db.bulk import bulk_insert
from app.db.engine import transaction
from app.db.tables import (
    MATCH_BEST,
    MATCH_CONTROL,
    MATCH_ONE_TO_ONE,
    BosPolicy,
    Dataset,
    Model,
    Relation,
    RelationKind,
    Sequence,
    Source,
    SourceStatus,
)
from workers.relations import SPARSE_BELOW
from workers.store import RELATION_COLUMNS, sequence_tokens

log = logging.getLogger(__name__)

class MatchError(ValueError):
    """The two sources cannot be matched (unknown, not ready, different tokenizers)."""


@dataclass
class Side:
    """One source to match, as stored."""

    model: str
    source: str
    source_id: int
    model_spec: str
    tokenizer_hash: str
    kind: str
    layer: int
    sae_path: str | None
    dataset_id: int
    bos_first: bool


def load_side(engine: Engine, spec: str) -> Side:
    """`model/source` -> its stored Side; MatchError if unknown or not ready."""
    model, _, source = spec.partition("/")
    if not model or not source:
        raise MatchError(f"expected MODEL/SOURCE, got {spec!r}")
    with transaction(engine) as s:
        row = s.execute(
            select(Source, Model, Dataset).join(Model, Model.id == Source.model_id)
            .join(Dataset, Dataset.id == Source.dataset_id)
            .where(Model.slug == model, Source.slug == source)).first()
        if row is None:
            raise MatchError(f"no source {model}/{source}")
        src, m, ds = row
        if src.status != SourceStatus.ready:
            raise MatchError(f"{model}/{source} is {src.status}, not ready")
        if src.kind not in ("neurons", "sae"):
            raise MatchError(f"{model}/{source} is a {src.kind} source: only neurons and SAE "
                             "features are matched")
        return Side(model=m.slug, source=src.slug, source_id=src.id,
                    model_spec=m.slug if m.hub_id.startswith("pypi:") else m.hub_id,
                    tokenizer_hash=m.tokenizer_hash, kind=src.kind, layer=src.layer,
                    sae_path=(src.sae_config or {}).get("path"), dataset_id=ds.id,
                    bos_first=ds.bos_policy == BosPolicy.prepended)


def stored_tokens(engine: Engine, dataset_id: int, max_tokens: int | None) -> Tensor:
    """The dataset's stored sequences [n, seq_len] (int64), the first max_tokens' worth."""
    with transaction(engine) as s:
        q = select(Sequence.tokens).where(Sequence.dataset_id == dataset_id).order_by(Sequence.idx)
        seqs = [sequence_tokens(b) for b in s.scalars(q)]
    tokens = torch.from_numpy(np.stack(seqs).astype(np.int64))
    if max_tokens is not None:
        tokens = tokens[:max(1, max_tokens // tokens.shape[1])]
    return tokens


def _density(x: Tensor) -> float:
    return float(torch.count_nonzero(x)) / max(x.numel(), 1)


class CrossStats:
    """Sums for the correlation of every feature of A with every feature of B over tokens.

    Activations are shifted by their means over the first batch before the products, so the
    float32 products keep the covariances of features whose mean is large beside their spread."""

    def __init__(self, fa: int, fb: int, device: torch.device | str = "cpu"):
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.n = 0
        self.shift_a: Tensor | None = None
        self.shift_b: Tensor | None = None
        self.sa, self.sb, self.ssa, self.ssb = z(fa), z(fb), z(fa), z(fb)
        self.ab = z(fa, fb)

    def update(self, xa: Tensor, xb: Tensor) -> None:
        """xa: [N, Fa], xb: [N, Fb], the same N tokens."""
        xa, xb = xa.float(), xb.float()
        if self.shift_a is None:
            self.shift_a, self.shift_b = xa.mean(0), xb.mean(0)
        if max(_density(xa), _density(xb)) < SPARSE_BELOW:  # both sides sparse
            self._update_sparse(xa, xb)
            return
        ca, cb = xa - self.shift_a, xb - self.shift_b
        self.n += xa.shape[0]
        self.sa += ca.sum(0, dtype=torch.float64)
        self.sb += cb.sum(0, dtype=torch.float64)
        self.ssa += (ca * ca).sum(0, dtype=torch.float64)
        self.ssb += (cb * cb).sum(0, dtype=torch.float64)
        self.ab += (ca.T @ cb).double()

    def _update_sparse(self, xa: Tensor, xb: Tensor) -> None:
        """The same sums from the non-zeros (SAE codes): sum(a b^T) as a float64 sparse
        product (N x nnz-per-token x Fb instead of N x Fa x Fb), the shifts applied through
        the plain sums: sum((a - s)(b - t)^T) = sum(a b^T) - s sum(b)^T - sum(a) t^T + N s t^T."""
        n = xa.shape[0]
        a, b = xa.double(), xb.double()
        s, t = self.shift_a.double(), self.shift_b.double()
        sum_a, sum_b = a.sum(0), b.sum(0)
        self.n += n
        self.sa += sum_a - n * s
        self.sb += sum_b - n * t
        self.ssa += (a * a).sum(0) - 2 * s * sum_a + n * s * s
        self.ssb += (b * b).sum(0) - 2 * t * sum_b + n * t * t
        self.ab += torch.sparse.mm(a.T.to_sparse(), b)
        self.ab -= (s[:, None] * sum_b[None, :] + sum_a[:, None] * t[None, :]
                    - n * s[:, None] * t[None, :])

    def corr(self) -> Tensor:
        """[Fa, Fb] float64 Pearson correlations (NaN where a feature is constant)."""
        n = max(self.n, 1)
        ma, mb = self.sa / n, self.sb / n
        va = (self.ssa / n - ma**2).clamp_min(0)
        vb = (self.ssb / n - mb**2).clamp_min(0)
        return (self.ab / n - ma[:, None] * mb[None, :]) / (va[:, None] * vb[None, :]).sqrt()


def one_to_one(corr: Tensor) -> list[tuple[int, int]]:
    """The pairs (a, b) of a one-to-one matching that maximises the summed correlation
    (scipy's linear_sum_assignment; NaN counts as no correlation): min(Fa, Fb) pairs."""
    from scipy.optimize import linear_sum_assignment

    c = torch.nan_to_num(corr, nan=0.0).cpu().numpy()
    rows, cols = linear_sum_assignment(c, maximize=True)
    return list(zip(rows.tolist(), cols.tolist(), strict=True))


def match_rows(corr: Tensor, pairs: list[tuple[int, int]], control: Tensor
               ) -> tuple[list, list]:
    """Relation rows (feature, kind, rank, other feature, value) of A's features and of B's:
    each feature's best match (rank MATCH_BEST), its one-to-one partner (MATCH_ONE_TO_ONE) and
    its best match in the control correlations (MATCH_CONTROL)."""
    out_a, out_b = [], []
    for rank, matrix in ((MATCH_BEST, corr), (MATCH_CONTROL, control)):
        c = torch.nan_to_num(matrix, nan=float("-inf"))
        for rows, m in ((out_a, c), (out_b, c.T)):
            value, best = m.max(dim=1)
            rows += [(f, RelationKind.match, rank, j, v) for f, (j, v) in enumerate(
                zip(best.tolist(), value.tolist(), strict=True)) if v > float("-inf")]
    cv = corr.tolist()
    for a, b in pairs:
        v = cv[a][b]
        if v == v:  # not NaN
            out_a.append((a, RelationKind.match, MATCH_ONE_TO_ONE, b, v))
            out_b.append((b, RelationKind.match, MATCH_ONE_TO_ONE, a, v))
    return out_a, out_b


def source_spec(lm, side: Side):
    """The harvest's SourceSpec of a stored source, rebuilt on a loaded model."""
    from workers.harvest import neuron_sources
    from workers.sae import sae_sources

    if side.kind == "neurons":
        return neuron_sources(lm, [side.layer])[0]
    if not side.sae_path:
        raise MatchError(f"{side.model}/{side.source}: its SAE's files are not recorded")
    return sae_sources(lm, [side.sae_path], device=lm.device)[0]


def correlations(lm_a, spec_a, lm_b, spec_b, tokens: Tensor, *, first: int,
                 batch_size: int = 8) -> tuple[Tensor, Tensor]:
    """Both sources over the same token sequences [n, seq_len]: [Fa, Fb] correlations over
    every token from `first` on (one forward pass per batch where both share a model), and the
    control: the same with B's activations taken from the next sequence of the batch (the
    first's for the last), so no pair shares a token."""
    stats = CrossStats(spec_a.n_features, spec_b.n_features, lm_a.device)
    control = CrossStats(spec_a.n_features, spec_b.n_features, lm_a.device)
    per_seq = tokens.shape[1] - first
    sides = [(lm_a, spec_a, "a"), (lm_b, spec_b, "b")]
    with torch.inference_mode():
        for b0 in range(0, tokens.shape[0], batch_size):
            got: dict[str, Tensor] = {}
            runs = [sides] if lm_a is lm_b else [[s] for s in sides]
            for run in runs:
                ids = tokens[b0:b0 + batch_size].to(run[0][0].device)
                hooks = sorted({spec.hook_name for _, spec, _ in run})

                def capture(name: str, act: Tensor, run=run, got=got) -> None:
                    for _, spec, key in run:
                        if spec.hook_name == name:
                            x = act if spec.encode is None else spec.encode(act)
                            got[key] = x[:, first:, :].reshape(-1, spec.n_features)

                run[0][0].run_with_hooks(ids, hooks, capture)
            xa, xb = got["a"], got["b"].to(got["a"].device)
            stats.update(xa, xb)
            if xa.shape[0] > per_seq:  # a batch of one sequence has no other to pair with
                control.update(xa, torch.roll(xb, -per_seq, dims=0))
    return stats.corr(), control.corr()


def store_matches(engine: Engine, a: Side, b: Side, corr: Tensor,
                  pairs: list[tuple[int, int]], control: Tensor) -> None:
    """Replace the `match` relations between the two sources, in one transaction, and move
    both sources' version hashes (their pages change)."""
    rows_a, rows_b = match_rows(corr, pairs, control)
    with transaction(engine) as s:
        s.execute(delete(Relation).where(
            Relation.kind == RelationKind.match,
            ((Relation.source_id == a.source_id) & (Relation.other_source_id == b.source_id))
            | ((Relation.source_id == b.source_id) & (Relation.other_source_id == a.source_id))))
        for me, other, rows in ((a, b, rows_a), (b, a, rows_b)):
            if me is b and a.source_id == b.source_id:
                break  # a source matched with itself: one set of rows
            bulk_insert(s, Relation.__table__, RELATION_COLUMNS,
                        ((me.source_id, f, k, r, other.source_id, j, v)
                         for f, k, r, j, v in rows))
        for side, other in ((a, b), (b, a)):
            old = s.scalar(select(Source.version_hash).where(Source.id == side.source_id))
            new = hashlib.sha256(f"{old}|match|{other.source_id}|{corr.shape}|"
                                 f"{float(torch.nan_to_num(corr).sum())}".encode())
            s.execute(update(Source).where(Source.id == side.source_id)
                      .values(version_hash=new.hexdigest()[:20]))


def run_match(engine: Engine, spec_a: str, spec_b: str, *, max_tokens: int | None = None,
              batch_size: int = 8, device: str = "cpu") -> tuple[Side, Side, Tensor, list]:
    """Match two stored sources (`model/source` each) and store the result; returns the sides,
    the correlation matrix and the one-to-one pairs."""
    from workers.loading import load_model

    a, b = load_side(engine, spec_a), load_side(engine, spec_b)
    if a.tokenizer_hash != b.tokenizer_hash:
        raise MatchError(f"{a.model} and {b.model} have different tokenizers: their features "
                         "cannot be run over the same tokens")
    lm_a = load_model(a.model_spec, device=device)
    lm_b = lm_a if b.model == a.model else load_model(b.model_spec, device=device)
    tokens = stored_tokens(engine, a.dataset_id, max_tokens)
    corr, control = correlations(lm_a, source_spec(lm_a, a), lm_b, source_spec(lm_b, b),
                                 tokens, first=1 if a.bos_first else 0, batch_size=batch_size)
    pairs = one_to_one(corr)
    store_matches(engine, a, b, corr, pairs, control)
    log.info("matched %s/%s with %s/%s over %d tokens", a.model, a.source, b.model, b.source,
             tokens.numel())
    return a, b, corr, pairs
