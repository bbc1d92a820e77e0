"""Your own text through the model, and searches.

- `POST /api/v1/activations`: one feature's activation at every token of a text (or of several).
- `/{model}/{source}/{index}/try?text=...`: the feature page with that text highlighted like its
  examples (the "try your own text" box; htmx swaps in the `_try.html` part alone).
- `POST /api/v1/search` and `/search?model=&text=`: the features that fire most on a text.
- `/tokens?model=&token=`: the features whose top examples peak on a token (stored data; this
  one needs no live model).

Live inference goes through `app.live.LiveService` (one model call at a time, 413 and 503
limits); without `serve --live` its answers say how to enable it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app import urls
from app.db import queries
from app.live import HOW_TO_ENABLE, LiveService
from app.routes.deps import FeatureIndex, ModelSlug, SessionDep, SourceSlug, load_source, not_found
from app.routes.features import build_feature
from app.routes.render import is_htmx, wants_json
from app.schemas import (
    ActivationsIn,
    ActivationsOut,
    ErrorOut,
    ExampleOut,
    NpActivationNewIn,
    NpActivationNewOut,
    SearchHit,
    SearchIn,
    SearchOut,
    TextActivations,
    TokenFeature,
    TokenHit,
    TokenRef,
    TokenSearchOut,
)

router = APIRouter()

ERRORS = {404: {"model": ErrorOut}, 413: {"model": ErrorOut}, 422: {"model": ErrorOut},
          503: {"model": ErrorOut}}
MAX_TEXT_CHARS = 100_000
"""Longer texts are refused before they are tokenized (their tokens would be over any limit)."""


def live_service(request: Request) -> LiveService:
    live = request.app.state.live
    if live is None:
        raise HTTPException(503, HOW_TO_ENABLE)
    return live


def _bad(message: str) -> HTTPException:
    return HTTPException(422, message)


# ------------------------------------------------------------------ running the model
# These run in the live service's worker thread, with the loaded models as first argument.


def _tokenize(models, model: str, texts: list[str]) -> list[list[int]]:
    lm = _model(models, model)
    return [lm.tokenize(t) for t in texts]


def _model(models, model: str):
    from workers.live import LiveError

    try:
        return models.model(model)
    except LiveError as exc:
        raise HTTPException(503, f"{exc} (harvested sources are served live when their model "
                                 "and SAE files load as they were harvested)") from None


def _feature_values(models, model: str, source: str, index: int, runs: list[list[int]]
                    ) -> tuple[int | None, list[np.ndarray]]:
    """(the model's BOS id, the feature's values on each run of token ids)."""
    from workers.live import LiveError

    lm = _model(models, model)
    try:
        lm.source(source)
    except LiveError as exc:
        raise HTTPException(503, str(exc)) from None
    return lm.bos_id, [lm.run(ids, [source])[source][:, index] for ids in runs]


def _search(models, model: str, sources: list[str], ids: list[int], top: int, per_token: int
            ) -> tuple[list[tuple], list[list[tuple]]]:
    """(hits, per_token): hits (value, source, index, argmax, values) highest first; per token,
    its top (source, index, value) by value (none for a leading BOS)."""
    from workers.live import LiveError

    lm = _model(models, model)
    try:
        acts = lm.run(ids, sources)
    except LiveError as exc:
        raise HTTPException(422, str(exc)) from None
    first = 1 if lm.bos_first and len(ids) > 1 else 0
    hits = []
    for order, slug in enumerate(sources):
        a = acts[slug][first:]
        mx, arg = a.max(0), a.argmax(0)
        best = np.argsort(-mx, kind="stable")[:top]
        hits += [(float(mx[f]), order, int(f), int(arg[f]) + first) for f in best if mx[f] > 0]
    hits.sort(key=lambda h: (-h[0], h[1], h[2]))
    hits = [(v, sources[o], f, at, acts[sources[o]][:, f].tolist()) for v, o, f, at in hits[:top]]
    rows: list[list[tuple]] = [[] for _ in ids]
    if per_token:
        for t in range(first, len(ids)):
            cands = []
            for order, slug in enumerate(sources):
                row = acts[slug][t]
                k = min(per_token, row.shape[0])
                best = np.argpartition(-row, k - 1)[:k]
                cands += [(float(row[f]), order, int(f)) for f in best if row[f] > 0]
            cands.sort(key=lambda c: (-c[0], c[1], c[2]))
            rows[t] = [(sources[o], f, v) for v, o, f in cands[:per_token]]
    return hits, rows


async def _tokenized(live: LiveService, model: str, texts: list[str]) -> list[list[int]]:
    for text in texts:
        if len(text) > MAX_TEXT_CHARS:
            raise HTTPException(413, f"the text is {len(text):,} characters long; this server "
                                     f"takes at most {live.limits.max_tokens} tokens per text")
        if not text.strip():
            raise _bad("the text is empty")
    runs = await run_in_threadpool(_tokenize, live.models, model, texts)
    for ids in runs:
        live.check_length(len(ids))
    return runs


def _peak(values: np.ndarray, first: int) -> tuple[float, int]:
    body = values[first:] if len(values) > first else values
    at = int(np.argmax(body)) + (first if len(values) > first else 0)
    return float(values[at]), at


def _text_out(ids: list[int], values: np.ndarray, vocab: queries.Vocab, bos: int | None
              ) -> TextActivations:
    """A leading BOS token is never the max (as in the harvest)."""
    mx, at = _peak(values, 1 if bos is not None and ids[0] == bos else 0)
    return TextActivations(tokens=list(vocab.many(ids)), token_ids=ids, values=values.tolist(),
                           max_value=mx, max_index=at)


# ------------------------------------------------------------------ activations


def _checked_source(session: Session, model: str, source: str, index: int):
    src = load_source(session, model, source)
    if src.status != "ready":
        raise not_found(f"{model}/{source} is not harvested yet")
    if index >= src.n_features:
        raise not_found(f"{model}/{source} has no feature {index}: it has features 0 to "
                        f"{src.n_features - 1}")
    return src


@router.post("/api/v1/activations", response_model=ActivationsOut, responses=ERRORS,
             summary="One feature's activation at every token of your own text")
async def activations(request: Request, body: ActivationsIn, session: SessionDep):
    given = [x for x in (body.text, body.texts, body.tokens) if x is not None]
    if len(given) != 1:
        raise _bad("give exactly one of text, texts or tokens")
    live = live_service(request)
    src = await run_in_threadpool(_checked_source, session, body.model, body.source, body.index)
    vocab = await run_in_threadpool(request.app.state.vocabs.get, session,
                                    model_id=src.model_id, tokenizer_hash=src.tokenizer_hash)
    if body.tokens is not None:
        if not body.tokens:
            raise _bad("tokens is empty")
        bad = [t for t in body.tokens if not 0 <= t < len(vocab.texts)]
        if bad:
            raise _bad(f"token ids out of the vocabulary (0 to {len(vocab.texts) - 1}): {bad[:5]}")
        live.check_length(len(body.tokens))
        runs = [list(body.tokens)]
    else:
        texts = body.texts if body.texts is not None else [body.text]
        if not texts:
            raise _bad("texts is empty")
        if len(texts) > live.limits.max_texts:
            raise HTTPException(413, f"{len(texts)} texts; this server takes at most "
                                     f"{live.limits.max_texts} per request")
        runs = await _tokenized(live, body.model, texts)
    bos, values = await live.call(_feature_values, body.model, body.source, body.index, runs)
    bos_first = src.bos_policy == "bos-prepended"
    outs = [_text_out(ids, v, vocab, bos) for ids, v in zip(runs, values, strict=True)]
    head = {"model": body.model, "source": body.source, "index": body.index,
            "bos_first": bos_first}
    if body.texts is not None:
        out = ActivationsOut(**head, results=outs)
    else:
        out = ActivationsOut(**head, **outs[0].model_dump())
    return Response(out.model_dump_json(exclude_none=True), media_type="application/json",
                    headers={"Cache-Control": "no-store"})


@router.post("/api/activation/new", response_model=NpActivationNewOut, responses=ERRORS,
             summary="Activations on your text, shaped like Neuronpedia's /api/activation/new")
async def neuronpedia_activation(request: Request, body: NpActivationNewIn, session: SessionDep):
    try:
        index = int(body.feature.index)
    except ValueError:
        raise _bad(f"feature.index must be an integer, got {body.feature.index!r}") from None
    if index < 0:
        raise _bad("feature.index must be at least 0")
    req = ActivationsIn(model=body.feature.modelId, source=body.feature.source, index=index,
                        text=body.customText)
    out = json.loads((await activations(request, req, session)).body)
    values = out["values"]
    return NpActivationNewOut(tokens=out["tokens"], values=values, maxValue=out["max_value"],
                              maxValueTokenIndex=out["max_index"], minValue=min(values))


def _trial(ids: list[int], values: np.ndarray, vocab: queries.Vocab, bos_first: bool
           ) -> ExampleOut:
    """A text of the user's as an example of the page: values rounded to float16 like stored
    windows, the peak exact."""
    first = 1 if bos_first else 0
    mx, at = _peak(values, first)
    return ExampleOut(rank=0, seq_idx=-1, start=0, peak_pos=at, peak_index=at, peak_value=mx,
                      token_ids=ids, tokens=list(vocab.many(ids)),
                      acts=values.astype(np.float16).astype(np.float64).tolist())


@router.get("/{model}/{source}/{index}/try", include_in_schema=False)
async def try_text(request: Request, session: SessionDep, model: ModelSlug, source: SourceSlug,
                   index: FeatureIndex,
                   text: Annotated[str, Query(max_length=MAX_TEXT_CHARS)] = ""):
    """The feature page with a text of the user's highlighted (htmx: that part alone)."""
    live = request.app.state.live
    src = await run_in_threadpool(load_source, session, model, source)
    ctx = await run_in_threadpool(build_feature, session, request.app.state.vocabs, src, index)
    trial, error, status = None, None, 200
    if text.strip() and live is not None:
        try:
            runs = await _tokenized(live, model, [text])
            bos, values = await live.call(_feature_values, model, source, index, runs)
            vocab = await run_in_threadpool(request.app.state.vocabs.get, session,
                                            model_id=src.model_id,
                                            tokenizer_hash=src.tokenizer_hash)
            trial = _trial(runs[0], values[0], vocab, bos is not None)
        except HTTPException as exc:
            error, status = exc.detail, exc.status_code
    page = {"ctx": ctx, "trial": trial, "trial_text": text, "trial_error": error}
    name = "_try.html" if is_htmx(request) and request.headers.get("hx-target") == "try-result" \
        else "feature.html"
    headers = {"Cache-Control": "no-store"}
    if status == 503 and error != HOW_TO_ENABLE:
        headers["Retry-After"] = str(live.retry_after())
    # An htmx swap shows an error in place (htmx swaps only 2xx answers).
    code = 200 if name == "_try.html" else status
    return request.app.state.templates.TemplateResponse(request, name, page, status_code=code,
                                                        headers=headers)


