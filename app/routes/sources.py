"""`/{model}/{source}`: a source's settings and its features in a table, sortable by index,
max activation or density, paginated by keyset with an opaque `next` token, each with its best
explanation; `?q=` keeps the features with an explanation that matches (full text)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from sqlalchemy import Row

from app import explanations, urls
from app.db import explanations as explanation_db
from app.db import queries
from app.routes.deps import MAX_INDEX, ModelSlug, SessionDep, SourceSlug, load_source, not_found
from app.routes.models import source_out
from app.routes.render import etag, not_modified, page, render, wants_json
from app.schemas import DatasetOut, FeatureRow, SaeMetrics, SourceDetail, SourcePage, TokenCount

router = APIRouter()

Sort = Literal["index", "max_act", "frac_active"]
Order = Literal["asc", "desc"]


def encode_next(sort: str, desc: bool, row: Row) -> str:
    value = row.idx if sort == "index" else getattr(row, sort)
    raw = json.dumps([sort, int(desc), value, row.idx], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_next(token: str, sort: str, desc: bool) -> tuple[float, int]:
    """(value, index) of the last row of the previous page; 422 for a malformed token."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        t_sort, t_desc, value, idx = json.loads(raw)
        ok = isinstance(value, int | float) and isinstance(idx, int) and t_desc in (0, 1)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        ok = False
    if not ok:
        raise HTTPException(422, "next: malformed page token")
    if t_sort != sort or bool(t_desc) != desc:
        raise HTTPException(422, "next: the page token belongs to another sort order")
    return float(value), idx


def _metrics(sae_config: dict | None) -> SaeMetrics | None:
    metrics = (sae_config or {}).get("metrics")
    if not isinstance(metrics, dict):
        return None
    try:
        return SaeMetrics(**metrics)
    except ValidationError:
        return None


def source_detail(session, src: Row) -> SourceDetail:
    ds = queries.dataset(session, dataset_id=src.dataset_id)
    return SourceDetail(
        **source_out(src.model_slug, src).model_dump(), sae_config=src.sae_config,
        metrics=_metrics(src.sae_config), harvest_config=src.harvest_config or {},
        version_hash=src.version_hash, created_at=src.created_at, finished_at=src.finished_at,
        dataset_info=DatasetOut(slug=ds.slug, name=ds.name, source=ds.source, slice=ds.slice,
                                n_sequences=ds.n_sequences, seq_len=ds.seq_len,
                                bos_policy=ds.bos_policy))


@page(router, "/{model}/{source}", name="source", schema=SourcePage,
      summary="A source and one page of its features",
      responses={303: {"description": "`jump`: to that feature (its JSON from the JSON)"}})
def source(request: Request, session: SessionDep, model: ModelSlug, source: SourceSlug,
           sort: Sort = "index", order: Order | None = None,
           limit: Annotated[int, Query(ge=1, le=queries.MAX_ROWS)] = queries.PAGE_SIZE,
           next: Annotated[str | None, Query(max_length=400)] = None,
           jump: Annotated[int | None, Query(ge=0, le=MAX_INDEX,
                                             description="go to this feature")] = None,
           q: Annotated[str | None, Query(max_length=400, description="only features with an "
                                          "explanation that matches these words")] = None):
    src = load_source(session, model, source)
    if jump is not None:
        if src.status == "ready" and jump >= src.n_features:
            raise not_found(f"{model}/{source} has no feature {jump}: it has features 0 to "
                            f"{src.n_features - 1}")
        target = urls.feature(model, source, jump)
        return RedirectResponse(urls.json(target) if wants_json(request) else target,
                                status_code=303, headers={"Cache-Control": "no-store"})
    version = explanation_db.version(session)
    tag = etag(request, explanations.page_version(
        src.version_hash if src.status == "ready" else None, version))
    if (cached := not_modified(request, tag)) is not None:
        return cached
    order = order or queries.default_order(sort)
    desc = order == "desc"
    after = decode_next(next, sort, desc) if next else None
    q = (q or "").strip() or None
    within = explanation_db.matching_features(
        dialect=session.get_bind().dialect.name, query=q, source_id=src.id) if q else None
    if q and within is None:  # a filter of stop words or exclusions only: nothing matches
        rows = []
    else:
        rows = queries.features_page(session, source_id=src.id, sort=sort, desc=desc,
                                     after=after, limit=limit + 1, within=within)
    more, rows = len(rows) > limit, rows[:limit]
    vocab = request.app.state.vocabs.get(session, model_id=src.model_id,
                                         tokenizer_hash=src.tokenizer_hash)
    best = explanations.of_features(session, request.app.state.explanations, source_id=src.id,
                                    indices=[r.idx for r in rows], version=version)
    token = encode_next(sort, desc, rows[-1]) if more else None
    keep = {"sort": sort, "order": order, "limit": limit, "q": q}
    ctx = SourcePage(
        url=urls.source(model, source, **keep, next=next), model=model,
        source=source_detail(session, src), sort=sort, order=order, limit=limit, q=q,
        features=[FeatureRow(index=r.idx, max_act=r.max_act, frac_active=r.frac_active,
                             top_tokens=[TokenCount(id=t, text=vocab.text(t), count=c)
                                         for t, c in r.top_tokens],
                             explanation=best[r.idx].explanations[0].text if r.idx in best
                             else None,
                             url=urls.feature(model, source, r.idx)) for r in rows],
        next=token, next_url=urls.source(model, source, **keep, next=token) if token else None)
    return render(request, ctx, template="source.html", partial="_features.html", tag=tag)
