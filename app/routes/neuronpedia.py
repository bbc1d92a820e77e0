"""`GET /api/feature/{model}/{source}/{index}`: a feature in the shape of Neuronpedia's endpoint
of the same path, so scripts written for Neuronpedia run here with another base URL.

It is made from the same context object as the feature page (`build_feature`)."""

from __future__ import annotations

import math

from fastapi import APIRouter, Request, Response

from app.db import explanations as explanation_db
from app.explanations import page_version
from app.routes.deps import FeatureIndex, ModelSlug, SessionDep, SourceSlug, load_source
from app.routes.explanations import np_explanation
from app.routes.features import build_feature, explained
from app.routes.render import etag, not_modified
from app.schemas import ErrorOut, ExampleOut, FeaturePage, NpActivation, NpFeature

router = APIRouter()


def _activation(ctx: FeaturePage, ex: ExampleOut, kind: str, lo: float, hi: float,
                contains: float) -> NpActivation:
    values = list(ex.acts)
    values[ex.peak_index] = ex.peak_value  # the exact float32 peak, so values[i] == maxValue
    return NpActivation(
        id=f"{ctx.model}@{ctx.source}:{ctx.index}:{kind}:{ex.rank}", modelId=ctx.model,
        layer=ctx.source, index=str(ctx.index), dataIndex=str(ex.seq_idx), tokens=ex.tokens,
        values=values, maxValue=ex.peak_value, maxValueTokenIndex=ex.peak_index,
        minValue=min(values), binMin=lo, binMax=hi, binContains=contains,
        qualifyingTokenIndex=ex.peak_index)


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


def to_neuronpedia(ctx: FeaturePage) -> NpFeature:
    prefix = f"{ctx.layer}-"
    set_name = ctx.source[len(prefix):] if ctx.source.startswith(prefix) else ctx.source
    acts = [_activation(ctx, ex, "top", -1, -1, -1) for ex in ctx.top]
    share = 1 / len(ctx.quantiles) if ctx.quantiles else 0.0
    for g in ctx.quantiles:
        acts += [_activation(ctx, ex, g.name, g.lo, g.hi, share) for ex in g.examples]
    heights, values = _freq_hist(ctx)
    return NpFeature(
        modelId=ctx.model, layer=ctx.source, index=str(ctx.index), sourceSetName=set_name,
        hookName=ctx.hook_name, maxActApprox=ctx.stats.max_act,
        frac_nonzero=ctx.stats.frac_active,
        pos_str=[t.text for t in ctx.top_logits], pos_values=[t.value for t in ctx.top_logits],
        neg_str=[t.text for t in ctx.bottom_logits],
        neg_values=[t.value for t in ctx.bottom_logits],
        freq_hist_data_bar_heights=heights, freq_hist_data_bar_values=values, activations=acts,
        explanations=[np_explanation(ctx.model, ctx.source, ctx.index, e)
                      for e in ctx.explanations])


@router.get("/api/feature/{model}/{source}/{index}", response_model=NpFeature,
            summary="A feature shaped like Neuronpedia's /api/feature answer",
            responses={404: {"model": ErrorOut}, 422: {"model": ErrorOut}})
def neuronpedia_feature(request: Request, session: SessionDep, model: ModelSlug,
                        source: SourceSlug, index: FeatureIndex):
    src = load_source(session, model, source)
    version = explanation_db.version(session)
    tag = etag(request, page_version(src.version_hash if src.status == "ready" else None,
                                     version))
    if (cached := not_modified(request, tag)) is not None:
        return cached
    ctx = build_feature(session, request.app.state.vocabs, src, index, explained(
        session, request.app.state.explanations, src, index, version))
    headers = {"Cache-Control": "no-cache", **({"ETag": tag} if tag else {})}
    return Response(to_neuronpedia(ctx).model_dump_json(), media_type="application/json",
                    headers=headers)
