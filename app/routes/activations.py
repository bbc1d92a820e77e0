"""One feature's activation at every token of your own text: `POST /api/v1/activations` (the
same shaped like Neuronpedia's is in `app.routes.neuronpedia_live`).

It runs the model through the model queue (`app.model_queue`); without `serve --live` it
answers 503 saying how to enable it. It needs the `live` scope, and holds no database
connection while it waits for the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response
from sqlalchemy import Row
from sqlalchemy.orm import Session

from app.db import queries
from app.keys import Scope
from app.routes.access import requires
from app.routes.deps import (
    invalid,
    load_source,
    model_queue,
    not_found,
    read_db,
)
from app.routes.errors import documented
from app.schemas import ActivationsIn, ActivationsOut, TextActivations

if TYPE_CHECKING:
    from workers.inference import Activations

router = APIRouter()

ERRORS = documented(404, 413, 422, 503)


def ready_feature(session: Session, model: str, source: str, index: int) -> Row:
    """The source row of a harvested feature, or a 404 that says what is missing."""
    src = load_source(session, model, source)
    if src.status != "ready":
        raise not_found(f"{model}/{source} is not harvested yet")
    if index >= src.n_features:
        raise not_found(f"{model}/{source} has no feature {index}: it has features 0 to "
                        f"{src.n_features - 1}")
    return src


def _feature_and_vocab(session: Session, vocabs: queries.VocabCache, model: str, source: str,
                       index: int) -> tuple[Row, queries.Vocab]:
    src = ready_feature(session, model, source, index)
    return src, vocabs.get(session, model_id=src.model_id, tokenizer_hash=src.tokenizer_hash)


def _text_out(ids: list[int], run: Activations, vocab: queries.Vocab) -> TextActivations:
    return TextActivations(tokens=list(vocab.many(ids)), token_ids=ids,
                           values=run.values.tolist(), max_value=run.max_value,
                           max_index=run.max_index)


@router.post("/api/v1/activations", response_model=ActivationsOut, responses=ERRORS,
             summary="One feature's activation at every token of your own text",
             dependencies=[requires(Scope.live)])
async def activations(request: Request, body: ActivationsIn):
    given = [x for x in (body.text, body.texts, body.tokens) if x is not None]
    if len(given) != 1:
        raise invalid("give exactly one of text, texts or tokens")
    queue = model_queue(request)
    src, vocab = await read_db(request, _feature_and_vocab, request.app.state.vocabs,
                               body.model, body.source, body.index)
    if body.tokens is not None:
        if not body.tokens:
            raise invalid("tokens is empty")
        queue.check_length(len(body.tokens))
        runs = [list(body.tokens)]
    else:
        texts = body.texts if body.texts is not None else [body.text]
        runs = await queue.tokenize(body.model, texts)
    results = await queue.call(
        lambda models: models.model(body.model).activations(body.source, body.index, runs))
    outs = [_text_out(ids, run, vocab) for ids, run in zip(runs, results, strict=True)]
    head = {"model": body.model, "source": body.source, "index": body.index,
            "bos_first": src.bos_policy == "bos-prepended"}
    if body.texts is not None:
        out = ActivationsOut(**head, results=outs)
    else:
        out = ActivationsOut(**head, **outs[0].model_dump())
    return Response(out.model_dump_json(exclude_none=True), media_type="application/json",
                    headers={"Cache-Control": "no-store"})
