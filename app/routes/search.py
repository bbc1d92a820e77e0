"""Search by text: `POST /api/v1/search` and the page `/search?model=&text=` (`.json` too) give
the features that fire most on a text, and each token's top features. They run the model, so
they need the `live` scope: the page's GET shows the query with a Run button that POSTs it, and
`/search.json` runs only for a request that carries a key.

The ranking runs with the loaded models (`ServedModel.search` in `workers.inference`), through
the model queue; this module adds what the database knows (each hit's max over its dataset) and
the page. The page shows errors in place, under the search box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import ConfigDict, Field
from sqlalchemy import Row
from sqlalchemy.orm import Session

from app import urls
from app.db import queries
from app.inference_errors import InferenceError
from app.keys import Scope
from app.model_queue import MAX_TEXT_CHARS
from app.routes.access import requires
from app.routes.deps import SLUG_PATTERN, checked, model_queue, not_found, read_db
from app.routes.errors import described, documented
from app.routes.forms import read_form
from app.routes.render import is_htmx
from app.routes.trial import text_example
from app.schema_types import In
from app.schemas import ExampleOut, SearchHit, SearchIn, SearchOut, TokenHit

router = APIRouter()

ERRORS = documented(404, 413, 422, 503)


def _search_sources(session: Session, request: Request, model: str,
                    wanted: list[str] | None) -> tuple[Row, list[str]]:
    """The model's row and the sources to search: the ones asked for (all harvested), else
    every harvested source that is served live."""
    row = queries.model_by_slug(session, slug=model)
    if row is None:
        raise not_found(f"unknown model {model!r}")
    ready = [s.slug for s in queries.sources(session, model_id=row.id) if s.status == "ready"]
    if wanted:
        unknown = [s for s in wanted if s not in ready]
        if unknown:
            raise not_found(f"{model} has no harvested source {unknown[0]!r}; it has: "
                            + ", ".join(ready))
        return row, list(dict.fromkeys(wanted))
    queue = request.app.state.live
    if queue is not None and model in queue.models.models:
        served = queue.models.models[model].sources
        ready = [s for s in ready if s in served]
    return row, ready


async def run_search(request: Request, query: SearchIn) -> SearchOut:
    """The search, reading the database before and after the model runs (not while)."""
    queue = model_queue(request)
    row, sources = await read_db(request, _search_sources, request, query.model, query.sources)
    if not sources:
        raise not_found(f"{query.model} has no source to search")
    ids = (await queue.tokenize(query.model, [query.text]))[0]
    ranking = await queue.call(lambda models: models.model(query.model).search(
        ids, sources, top=query.top, per_token=query.per_token))

    def finish(session: Session) -> SearchOut:
        vocab = request.app.state.vocabs.get(session, model_id=row.id,
                                             tokenizer_hash=row.tokenizer_hash)
        by_source: dict[str, list[int]] = {}
        for hit in ranking.features:
            by_source.setdefault(hit.source, []).append(hit.index)
        maxes = {}
        for s, fs in by_source.items():
            src = queries.source_by_slug(session, model=query.model, source=s)
            maxes[s] = queries.max_acts(session, source_id=src.id, indices=fs)
        out = []
        for hit in ranking.features:
            mx = maxes[hit.source].get(hit.index)
            out.append(SearchHit(source=hit.source, index=hit.index, max_value=hit.max_value,
                                 max_index=hit.max_index, max_act=mx,
                                 relative=hit.max_value / mx if mx and mx > 0 else None,
                                 values=hit.values,
                                 url=urls.feature(query.model, hit.source, hit.index)))
        return SearchOut(
            model=query.model, sources=sources, text=query.text,
            bos_first=queue.models.model(query.model).bos_first,
            tokens=list(vocab.many(ids)), token_ids=ids, features=out,
            per_token=[[TokenHit(source=t.source, index=t.index, value=t.value) for t in tops]
                       for tops in ranking.per_token],
            url=urls.search(query.model, query.text, query.sources))

    return await read_db(request, finish)


def _json(out: SearchOut) -> Response:
    return Response(out.model_dump_json(), media_type="application/json",
                    headers={"Cache-Control": "no-store"})


@router.post("/api/v1/search", response_model=SearchOut, responses=ERRORS,
             summary="The features that fire most on a text, and each token's top features",
             dependencies=[requires(Scope.live)])
async def search_api(request: Request, body: SearchIn):
    return _json(await run_search(request, body))


@dataclass
class Scale:
    """What the highlighting reads of a feature's statistics (its range over the dataset)."""

    max_act: float
    min_act: float = 0.0


