"""Dependencies and path parameters shared by the routes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ValidationError
from sqlalchemy import Row
from sqlalchemy.orm import Session

from app.db import queries
from app.inference_errors import InferenceOff
from app.model_queue import ModelQueue

T = TypeVar("T")

SLUG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_INDEX = 2**31 - 1


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request, used by the views. Opening it does no I/O. Closing it gives its
    connection back to the pool at once, on the event loop: for SQLite a memory operation, for
    PostgreSQL one short round trip (the rollback of the read transaction). Sending the close to
    a worker thread instead would queue it behind other requests' views, and under many
    concurrent requests the finished ones would hold every connection of the pool.

    It closes when the view returns, before the answer is sent (`scope="function"`): held
    while a large answer streams to a slow client, connections ran out under load, and a view
    that reads on the event loop (the feature page on SQLite) then waited for one with the
    loop blocked."""
    session = Session(request.app.state.engine)
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def _in_session(engine, fn: Callable[..., T], args) -> T:
    with Session(engine, expire_on_commit=False) as session:
        return fn(session, *args)


async def read_db(request: Request, fn: Callable[..., T], *args) -> T:
    """fn(session, *args) in a worker thread, on a session of its own that is closed (its
    connection back in the pool) when fn returns. Views that wait for something else (the
    model queue) read through this, so that no connection waits with them."""
    return await run_in_threadpool(_in_session, request.app.state.engine, fn, args)


def _vocab_of(session: Session, vocabs: queries.VocabCache, row: Row) -> queries.Vocab:
    return vocabs.get(session, model_id=getattr(row, "model_id", row.id),
                      tokenizer_hash=row.tokenizer_hash)


async def read_vocab(request: Request, row: Row) -> queries.Vocab:
    """The token texts of a model row, or of a source row's model (read once, then cached),
    through `read_db`."""
    return await read_db(request, _vocab_of, request.app.state.vocabs, row)

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


def invalid(what: str) -> HTTPException:
    return HTTPException(status_code=422, detail=what)


M = TypeVar("M", bound=BaseModel)


def checked(model: type[M], /, **fields) -> M:
    """A request model a view makes from parts of a request (query parameters, another API's
    body): 422 saying why when they do not fit it."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise invalid("; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'request'}: "
                                f"{e['msg']}" for e in exc.errors()[:5])) from None


def model_queue(request: Request) -> ModelQueue:
    """The loaded models behind their queue; 503 saying how to start them on a server without."""
    queue = request.app.state.live
    if queue is None:
        raise InferenceOff()
    return queue
