"""Search by token: `/tokens?model=&token=` (or `&id=N`; `.json` too) lists the features whose
top examples peak most often on a token. It reads what the harvest stored: no model needed."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from sqlalchemy.orm import Session

from app import urls
from app.db import queries
from app.routes.deps import SLUG_PATTERN, SessionDep, invalid, not_found
from app.routes.errors import described, documented
from app.schemas import TokenFeature, TokenRef, TokenSearchOut

router = APIRouter()


def token_search(session: Session, vocabs: queries.VocabCache, model: str, token: str | None,
                 token_id: int | None, limit: int) -> TokenSearchOut:
    row = queries.model_by_slug(session, slug=model)
    if row is None:
        raise not_found(f"unknown model {model!r}")
    vocab = vocabs.get(session, model_id=row.id, tokenizer_hash=row.tokenizer_hash)
    if token_id is not None:
        if not 0 <= token_id < len(vocab.texts):
            raise not_found(f"{model} has no token id {token_id}: its ids are 0 to "
                            f"{len(vocab.texts) - 1}")
        ids = [token_id]
    else:
        ids = list(vocab.ids_of(token or ""))
        if token and not token[:1].isspace():  # 'the' finds ' the' too: the word mid-sentence
            ids += [i for i in vocab.ids_of(" " + token) if i not in ids]
    srcs = [s for s in queries.sources(session, model_id=row.id) if s.status == "ready"]
    slugs = {s.id: s.slug for s in srcs}
    found = queries.peak_token_features(session, source_ids=list(slugs), token_ids=ids,
                                        limit=limit)
    wanted: dict[int, list[int]] = {}
    for r in found:
        wanted.setdefault(r.source_id, []).append(r.feature_idx)
    n_top = {sid: queries.top_counts(session, source_id=sid, indices=fs)
             for sid, fs in wanted.items()}
    feats = [TokenFeature(source=slugs[r.source_id], index=r.feature_idx, token_id=r.token_id,
                          count=r.count, n_top=n_top[r.source_id].get(r.feature_idx, 0),
                          max_act=r.max_act, frac_active=r.frac_active,
                          url=urls.feature(model, slugs[r.source_id], r.feature_idx))
             for r in found]
    return TokenSearchOut(
        model=model, query=token if token_id is None else None,
        tokens=[TokenRef(id=i, text=vocab.text(i)) for i in ids], features=feats,
        url=urls.token_search(model, token if token_id is None else None, token_id))


TokenText = Annotated[str | None, Query(max_length=200, description="a token's text")]
TokenId = Annotated[int | None, Query(ge=0, le=2**31 - 1, description="a token id")]
Limit = Annotated[int, Query(ge=1, le=500)]


@router.get("/tokens.json", response_model=TokenSearchOut, responses=documented(404, 422),
            summary="The features whose top examples peak most often on a token (give token "
            "or id)")
def tokens_json(request: Request, session: SessionDep,
                model: Annotated[str, Query(pattern=SLUG_PATTERN)], token: TokenText = None,
                id: TokenId = None, limit: Limit = 50):  # noqa: A002
    if not token and id is None:
        raise invalid("give token (its text) or id, e.g. /tokens.json?model=M&token=the")
    result = token_search(session, request.app.state.vocabs, model, token, id, limit)
    return Response(result.model_dump_json(), media_type="application/json",
                    headers={"Cache-Control": "no-cache"})


@router.get("/tokens", include_in_schema=False)
def tokens_page(request: Request, session: SessionDep,
                model: Annotated[str | None, Query(pattern=SLUG_PATTERN)] = None,
                token: TokenText = None, id: TokenId = None, limit: Limit = 50):  # noqa: A002
    result, error, status = None, None, 200
    if model and (token or id is not None):
        try:
            result = token_search(session, request.app.state.vocabs, model, token, id, limit)
        except HTTPException as exc:
            status, error, _ = described(exc)
    menu = [m.slug for m in queries.models(session)]
    page = {"models": menu, "model": model or (menu[0] if menu else ""), "token": token or "",
            "token_id": id, "result": result, "error": error,
            "tokens_text": {t.id: t.text for t in result.tokens} if result else {}}
    return request.app.state.templates.TemplateResponse(request, "tokens.html", page,
                                                        status_code=status,
                                                        headers={"Cache-Control": "no-cache"})