# ------------------------------------------------------------------ search by text


def _search_sources(session: Session, request: Request, model: str,
                    wanted: list[str] | None) -> tuple[object, list[str]]:
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
    live = request.app.state.live
    if live is not None and model in live.models.models:
        served = live.models.models[model].sources
        ready = [s for s in ready if s in served]
    return row, ready


async def run_search(request: Request, session: Session, query: SearchIn) -> SearchOut:
    live = live_service(request)
    row, sources = await run_in_threadpool(_search_sources, session, request, query.model,
                                           query.sources)
    if not sources:
        raise not_found(f"{query.model} has no source to search")
    runs = await _tokenized(live, query.model, [query.text])
    ids = runs[0]
    hits, per_token = await live.call(_search, query.model, sources, ids, query.top,
                                      query.per_token)

    def finish() -> SearchOut:
        vocab = request.app.state.vocabs.get(session, model_id=row.id,
                                             tokenizer_hash=row.tokenizer_hash)
        by_source: dict[str, list[int]] = {}
        for _, s, f, _, _ in hits:
            by_source.setdefault(s, []).append(f)
        maxes = {}
        for s, fs in by_source.items():
            src = queries.source_by_slug(session, model=query.model, source=s)
            maxes[s] = queries.max_acts(session, source_id=src.id, indices=fs)
        out = []
        for v, s, f, at, values in hits:
            mx = maxes[s].get(f)
            out.append(SearchHit(source=s, index=f, max_value=v, max_index=at, max_act=mx,
                                 relative=v / mx if mx and mx > 0 else None, values=values,
                                 url=urls.feature(query.model, s, f)))
        return SearchOut(
            model=query.model, sources=sources, text=query.text,
            bos_first=live.models.models[query.model].bos_first, tokens=list(vocab.many(ids)),
            token_ids=ids, features=out,
            per_token=[[TokenHit(source=s, index=f, value=v) for s, f, v in row_]
                       for row_ in per_token],
            url=urls.search(query.model, query.text, query.sources))

    return await run_in_threadpool(finish)


