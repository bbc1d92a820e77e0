"""Ablation: `POST /api/v1/ablate` (the next-token loss of a text with features zeroed, held at
their mean over the harvest, or at a value), and the "effect" box of a feature page, which posts
to `/{model}/{source}/{index}/effect` and shows a text (by default its top examples) with each
token coloured by how much its loss rose without the feature."""

from __future__ import annotations

import math

from fastapi import APIRouter, HTTPException, Request
from sqlalchemy import Row
from sqlalchemy.orm import Session

from app.db import queries
from app.db.tables import ExampleGroup
from app.inference_errors import InferenceError
from app.intervention_schemas import (
    AblatedFeature,
    AblateIn,
    AblateOut,
    EffectText,
    EffectView,
    MovedToken,
)
from app.keys import Scope
from app.routes import runs
from app.routes.access import requires
from app.routes.activations import ready_feature
from app.routes.deps import (
    FeatureIndex,
    ModelSlug,
    SourceSlug,
    invalid,
    load_source,
    model_queue,
    read_db,
    read_vocab,
)
from app.routes.errors import described, documented
from app.routes.features import build_feature
from app.routes.render import is_htmx

router = APIRouter()

ERRORS = documented(404, 413, 422, 503)
EFFECT_EXAMPLES = 3
"""Top examples the effect box runs when no text is given."""


def replacement(session: Session, src: Row, index: int, mode: str, value: float | None) -> float:
    """What a feature's activation is replaced by: 0, its mean over the harvest, or `value`."""
    if mode == "zero":
        return 0.0
    if mode == "mean":
        return float(queries.feature(session, source_id=src.id, index=index).mean_act)
    if value is None:
        raise invalid("mode value needs a value")
    return float(value)


def _resolve(session: Session, body: AblateIn) -> tuple[Row, list[tuple[str, int, float]]]:
    """The model's row and (source, index, replacement) of each feature; 404s for unknown ones."""
    out = []
    for f in body.features:
        src = ready_feature(session, body.model, f.source, f.index)
        out.append((f.source, f.index, replacement(session, src, f.index, body.mode, body.value)))
    return queries.model_by_slug(session, slug=body.model), out


def _ablate_runs(model: str, runs: list[list[int]], feats: list[tuple[str, int, float]],
                 top: int):
    """The queue's work: each run of token ids ablated, and the features' hook points."""
    def work(models):
        from workers.ablation import Ablation, ablate  # torch: only with loaded models

        served = models.model(model)
        items = [Ablation(s, i, r) for s, i, r in feats]
        return ([ablate(served, ids, items, top=top) for ids in runs],
                [served.source(s).hook_name for s, _, _ in feats])
    return work


def _num(x) -> float | None:
    return None if math.isnan(x) else float(x)


async def run_ablation(request: Request, body: AblateIn) -> AblateOut:
    if (body.text is None) == (body.tokens is None):
        raise invalid("give exactly one of text or tokens")
    queue = model_queue(request)
    row, feats = await read_db(request, _resolve, body)
    if body.tokens is not None:
        queue.check_length(len(body.tokens))
        ids = list(body.tokens)
    else:
        ids = (await queue.tokenize(body.model, [body.text]))[0]
    (res,), hooks = await queue.call(_ablate_runs(body.model, [ids], feats, body.top))
    vocab = await read_vocab(request, row)
    delta = res.loss_ablated - res.loss_clean
    moved = [[] if i == 0 else [
        MovedToken(id=int(t), token=vocab.text(int(t)), clean=float(c), ablated=float(a),
                   delta=float(a - c))
        for t, c, a in zip(res.moved_ids[i], res.moved_clean[i], res.moved_ablated[i],
                           strict=True)] for i in range(len(ids))]
    return AblateOut(
        model=body.model, mode=body.mode,
        features=[AblatedFeature(source=s, index=i, hook_name=h, replacement=r)
                  for (s, i, r), h in zip(feats, hooks, strict=True)],
        tokens=list(vocab.many(ids)), token_ids=ids,
        loss_clean=[_num(x) for x in res.loss_clean],
        loss_ablated=[_num(x) for x in res.loss_ablated], delta=[_num(x) for x in delta],
        moved=moved, mean_loss_clean=float(res.loss_clean[1:].mean()),
        mean_loss_ablated=float(res.loss_ablated[1:].mean()))


