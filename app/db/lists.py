"""Lists of features: reads and writes (keyword-only, capped). A list names its features by
model, source and index; what the database knows of each is read beside (`feature_rows`)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence as Seq

from sqlalchemy import Row, delete, func, select
from sqlalchemy.orm import Session

from app.db.tables import Feature, FeatureList, ListFeature, utcnow

MAX_FEATURES = 1000
"""The most features one list holds."""
MAX_LISTS = 200
"""The most lists one listing shows (the newest)."""


class ListFull(ValueError):
    """A list already holds MAX_FEATURES features."""


def new_id() -> str:
    """A list's public id: 12 URL-safe characters (72 random bits), unguessable, so a list
    is shared by its link."""
    return secrets.token_urlsafe(9)


def create_list(session: Session, *, name: str, description: str, key_id: int | None
                ) -> FeatureList:
    row = FeatureList(id=new_id(), name=name, description=description, key_id=key_id)
    session.add(row)
    session.commit()
    return row


def get_list(session: Session, *, list_id: str) -> FeatureList | None:
    return session.get(FeatureList, list_id)


def items(session: Session, *, list_id: str) -> list[ListFeature]:
    """A list's features in the order they were added."""
    q = (select(ListFeature).where(ListFeature.list_id == list_id)
         .order_by(ListFeature.position, ListFeature.added_at).limit(MAX_FEATURES))
    return list(session.scalars(q))


def add_feature(session: Session, *, lst: FeatureList, model: str, source: str, index: int,
                note: str) -> ListFeature:
    """Put a feature on a list with its note; a feature already there gets the new note."""
    row = session.get(ListFeature, (lst.id, model, source, index))
    if row is None:
        count, last = session.execute(
            select(func.count(), func.max(ListFeature.position))
            .where(ListFeature.list_id == lst.id)).one()
        if count >= MAX_FEATURES:
            raise ListFull(f"the list {lst.name!r} holds {MAX_FEATURES} features, its most")
        row = ListFeature(list_id=lst.id, model=model, source=source, feature_idx=index,
                          position=0 if last is None else last + 1, note=note)
        session.add(row)
    else:
        row.note = note
    lst.updated_at = utcnow()
    session.commit()
    return row


def remove_feature(session: Session, *, lst: FeatureList, model: str, source: str, index: int
                   ) -> bool:
    """Take a feature off a list; False when it was not on it."""
    gone = session.execute(delete(ListFeature).where(
        ListFeature.list_id == lst.id, ListFeature.model == model, ListFeature.source == source,
        ListFeature.feature_idx == index)).rowcount
    if gone:
        lst.updated_at = utcnow()
    session.commit()
    return bool(gone)


def delete_list(session: Session, *, lst: FeatureList) -> None:
    session.execute(delete(ListFeature).where(ListFeature.list_id == lst.id))
    session.delete(lst)
    session.commit()


def recent(session: Session, *, key_id: int | None = None, owned: bool = False
           ) -> Seq[Row]:
    """The newest lists (at most MAX_LISTS) with how many features each holds: (list, n).
    With `owned`, only those made by key `key_id` (None: those made without a key)."""
    n = (select(func.count()).where(ListFeature.list_id == FeatureList.id)
         .correlate(FeatureList).scalar_subquery())
    q = select(FeatureList, n.label("n"))
    if owned:
        q = q.where(FeatureList.key_id.is_(None) if key_id is None
                    else FeatureList.key_id == key_id)
    q = q.order_by(FeatureList.created_at.desc(), FeatureList.id).limit(MAX_LISTS)
    return session.execute(q).all()


def feature_rows(session: Session, *, source_id: int, indices: Seq[int]) -> dict[int, Row]:
    """What a list shows of each feature: index -> (idx, max_act, frac_active, top_tokens)."""
    if not indices:
        return {}
    q = (select(Feature.idx, Feature.max_act, Feature.frac_active, Feature.top_tokens)
         .where(Feature.source_id == source_id, Feature.idx.in_(list(indices))))
    return {r.idx: r for r in session.execute(q)}