@router.post("/api/v1/search", response_model=SearchOut, responses=ERRORS,
             summary="The features that fire most on a text, and each token's top features")
async def search_api(request: Request, body: SearchIn, session: SessionDep):
    out = await run_search(request, session, body)
    return Response(out.model_dump_json(), media_type="application/json",
                    headers={"Cache-Control": "no-store"})


@dataclass
class Scale:
    """What the highlighting reads of a feature's statistics (its range over the dataset)."""

    max_act: float
    min_act: float = 0.0


def _hit_rows(result: SearchOut) -> list[tuple[SearchHit, ExampleOut, Scale]]:
    """Each hit with the text as one of its examples, highlighted on the scale of its dataset
    max (the text's own max where that is larger or unknown)."""
    rows = []
    for hit in result.features:
        values = np.asarray(hit.values, dtype=np.float32)
        ex = ExampleOut(rank=0, seq_idx=-1, start=0, peak_pos=hit.max_index,
                        peak_index=hit.max_index, peak_value=hit.max_value,
                        token_ids=result.token_ids, tokens=result.tokens,
                        acts=values.astype(np.float16).astype(np.float64).tolist())
        rows.append((hit, ex, Scale(max(hit.max_act or 0.0, hit.max_value), float(values.min()))))
    return rows


