"""Neuronpedia's endpoints that run the model on your text, in the shapes of its own:
`POST /api/activation/new` (one feature), `/api/activation/source` (every feature of a source),
`/api/search-all` (the features that fire most) and `/api/search-topk-by-token` (each token's
top features). Each answers with and without a trailing slash (Neuronpedia's client sends the
searches to `.../search-all/`), and runs through the model queue like every live request.

Where Neuronpedia's semantics differ from featurescope's own endpoints, these follow the
request and Neuronpedia: `tokens` and `values` include the leading BOS token unless
`ignoreBos`, and `maxValue` is the largest of the values returned."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session

from app.db import queries
from app.keys import Scope
from app.neuronpedia_rank import active_features, ranked_features, top_by_token
from app.neuronpedia_schemas import (
    NpActivationNewIn,
    NpActiveFeatures,
    NpLiveActivation,
    NpNeuron,
    NpSearchAllBatch,
    NpSearchAllIn,
    NpSearchAllOut,
    NpSearchHit,
    NpSourceActivationsIn,
    NpSourceActivationsOut,
    NpTokenTop,
    NpTopFeature,
    NpTopkBatch,
    NpTopkIn,
    NpTopkOut,
    source_set_name,
)
from app.routes.access import requires
from app.routes.activations import ready_feature
from app.routes.deps import invalid, load_source, model_queue, not_found, read_db, read_vocab
from app.routes.errors import documented

router = APIRouter()

ERRORS = documented(404, 413, 422, 503)


def _post(path: str, **kw):
    """A POST route at `path` and at `path/`, the second left out of the API docs; it runs the
    model, so it needs the `live` scope."""
    kw["dependencies"] = [requires(Scope.live)]

    def register(fn):
        router.post(path + "/", include_in_schema=False, **kw)(fn)
        return router.post(path, responses=ERRORS, **kw)(fn)
    return register


def _texts(texts: str | list[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _answer(out: BaseModel | list[BaseModel]) -> Response:
    body = (out.model_dump_json() if isinstance(out, BaseModel)
            else "[" + ",".join(x.model_dump_json() for x in out) + "]")
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})


def _neurons(session: Session, model: str, slug: str, src_id: int,
             indices: list[int]) -> dict[int, NpNeuron]:
    stats = queries.feature_stats(session, source_id=src_id, indices=indices)
    return {i: NpNeuron(modelId=model, layer=slug, index=str(i), maxActApprox=mx,
                        frac_nonzero=frac) for i, (mx, frac) in stats.items()}


def _ready_source(session: Session, model: str, source: str):
    src = load_source(session, model, source)
    if src.status != "ready":
        raise not_found(f"{model}/{source} is not harvested yet")
    return src


async def _prepare(request: Request, model: str, source: str, texts: str | list[str]):
    """(queue, source row, vocabulary, token ids of each text) for a request on one source."""
    queue = model_queue(request)
    src = await read_db(request, _ready_source, model, source)
    vocab = await read_vocab(request, src)
    return queue, src, vocab, await queue.tokenize(model, _texts(texts))


@_post("/api/activation/new", response_model=NpLiveActivation | list[NpLiveActivation],
       summary="One feature's activations on your text(s), shaped like Neuronpedia's "
       "/api/activation/new")
async def activation_new(request: Request, body: NpActivationNewIn):
    ref = body.ref
    index = ref.number
    queue = model_queue(request)
    src = await read_db(request, ready_feature, ref.modelId, ref.slug, index)
    vocab = await read_vocab(request, src)
    runs = await queue.tokenize(ref.modelId, _texts(body.customText))
    served = queue.models.model(ref.modelId)
    results = await queue.call(lambda models: models.model(ref.modelId).activations(
        ref.slug, index, runs))
    out = []
    for ids, run in zip(runs, results, strict=True):
        first = served.body_start(ids) if body.ignoreBos else 0
        values = run.values[first:].tolist()
        top = max(values)
        out.append(NpLiveActivation(
            modelId=ref.modelId, layer=ref.slug, source=ref.slug, index=str(index),
            tokens=list(vocab.many(ids[first:])), values=values, maxValue=top,
            maxValueTokenIndex=values.index(top), minValue=min(values)))
    return _answer(out[0] if isinstance(body.customText, str) else out)


@_post("/api/activation/source", response_model=NpSourceActivationsOut,
       summary="Every feature of a source on your text(s): the non-zero values, shaped like "
       "Neuronpedia's /api/activation/source")
async def activation_source(request: Request, body: NpSourceActivationsIn):
    queue, src, vocab, runs = await _prepare(request, body.modelId, body.source,
                                             body.customText)

    def compute(models):
        served = models.model(body.modelId)
        return [active_features(served.run(ids, [body.source])[body.source],
                                first=served.body_start(ids)) for ids in runs]

    found = await queue.call(compute)
    return _answer(NpSourceActivationsOut(results=[
        NpActiveFeatures(tokens=list(vocab.many(ids)), activeFeatures=active)
        for ids, active in zip(runs, found, strict=True)]))


def _search_sources(session: Session, body: NpSearchAllIn) -> tuple[object, dict[str, object]]:
    """The model row and the harvested sources of the set to search (the selected ones, else
    all), sorted by name as Neuronpedia sorts selectedLayers."""
    row = queries.model_by_slug(session, slug=body.modelId)
    if row is None:
        raise not_found(f"unknown model {body.modelId!r}")
    in_set = {s.slug: s for s in queries.sources(session, model_id=row.id)
              if s.status == "ready" and source_set_name(s.slug) == body.sourceSet}
    if not in_set:
        raise not_found(f"{body.modelId} has no harvested source in the set {body.sourceSet!r}")
    unknown = [s for s in body.selectedLayers if s not in in_set]
    if unknown:
        raise not_found(f"the set {body.sourceSet!r} of {body.modelId} has no harvested source "
                        f"{unknown[0]!r}; it has: {', '.join(sorted(in_set))}")
    return row, {s: in_set[s] for s in sorted(set(body.selectedLayers) or in_set)}


@_post("/api/search-all", response_model=NpSearchAllOut | NpSearchAllBatch,
       summary="The features of a source set that fire most on your text(s), shaped like "
       "Neuronpedia's /api/search-all")
async def search_all(request: Request, body: NpSearchAllIn):
    queue = model_queue(request)
    row, sources = await read_db(request, _search_sources, body)
    slugs = list(sources)
    vocab = await read_vocab(request, row)
    runs = await queue.tokenize(body.modelId, _texts(body.text))
    for ids in runs:
        bad = [i for i in body.sortIndexes if not 0 <= i < len(ids)]
        if bad:
            raise invalid(f"sortIndexes {bad} are out of range for a text of {len(ids)} tokens "
                          "(the BOS token is position 0)")

    def compute(models):
        served = models.model(body.modelId)
        return [ranked_features(served.run(ids, slugs), slugs,
                                zero_first=body.ignoreBos and served.body_start(ids) == 1,
                                sort_indexes=body.sortIndexes, n=body.numResults)
                for ids in runs]

    ranked = await queue.call(compute)

    def finish(session: Session) -> list[NpSearchAllOut]:
        wanted: dict[str, set[int]] = {}
        for hits in ranked:
            for h in hits:
                wanted.setdefault(h.source, set()).add(h.index)
        neurons = {s: _neurons(session, body.modelId, s, sources[s].id, sorted(fs))
                   for s, fs in wanted.items()}
        outs = []
        for ids, hits in zip(runs, ranked, strict=True):
            # as Neuronpedia: the top numResults, less the too dense and those that never fire
            kept = [h for h in hits if h.key > 0 and not (
                body.densityThreshold != -1 and h.index in neurons[h.source]
                and neurons[h.source][h.index].frac_nonzero > body.densityThreshold)]
            outs.append(NpSearchAllOut(
                tokens=list(vocab.many(ids)), sortIndexes=sorted(body.sortIndexes),
                result=[NpSearchHit(modelId=body.modelId, layer=h.source, index=str(h.index),
                                    maxValue=h.max_value, maxValueIndex=h.max_index,
                                    values=h.values, neuron=neurons[h.source].get(h.index))
                        for h in kept]))
        return outs

    outs = await read_db(request, finish)
    return _answer(outs[0] if isinstance(body.text, str) else NpSearchAllBatch(results=outs))


@_post("/api/search-topk-by-token", response_model=NpTopkOut | NpTopkBatch,
       summary="Each token's top features of a source on your text(s), shaped like "
       "Neuronpedia's /api/search-topk-by-token")
async def search_topk_by_token(request: Request, body: NpTopkIn):
    queue, src, vocab, runs = await _prepare(request, body.modelId, body.source, body.text)

    def compute(models):
        served = models.model(body.modelId)
        special = set(served.lm.tokenizer.all_special_ids)
        out = []
        for ids in runs:
            first = served.body_start(ids) if body.ignoreBos else 0
            tops = top_by_token(served.run(ids, [body.source])[body.source], body.numResults,
                                first=first)
            out.append([(t, ids[t] in special, top) for t, top in enumerate(tops, first)])
        return out

    found = await queue.call(compute)

    def finish(session: Session) -> list[NpTopkOut]:
        indices = sorted({f for rows in found for _, _, top in rows for f, _ in top})
        neurons = _neurons(session, body.modelId, body.source, src.id, indices)
        outs = []
        for ids, rows in zip(runs, found, strict=True):
            results = []
            for t, is_special, top in rows:
                if body.ignoreBos and is_special:  # as Neuronpedia: no special tokens
                    continue
                feats = [NpTopFeature(activationValue=v, featureIndex=f, feature=neurons.get(f))
                         for f, v in top if body.densityThreshold == -1 or (
                             f in neurons and 0 < neurons[f].frac_nonzero <= body.densityThreshold)]
                results.append(NpTokenTop(position=t, token=vocab.text(ids[t]),
                                          isSpecial=is_special, topFeatures=feats))
            outs.append(NpTopkOut(source=body.source, results=results))
        return outs

    outs = await read_db(request, finish)
    return _answer(outs[0] if isinstance(body.text, str) else NpTopkBatch(results=outs))