def _hit_rows(result: SearchOut) -> list[tuple[SearchHit, ExampleOut, Scale]]:
    """Each hit with the text as one of its examples, highlighted on the scale of its dataset
    max (the text's own max where that is larger or unknown)."""
    return [(hit, text_example(result.token_ids, result.tokens, hit.values, hit.max_index,
                               hit.max_value),
             Scale(max(hit.max_act or 0.0, hit.max_value), float(np.min(hit.values))))
            for hit in result.features]


def _sources(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


@router.get("/search.json", response_model=SearchOut, responses=ERRORS,
            summary="The search page's JSON: the features that fire most on a text",
            dependencies=[requires(Scope.live, explicit=True)])
async def search_json(request: Request, model: Annotated[str, Query(pattern=SLUG_PATTERN)],
                      text: Annotated[str, Query(min_length=1, max_length=MAX_TEXT_CHARS)],
                      sources: Annotated[str | None, Query(max_length=4000)] = None,
                      top: Annotated[int, Query(ge=1, le=200)] = 20):
    return _json(await run_search(request, checked(SearchIn, model=model, text=text,
                                                   sources=_sources(sources), top=top)))


class SearchForm(In):
    """The search box, posted."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(pattern=SLUG_PATTERN)
    text: str = Field(max_length=MAX_TEXT_CHARS)
    sources: str = Field("", max_length=4000)
    top: int = Field(20, ge=1, le=200)


async def _page(request: Request, model: str | None, text: str, sources: str,
                result: SearchOut | None = None, error: str | None = None,
                status: int = 200) -> Response:
    menu = await read_db(request, lambda session: [m.slug for m in queries.models(session)])
    page = {"models": menu, "model": model or (menu[0] if menu else ""), "text": text,
            "sources": sources or "", "result": result, "error": error,
            "rows": _hit_rows(result) if result else [],
            "live": request.app.state.live is not None}
    fragment = is_htmx(request) and request.headers.get("hx-target") == "search-results"
    headers = {"Cache-Control": "no-store"}
    if result is not None and fragment:
        headers["HX-Push-Url"] = result.url
    return request.app.state.templates.TemplateResponse(
        request, "_search.html" if fragment else "search.html", page,
        status_code=200 if fragment else status, headers=headers)


@router.get("/search", include_in_schema=False)
async def search_page(request: Request,
                      model: Annotated[str | None, Query(max_length=128)] = None,
                      text: Annotated[str, Query(max_length=MAX_TEXT_CHARS)] = "",
                      sources: Annotated[str | None, Query(max_length=4000)] = None):
    """The search box, holding the query of its URL; its Run button posts it (a GET does not
    run the model: any page could link here)."""
    return await _page(request, model, text, sources or "")


@router.post("/search", include_in_schema=False, dependencies=[requires(Scope.live)])
async def search_run(request: Request):
    """The search box, run: the page with its results (htmx: the results alone, and the
    shareable GET URL pushed into the address bar)."""
    form = await read_form(request, SearchForm)
    result, error, status = None, None, 200
    if form.text.strip():
        try:
            result = await run_search(request, checked(
                SearchIn, model=form.model, text=form.text, sources=_sources(form.sources),
                top=form.top))
        except (HTTPException, InferenceError) as exc:
            status, error, _ = described(exc)
    return await _page(request, form.model, form.text, form.sources, result, error, status)
