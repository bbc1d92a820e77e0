"""Actions that compute, under /api/v1/."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import RedirectResponse

from app import urls
from app.db import queries
from app.routes.deps import ModelSlug, SessionDep, SourceSlug, load_source, not_found
from app.schemas import ErrorOut

router = APIRouter(prefix="/api/v1")


@router.get("/random/{model}/{source}", status_code=303,
            summary="Redirect to a random feature of a source (one that fired, if any)",
            responses={303: {"description": "to the feature page"}, 404: {"model": ErrorOut},
                       422: {"model": ErrorOut}})
def random_feature(session: SessionDep, model: ModelSlug, source: SourceSlug):
    src = load_source(session, model, source)
    index = queries.random_index(session, source_id=src.id, n_features=src.n_features)
    if index is None:
        raise not_found(f"{model}/{source} has no features yet")
    return RedirectResponse(urls.feature(model, source, index), status_code=303,
                            headers={"Cache-Control": "no-store"})
