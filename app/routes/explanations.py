"""Search by meaning over the stored explanations: the page `/search/explanations?q=&model=
&sources=` (`.json` too), and Neuronpedia's `POST /api/explanation/search` (sources of a model),
`search-model` and `search-all` in its request and response shapes.

The ranking is `app.explanation_search.search`; this module resolves what to search and shapes
the answers. The page shows errors in place, under the search box."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session

from app import urls
from app.db import queries
from app.explanation_schemas import (
    ExplanationHit,
    ExplanationOut,
    ExplanationSearchOut,
    NpExplanation,
    NpExplanationHit,
    NpExplanationScore,
    NpExplanationSearchAllIn,
    NpExplanationSearchIn,
    NpExplanationSearchModelIn,
    NpExplanationSearchOut,
    NpExplanationSearchRequest,
    NpNeuronRef,
)
from app.explanation_search import Found, search
from app.routes.deps import SessionDep, invalid, not_found
from app.routes.errors import documented, in_place
from app.routes.render import render, wants_json

router = APIRouter()

MAX_QUERY = 1000
ERRORS = documented(404, 422)


def scope(session: Session, model: str | None, sources: list[str] | None
          ) -> list[int] | None:
    """The ids of the sources to search: these sources of the model, or all its harvested ones,
    or (no model) every source (None)."""
    if model is None:
        if sources:
            raise invalid("sources: name the model they belong to")
        return None
    row = queries.model_by_slug(session, slug=model)
    if row is None:
        raise not_found(f"unknown model {model!r}")
    ready = {s.slug: s.id for s in queries.sources(session, model_id=row.id)
             if s.status == "ready"}
    if not sources:
        return list(ready.values())
    unknown = [s for s in sources if s not in ready]
    if unknown:
        raise not_found(f"{model} has no harvested source {unknown[0]!r}; it has: "
                        + ", ".join(ready))
    return [ready[s] for s in dict.fromkeys(sources)]


def run(request: Request, session: Session, *, query: str, model: str | None,
        sources: list[str] | None, offset: int) -> tuple[Found, list[int] | None]:
    """The search's page of results, and the ids of the sources it searched (None: all)."""
    query = query.strip()
    if not query:
        raise invalid("q: give the words to search for")
    if len(query) > MAX_QUERY:
        raise invalid(f"q: at most {MAX_QUERY} characters")
    source_ids = scope(session, model, sources)
    return search(session, request.app.state.search, query=query, source_ids=source_ids,
                  offset=offset), source_ids


def search_out(request: Request, session: Session, found: Found,
               source_ids: list[int] | None, *, query: str, model: str | None,
               sources: list[str] | None, offset: int) -> ExplanationSearchOut:
    searched, with_vectors = request.app.state.search.counts(session, source_ids=source_ids)
    hits = [ExplanationHit(
        model=h.row.model, source=h.row.source, index=h.row.feature_idx,
        explanation_id=h.row.id, text=h.row.text, explainer=h.row.explainer,
        explainer_model=h.row.explainer_model, max_act=h.row.max_act,
        frac_active=h.row.frac_active, text_rank=h.text_rank, meaning_rank=h.meaning_rank,
        similarity=h.similarity, score=h.score,
        url=urls.feature(h.row.model, h.row.source, h.row.feature_idx)) for h in found.hits]
    return ExplanationSearchOut(
        query=query, model=model, sources=sources, mode=found.mode, note=found.note,
        searched=searched, with_vectors=with_vectors, results=hits, offset=offset,
        next_offset=offset + len(hits) if found.more else None,
        url=urls.explanation_search(query, model, sources, offset))


class SearchPage(BaseModel):
    """The search page: its form, and the answer or the error in place of it."""

    q: str
    model: str
    sources: str
    models: list[str]
    result: ExplanationSearchOut | None
    error: str | None


@router.get("/search/explanations", include_in_schema=False)
@router.get("/search/explanations.json", response_model=ExplanationSearchOut,
            responses=ERRORS, summary="The features whose explanations match a query, by "
            "words and by meaning")
