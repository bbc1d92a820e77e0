"""Read queries of related features (table `relations`).

Like `app.db.queries`: the session first, keyword-only arguments, plain rows, a cap on rows.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from sqlalchemy import Row, bindparam, select
from sqlalchemy.orm import Session, aliased

from app.db.tables import Model, Relation, RelationKind, Source

MAX_RELATED = 500
"""The most relations read for one feature."""
MAX_MATCHED = 1 << 20
"""The most features of a source read for one comparison."""

_other = aliased(Source)
_OF_FEATURE = (
    select(Relation.kind, Relation.rank, Relation.other_source_id, Relation.other_idx,
           Relation.value, _other.slug.label("other_source"), Model.slug.label("other_model"))
    .join(_other, _other.id == Relation.other_source_id)
    .join(Model, Model.id == _other.model_id)
    .where(Relation.source_id == bindparam("source_id"),
           Relation.feature_idx == bindparam("index"))
    .order_by(Relation.kind, Relation.other_source_id, Relation.rank)
    .limit(MAX_RELATED))


def of_feature(session: Session, *, source_id: int, index: int) -> Seq[Row]:
    """A feature's relations, by kind, other source and rank."""
    return session.connection().execute(
        _OF_FEATURE, {"source_id": source_id, "index": index}).all()


def matches(session: Session, *, source_id: int, other_source_id: int) -> Seq[Row]:
    """A source's `match` relations to another: (feature_idx, rank, other_idx, value), by
    feature and rank (at most three per feature)."""
    q = (select(Relation.feature_idx, Relation.rank, Relation.other_idx, Relation.value)
         .where(Relation.source_id == source_id, Relation.other_source_id == other_source_id,
                Relation.kind == RelationKind.match)
         .order_by(Relation.feature_idx, Relation.rank)
         .limit(3 * MAX_MATCHED))
    return session.execute(q).all()
