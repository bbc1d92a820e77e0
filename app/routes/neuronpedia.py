"""Neuronpedia's read endpoints, in the shapes of its own answers, so that scripts written for
Neuronpedia (and its Python client, once `NPRequest.BASE_URL` points here) run against
featurescope: `GET /api/feature/{model}/{source}/{index}` (made from the same context object
as the feature page, `build_feature`), `GET /api/source-set/{model}/{name}`, and the lists
(`POST /api/list/get`, `/api/list/list`), which answer 404 until featurescope has lists.

The endpoints that run the model are in `app.routes.neuronpedia_live`."""

from __future__ import annotations

import math

from fastapi import APIRouter, Request, Response
from sqlalchemy import Row
from sqlalchemy.orm import Session

from app.db import explanations as explanation_db
from app.db import queries
from app.explanations import page_version
from app.neuronpedia_schemas import (
    NpActivation,
    NpFeature,
    NpModel,
    NpSource,
    NpSourceSet,
    source_set_name,
)
from app.routes.deps import (
    FeatureIndex,
    ModelSlug,
    SessionDep,
    SourceSlug,
    load_source,
    not_found,
)
from app.routes.errors import documented
from app.routes.explanations import np_explanation
from app.routes.features import build_feature, explained
from app.routes.render import etag, not_modified
from app.schemas import ExampleOut, FeaturePage

router = APIRouter()


def _activation(ctx: FeaturePage, ex: ExampleOut, kind: str, peaks: list[float],
                sample: list[float]) -> NpActivation:
    """One example as an Activation row. Its bin is the range of the peaks of its group;
    binContains the fraction of the sample (the quantile examples: every sampled sequence
    where the feature fired) whose peak lies in it, as Neuronpedia's binContains is the share
    of activations in its bin. Neuronpedia marks top examples with -1, which its own client
    refuses; here they carry their range like any group."""
    values = list(ex.acts)
    values[ex.peak_index] = ex.peak_value  # the exact float32 peak, so values[i] == maxValue
    lo, hi = min(peaks), max(peaks)
    contains = sum(lo <= p <= hi for p in sample) / len(sample) if sample else 0.0
    return NpActivation(
        id=f"{ctx.model}@{ctx.source}:{ctx.index}:{kind}:{ex.rank}", modelId=ctx.model,
        layer=ctx.source, source=ctx.source, index=str(ctx.index), dataIndex=str(ex.seq_idx),
        tokens=ex.tokens, values=values, maxValue=ex.peak_value,
        maxValueTokenIndex=ex.peak_index, minValue=min(values), binMin=lo, binMax=hi,
        binContains=contains, qualifyingTokenIndex=ex.peak_index)


def _freq_hist(ctx: FeaturePage) -> tuple[list[float], list[float]]:
    """(heights, values): token counts of the bins above 2**-10 between the first and last
    non-empty one, and each bin's geometric centre."""
    counts, edges = ctx.histogram.counts, ctx.histogram.edges
    used = [i for i in range(1, len(counts)) if counts[i]]
    if not used:
        return [], []
    heights, values = [], []
    for i in range(used[0], used[-1] + 1):
        lo, hi = edges[i], edges[i + 1]
        heights.append(float(counts[i]))
        values.append(math.sqrt(lo * hi) if hi is not None else lo * 2 ** 0.125)
    return heights, values


def np_model(model) -> NpModel:
    return NpModel(id=model.slug, displayName=model.slug, layers=model.n_layers,
                   dimension=model.d_model, neuronsPerLayer=model.d_mlp)


def np_source(request: Request, model: str, src: Row, n_sequences: int | None,
              seq_len: int | None) -> NpSource:
    live = request.app.state.live
    served = live is not None and model in live.models.models and (
        src.slug in live.models.models[model].sources)
    return NpSource(id=src.slug, modelId=model, setName=source_set_name(src.slug),
                    hookName=src.hook_name, hasDashboards=src.status == "ready",
                    inferenceEnabled=served, dataset=src.dataset_slug,
                    num_prompts=n_sequences, num_tokens_in_prompt=seq_len)