def explanation_search_page(
        request: Request, session: SessionDep,
        q: Annotated[str, Query(max_length=MAX_QUERY)] = "",
        model: Annotated[str | None, Query(max_length=128)] = None,
        sources: Annotated[str | None, Query(max_length=4000)] = None,
        offset: Annotated[int, Query(ge=0, le=10_000)] = 0):
    wanted = [s.strip() for s in sources.split(",") if s.strip()] if sources else None
    model = model or None
    as_json = wants_json(request)
    if as_json and not q.strip():
        raise invalid("give q, e.g. /search/explanations.json?q=closing+parenthesis")
    def answer() -> ExplanationSearchOut:
        found, ids = run(request, session, query=q, model=model, sources=wanted, offset=offset)
        return search_out(request, session, found, ids, query=q.strip(), model=model,
                          sources=wanted, offset=offset)

    result, error, status = in_place(answer, as_json=as_json) if q.strip() else (None, None, 200)
    if as_json:
        return Response(result.model_dump_json(), media_type="application/json",
                        headers={"Cache-Control": "no-store"})
    ctx = SearchPage(q=q, model=model or "", sources=sources or "",
                     models=[m.slug for m in queries.models(session)], result=result,
                     error=error)
    response = render(request, ctx, template="explanation_search.html", status_code=status)
    response.headers["Cache-Control"] = "no-store"
    return response


# ------------------------------------------------------------------ Neuronpedia's shapes


def np_explanation(model: str, source: str, index: int, e: ExplanationOut) -> NpExplanation:
    """An explanation shaped like Neuronpedia's: the explainer is its type, the explainer model
    its model; each score's control and judgement go into its jsonDetails."""
    scores = [NpExplanationScore(
        id=f"{e.id}:{k}", value=s.value, explanationId=str(e.id),
        explanationScoreTypeName=s.scorer, explanationScoreModelName=s.scorer_model,
        initiatedByUserId=e.author or "featurescope", createdAt=s.created_at,
        jsonDetails=json.dumps({"control": s.control, "verdict": s.verdict,
                                "details": s.details}, ensure_ascii=False))
        for k, s in enumerate(e.scores)]
    return NpExplanation(
        id=str(e.id), modelId=model, layer=source, source=source, index=str(index),
        description=e.text, authorId=e.author or "featurescope", typeName=e.explainer,
        explanationModelName=e.explainer_model or None,
        scoreV1=max((s.value for s in e.scores), default=0.0), scores=scores,
        createdAt=e.created_at, updatedAt=e.created_at)


def _np_answer(request: Request, session: Session, body: BaseModel, model: str | None,
               layers: list[str] | None) -> Response:
    found, _ = run(request, session, query=body.query, model=model, sources=layers,
                   offset=body.offset)
    results = [NpExplanationHit(
        id=str(h.row.id), modelId=h.row.model, layer=h.row.source, source=h.row.source,
        index=str(h.row.feature_idx), description=h.row.text,
        authorId=h.row.author or "featurescope", typeName=h.row.explainer,
        explanationModelName=h.row.explainer_model or None, createdAt=h.row.created_at,
        updatedAt=h.row.created_at, cosine_similarity=h.similarity,
        neuron=NpNeuronRef(modelId=h.row.model, layer=h.row.source,
                           index=str(h.row.feature_idx), maxActApprox=h.row.max_act,
                           frac_nonzero=h.row.frac_active))
        for h in found.hits]
    out = NpExplanationSearchOut(
        request=NpExplanationSearchRequest(modelId=model, layers=layers, query=body.query,
                                offset=body.offset),
        results=results, resultsCount=len(results), hasMore=found.more,
        nextOffset=body.offset + len(results))
    return Response(out.model_dump_json(), media_type="application/json",
                    headers={"Cache-Control": "no-store"})


@router.post("/api/explanation/search", response_model=NpExplanationSearchOut, responses=ERRORS,
             summary="Neuronpedia's explanation search over some sources of a model")
def np_search(request: Request, session: SessionDep, body: NpExplanationSearchIn):
    return _np_answer(request, session, body, body.modelId, body.layers)


@router.post("/api/explanation/search-model", response_model=NpExplanationSearchOut, responses=ERRORS,
             summary="Neuronpedia's explanation search over every source of a model")
def np_search_model(request: Request, session: SessionDep, body: NpExplanationSearchModelIn):
    return _np_answer(request, session, body, body.modelId, None)


@router.post("/api/explanation/search-all", response_model=NpExplanationSearchOut, responses=ERRORS,
             summary="Neuronpedia's explanation search over every model")
def np_search_all(request: Request, session: SessionDep, body: NpExplanationSearchAllIn):
    return _np_answer(request, session, body, None, None)