@router.post("/api/v1/ablate", response_model=AblateOut, responses=ERRORS,
             summary="The next-token loss of a text with features ablated, and what moved",
             dependencies=[requires(Scope.live)])
async def ablate_api(request: Request, body: AblateIn):
    return runs.fresh_json(await run_ablation(request, body))


def _effect_runs(session: Session, src: Row, index: int) -> list[tuple[str, list[int], int]]:
    """(label, token ids, first shown position) of the top examples: each one's sequence up to
    the end of its window, shown from the window's start."""
    out = []
    for e in queries.examples(session, source_id=src.id, dataset_id=src.dataset_id, index=index):
        if e.group == ExampleGroup.top and len(out) < EFFECT_EXAMPLES:
            end = e.start + len(e.acts) // 2
            out.append((f"top example {e.rank + 1} (sequence {e.seq_idx})",
                        list(queries.decode_tokens(e.tokens, 0, end)), e.start))
    return out


async def _effect(request: Request, src: Row, index: int, text: str, mode: str) -> EffectView:
    queue = model_queue(request)
    if mode not in ("zero", "mean"):
        raise invalid(f"mode must be zero or mean, got {mode!r}")
    r = await read_db(request, replacement, src, index, mode, None)
    if text.strip():
        runs = [("your text", (await queue.tokenize(src.model_slug, [text]))[0], 0)]
    else:
        runs = await read_db(request, _effect_runs, src, index)
        if not runs:
            raise invalid("this feature has no top examples: give a text")
    results, _ = await queue.call(_ablate_runs(src.model_slug, [ids for _, ids, _ in runs],
                                               [(src.slug, index, r)], 0))
    vocab = await read_vocab(request, src)
    texts = []
    for (label, ids, first), res in zip(runs, results, strict=True):
        delta = res.loss_ablated - res.loss_clean
        texts.append(EffectText(
            label=label, tokens=list(vocab.many(ids[first:])),
            delta=[_num(x) for x in delta[first:]],
            loss_clean=[_num(x) for x in res.loss_clean[first:]],
            loss_ablated=[_num(x) for x in res.loss_ablated[first:]],
            mean_delta=float(delta[max(first, 1):].mean())))
    scale = max((abs(d) for t in texts for d in t.delta if d is not None), default=0.0)
    return EffectView(mode=mode, replacement=r, texts=texts, scale=scale)


def _stored(session: Session, vocabs, model: str, source: str, index: int, whole: bool):
    """The source row, and the feature page around the box (`whole`, else None)."""
    src = load_source(session, model, source)
    return src, build_feature(session, vocabs, src, index) if whole else None


@router.post("/{model}/{source}/{index}/effect", include_in_schema=False,
             dependencies=[requires(Scope.live)])
async def effect(request: Request, model: ModelSlug, source: SourceSlug, index: FeatureIndex):
    """The feature page with the effect of ablating the feature (htmx: that part alone)."""
    form = await runs.posted_form(request)
    text, mode = form.get("text", ""), form.get("mode", "zero")
    part = is_htmx(request) and request.headers.get("hx-target") == "effect-result"
    # the whole page (without JavaScript) around the box; the box alone for htmx
    src, ctx = await read_db(request, _stored, request.app.state.vocabs, model, source, index,
                             not part)
    view, error, status, headers = None, None, 200, {"Cache-Control": "no-store"}
    try:
        await read_db(request, ready_feature, model, source, index)
        view = await _effect(request, src, index, text, mode)
    except (HTTPException, InferenceError) as exc:
        status, error, more = described(exc)
        headers.update(more)
    page = {"ctx": ctx, "effect": view, "effect_error": error, "effect_text": text,
            "effect_mode": mode}
    return request.app.state.templates.TemplateResponse(
        request, "_effect.html" if part else "feature.html", page,
        status_code=200 if part else status, headers=headers)