def np_activations(ctx: FeaturePage) -> list[NpActivation]:
    """The feature's stored examples as Neuronpedia's activations, by maxValue, highest first,
    as Neuronpedia orders them (the top examples before range examples of the same value)."""
    sample = [ex.peak_value for g in ctx.quantiles for ex in g.examples]
    groups = [("top", ctx.top)] + [(g.name, g.examples) for g in ctx.quantiles]
    acts = [_activation(ctx, ex, name, [e.peak_value for e in exs], sample)
            for name, exs in groups for ex in exs]
    acts.sort(key=lambda a: -a.maxValue)
    return acts


def to_neuronpedia(ctx: FeaturePage, model: NpModel, source: NpSource) -> NpFeature:
    """The feature page's context as Neuronpedia's feature answer."""
    acts = np_activations(ctx)
    heights, values = _freq_hist(ctx)
    return NpFeature(
        modelId=ctx.model, layer=ctx.source, index=str(ctx.index),
        sourceSetName=source_set_name(ctx.source), hookName=ctx.hook_name, model=model,
        source=source, maxActApprox=ctx.stats.max_act, frac_nonzero=ctx.stats.frac_active,
        pos_str=[t.text for t in ctx.top_logits], pos_values=[t.value for t in ctx.top_logits],
        neg_str=[t.text for t in ctx.bottom_logits],
        neg_values=[t.value for t in ctx.bottom_logits],
        freq_hist_data_bar_heights=heights, freq_hist_data_bar_values=values, activations=acts,
        explanations=[np_explanation(ctx.model, ctx.source, ctx.index, e)
                      for e in ctx.explanations])


def _dataset_size(session: Session, dataset_id: int) -> tuple[int | None, int | None]:
    ds = queries.dataset(session, dataset_id=dataset_id)
    return (ds.n_sequences, ds.seq_len) if ds is not None else (None, None)


def _feature(request: Request, session: Session, src: Row, index: int, version: int
             ) -> NpFeature:
    ctx = build_feature(session, request.app.state.vocabs, src, index, explained(
        session, request.app.state.explanations, src, index, version))
    model = np_model(queries.model_by_slug(session, slug=src.model_slug))
    source = np_source(request, src.model_slug, src, *_dataset_size(session, src.dataset_id))
    return to_neuronpedia(ctx, model, source)


@router.get("/api/feature/{model}/{source}/{index}", response_model=NpFeature,
            summary="A feature shaped like Neuronpedia's /api/feature answer",
            responses=documented(404, 422))
def neuronpedia_feature(request: Request, session: SessionDep, model: ModelSlug,
                        source: SourceSlug, index: FeatureIndex):
    src = load_source(session, model, source)
    version = explanation_db.version(session)
    tag = etag(request, page_version(src.version_hash if src.status == "ready" else None,
                                     version))
    if (cached := not_modified(request, tag)) is not None:
        return cached
    out = _feature(request, session, src, index, version)
    headers = {"Cache-Control": "no-cache", **({"ETag": tag} if tag else {})}
    return Response(out.model_dump_json(), media_type="application/json", headers=headers)


@router.get("/api/source-set/{model}/{name}", response_model=NpSourceSet,
            summary="A set of sources (one per layer), shaped like Neuronpedia's source set",
            responses=documented(404, 422))
def neuronpedia_source_set(request: Request, session: SessionDep, model: ModelSlug,
                           name: SourceSlug):
    row = queries.model_by_slug(session, slug=model)
    if row is None:
        raise not_found(f"unknown model {model!r}")
    every = queries.sources(session, model_id=row.id)
    members = [s for s in every if source_set_name(s.slug) == name]
    if not members:
        sets = sorted({source_set_name(s.slug) for s in every})
        raise not_found(f"{model} has no source set {name!r}; it has: {', '.join(sets) or 'none'}")
    first = members[0]
    out = NpSourceSet(
        name=name, modelId=model, urls=[], creatorName="featurescope", type=first.kind,
        description=f"{first.hook_name.split('.', 2)[-1]} - {first.n_features}",
        sources=[np_source(request, model, s, *_dataset_size(session, s.dataset_id))
                 for s in members])
    return Response(out.model_dump_json(), media_type="application/json",
                    headers={"Cache-Control": "no-cache"})

