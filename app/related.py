"""A feature's related features, as the feature page shows them: each list in rank order, each
entry with its value, its best explanation and its link."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy.orm import Session

from app import explanations, urls
from app.db import relations as db
from app.db.tables import MATCH_BEST, MATCH_CONTROL, RelationKind
from app.relation_schemas import FeatureRelated, RelatedOut


def related_of(session: Session, cache: explanations.ExplanationCache, *, source_id: int,
               index: int, version: int) -> FeatureRelated:
    rows = db.of_feature(session, source_id=source_id, index=index)
    if not rows:
        return FeatureRelated.empty()
    wanted: dict[int, set[int]] = defaultdict(set)
    for r in rows:
        wanted[r.other_source_id].add(r.other_idx)
    texts = {}
    for sid, indices in wanted.items():
        found = explanations.of_features(session, cache, source_id=sid, indices=sorted(indices),
                                         version=version)
        texts.update({(sid, i): fe.explanations[0].text
                      for i, fe in found.items() if fe.explanations})
    lists: dict[str, list] = defaultdict(list)
    controls = {r.other_source_id: r.value for r in rows
                if r.kind == RelationKind.match and r.rank == MATCH_CONTROL}
    for r in sorted(rows, key=lambda r: (r.kind, r.other_source_id != source_id, r.rank,
                                         r.other_source_id)):
        name = r.kind
        if r.kind == RelationKind.match and r.rank != MATCH_BEST:
            continue  # the one-to-one partners are on the comparison page
        if r.kind == RelationKind.cosine and r.other_source_id != source_id:
            name = "cosine_across"
        lists[name].append(RelatedOut(
            model=r.other_model, source=r.other_source, index=r.other_idx, value=r.value,
            explanation=texts.get((r.other_source_id, r.other_idx)),
            url=urls.feature(r.other_model, r.other_source, r.other_idx),
            control=controls.get(r.other_source_id) if r.kind == RelationKind.match else None))
    return FeatureRelated(**{name: lists.get(name, []) for name in FeatureRelated.model_fields})
