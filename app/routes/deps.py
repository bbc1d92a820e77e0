"""Dependencies and path parameters shared by the routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Row
from sqlalchemy.orm import Session

from app.db import queries

SLUG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_INDEX = 2**31 - 1


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request, used by the sync views in the threadpool. Opening it does no
    I/O, so it happens here without a trip through the threadpool; closing it gives its
    connection back to the pool, which for PostgreSQL is a round trip (a rollback) and goes
    to a worker thread, and for SQLite is a memory operation done here."""
    session = Session(request.app.state.engine)
    try:
        yield session
    finally:
        if request.app.state.engine.dialect.name == "sqlite" or not session.in_transaction():
            session.close()
        else:
            await run_in_threadpool(session.close)


SessionDep = Annotated[Session, Depends(get_session)]
ModelSlug = Annotated[str, Path(pattern=SLUG_PATTERN, max_length=128,
                                description="model slug, e.g. smollm2-135m-instruct")]
SourceSlug = Annotated[str, Path(pattern=SLUG_PATTERN, max_length=128,
                                 description="source slug, e.g. 6-mlp or 6-res-sae-4k")]
FeatureIndex = Annotated[int, Path(ge=0, le=MAX_INDEX, description="feature index, from 0")]


def not_found(what: str) -> HTTPException:
    return HTTPException(status_code=404, detail=what)


def load_source(session: Session, model: str, source: str) -> Row:
    """The source row (with its model and dataset) or a 404 that says which part is unknown."""
    row = queries.source_by_slug(session, model=model, source=source)
    if row is None:
        if queries.model_by_slug(session, slug=model) is None:
            raise not_found(f"unknown model {model!r}")
        raise not_found(f"model {model!r} has no source {source!r}")
    return row
