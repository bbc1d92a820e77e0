"""`/compare/{modelA}/{sourceA}/{modelB}/{sourceB}`: two sources matched by `featurescope
match`: the distribution of best-match correlations, the one-to-one pairs and the features with
no counterpart."""

from __future__ import annotations

import statistics

from fastapi import APIRouter, Query, Request
from sqlalchemy import Row
from sqlalchemy.orm import Session

from app import urls
from app.db import relations as db
from app.db.tables import MATCH_BEST, MATCH_CONTROL, MATCH_ONE_TO_ONE
from app.relation_schemas import ComparePage, CorrelationBin, MatchedPair
from app.routes.deps import ModelSlug, SessionDep, SourceSlug, load_source, not_found
from app.routes.render import etag, not_modified, page, render

router = APIRouter()

N_BINS = 20
THRESHOLD = 0.5


def _bins(values: list[float]) -> list[CorrelationBin]:
    counts = [0] * N_BINS
    for v in values:
        counts[min(N_BINS - 1, max(0, int((v + 1) / 2 * N_BINS)))] += 1
    return [CorrelationBin(lo=-1 + 2 * i / N_BINS, hi=-1 + 2 * (i + 1) / N_BINS, count=c)
            for i, c in enumerate(counts)]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _unmatched(n: int, partners: dict[int, float], threshold: float) -> list[int]:
    return [f for f in range(n) if partners.get(f, float("-inf")) < threshold]


def build_compare(session: Session, a: Row, b: Row, threshold: float) -> ComparePage:
    rows_a = db.matches(session, source_id=a.id, other_source_id=b.id)
    if not rows_a:
        raise not_found(f"{a.model_slug}/{a.slug} and {b.model_slug}/{b.slug} are not matched: "
                        f"run featurescope match {a.model_slug}/{a.slug} {b.model_slug}/{b.slug}")
    rows_b = rows_a if a.id == b.id else db.matches(session, source_id=b.id,
                                                    other_source_id=a.id)
    best = [r.value for r in rows_a if r.rank == MATCH_BEST]
    control = [r.value for r in rows_a if r.rank == MATCH_CONTROL]
    pairs = sorted(((r.feature_idx, r.other_idx, r.value) for r in rows_a
                    if r.rank == MATCH_ONE_TO_ONE), key=lambda p: (-p[2], p[0]))
    in_b = {r.feature_idx: r.value for r in rows_b if r.rank == MATCH_ONE_TO_ONE}
    url = urls.compare(a.model_slug, a.slug, b.model_slug, b.slug)
    return ComparePage(
        model_a=a.model_slug, source_a=a.slug, model_b=b.model_slug, source_b=b.slug,
        n_features_a=a.n_features, n_features_b=b.n_features, threshold=threshold,
        best_match=_bins(best), control=_bins(control), median_best=_median(best),
        median_control=_median(control),
        pairs=[MatchedPair(a=x, b=y, value=v, url_a=urls.feature(a.model_slug, a.slug, x),
                           url_b=urls.feature(b.model_slug, b.slug, y)) for x, y, v in pairs],
        unmatched_a=_unmatched(a.n_features, {x: v for x, _, v in pairs}, threshold),
        unmatched_b=_unmatched(b.n_features, in_b, threshold),
        page=url, json_url=urls.json(url), source_a_url=urls.source(a.model_slug, a.slug),
        source_b_url=urls.source(b.model_slug, b.slug))


@page(router, "/compare/{model_a}/{source_a}/{model_b}/{source_b}", name="compare",
      schema=ComparePage, summary="Two sources matched by activation correlation")
def compare(request: Request, session: SessionDep, model_a: ModelSlug, source_a: SourceSlug,
            model_b: ModelSlug, source_b: SourceSlug,
            threshold: float = Query(THRESHOLD, ge=-1, le=1)):
    a, b = load_source(session, model_a, source_a), load_source(session, model_b, source_b)
    tag = etag(request, f"{a.version_hash}.{b.version_hash}.{threshold}"
               if a.version_hash and b.version_hash else None)
    if (cached := not_modified(request, tag)) is not None:
        return cached
    return render(request, build_compare(session, a, b, threshold), template="compare.html",
                  tag=tag)