def _models_menu(session: Session) -> list[str]:
    return [m.slug for m in queries.models(session)]


@router.get("/search", include_in_schema=False)
@router.get("/search.json", response_model=SearchOut, responses=ERRORS,
            summary="The search page's JSON: the features that fire most on a text")
async def search_page(request: Request, session: SessionDep,
                      model: Annotated[str | None, Query(max_length=128)] = None,
                      text: Annotated[str, Query(max_length=MAX_TEXT_CHARS)] = "",
                      sources: Annotated[str | None, Query(max_length=4000)] = None,
                      top: Annotated[int, Query(ge=1, le=200)] = 20):
    wanted = [s.strip() for s in sources.split(",") if s.strip()] if sources else None
    as_json = wants_json(request)
    asked = bool(model) and bool(text.strip())
    if as_json and not asked:
        raise _bad("give model and text, e.g. /search.json?model=M&text=...")
    result, error, status = None, None, 200
    if asked:
        try:
            result = await run_search(request, session, SearchIn(
                model=model, text=text, sources=wanted, top=top))
        except HTTPException as exc:
            if as_json:
                raise
            error, status = exc.detail, exc.status_code
    if as_json:
        return Response(result.model_dump_json(), media_type="application/json",
                        headers={"Cache-Control": "no-store"})
    menu = await run_in_threadpool(_models_menu, session)
    page = {"models": menu, "model": model or (menu[0] if menu else ""), "text": text,
            "sources": sources or "", "result": result, "error": error,
            "rows": _hit_rows(result) if result else [],
            "live": request.app.state.live is not None}
    name = "_search.html" if is_htmx(request) and request.headers.get(
        "hx-target") == "search-results" else "search.html"
    return request.app.state.templates.TemplateResponse(
        request, name, page, status_code=200 if name == "_search.html" else status,
        headers={"Cache-Control": "no-store"})


# ------------------------------------------------------------------ search by token


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


@router.get("/tokens", include_in_schema=False)
@router.get("/tokens.json", response_model=TokenSearchOut, responses=ERRORS,
            summary="The features whose top examples peak most often on a token")
def tokens_page(request: Request, session: SessionDep,
                model: Annotated[str | None, Query(max_length=128)] = None,
                token: Annotated[str | None, Query(max_length=200)] = None,
                id: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,  # noqa: A002
                limit: Annotated[int, Query(ge=1, le=500)] = 50):
    as_json = wants_json(request)
    asked = bool(model) and (bool(token) or id is not None)
    if as_json and not asked:
        raise _bad("give model and token (its text) or id, e.g. /tokens.json?model=M&token=the")
    result, error, status = None, None, 200
    if asked:
        try:
            result = token_search(session, request.app.state.vocabs, model, token, id, limit)
        except HTTPException as exc:
            if as_json:
                raise
            error, status = exc.detail, exc.status_code
    if as_json:
        return Response(result.model_dump_json(), media_type="application/json",
                        headers={"Cache-Control": "no-cache"})
    menu = _models_menu(session)
    page = {"models": menu, "model": model or (menu[0] if menu else ""), "token": token or "",
            "token_id": id, "result": result, "error": error,
            "tokens_text": {t.id: t.text for t in result.tokens} if result else {}}
    return request.app.state.templates.TemplateResponse(request, "tokens.html", page,
                                                        status_code=status,
                                                        headers={"Cache-Control": "no-cache"})
