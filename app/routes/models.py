"""`/`: every model with its sources; `/{model}`: one model and its sources.

Both poll themselves (htmx, their partial alone) while a source is being harvested."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from sqlalchemy import Row

from app import urls
from app.db import queries
from app.db.tables import Model
from app.routes.deps import ModelSlug, SessionDep, not_found
from app.routes.heads import METRICS, build_head_map
from app.routes.present import progress
from app.routes.render import page, render
from app.schemas import HomePage, ModelOut, ModelPage, SourceOut

router = APIRouter()


def source_out(model_slug: str, row: Row) -> SourceOut:
    url = urls.source(model_slug, row.slug)
    return SourceOut(
        slug=row.slug, kind=row.kind, hook_name=row.hook_name, layer=row.layer,
        n_features=row.n_features, dataset=row.dataset_slug, status=row.status,
        progress_tokens=row.progress_tokens, total_tokens=row.total_tokens,
        progress=progress(row.progress_tokens, row.total_tokens), error=row.error,
        url=url, json_url=urls.json(url))


def model_out(model: Model, sources: list[Row]) -> ModelOut:
    url = urls.model(model.slug)
    return ModelOut(
        slug=model.slug, hub_id=model.hub_id, arch=model.arch, n_layers=model.n_layers,
        d_model=model.d_model, d_mlp=model.d_mlp, vocab_size=model.vocab_size, url=url,
        json_url=urls.json(url), sources=[source_out(model.slug, s) for s in sources])


@page(router, "/", name="home", schema=HomePage, summary="Every model with its sources")
def home(request: Request, session: SessionDep):
    by_model: dict[int, list[Row]] = {}
    for row in queries.sources(session):
        by_model.setdefault(row.model_id, []).append(row)
    ctx = HomePage(models=[model_out(m, by_model.get(m.id, []))
                           for m in queries.models(session)])
    return render(request, ctx, template="home.html", partial="_models.html")


@page(router, "/{model}", name="model", schema=ModelPage,
      summary="One model, its sources and the map of its attention heads")
def model(request: Request, session: SessionDep, model: ModelSlug,
          metric: str = Query("induction", description="the head map's metric: "
                              + ", ".join(METRICS))):
    row = queries.model_by_slug(session, slug=model)
    if row is None:
        raise not_found(f"unknown model {model!r}")
    ctx = ModelPage(model=model_out(row, list(queries.sources(session, model_id=row.id))),
                    head_map=build_head_map(session, row, metric))
    return render(request, ctx, template="model.html", partial="_sources.html")
