"""Steering: `POST /api/v1/steer`, the same shaped like Neuronpedia's `POST /api/steer`, and the
page `/steer`.

The page's URL holds the whole request (`urls.steer`), and opening it runs nothing: it shows
the request with a Run button, so that a link from anywhere cannot spend the server's compute.
Running is a POST of the same fields: htmx swaps the result in and pushes the shareable URL;
without JavaScript the whole page comes back with the result and a link to the request.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import QueryParams

from app import urls
from app.db import queries
from app.intervention_schemas import (
    DEFAULT_PROMPT,
    Continuation,
    GeneratedToken,
    NpLogprob,
    NpSteerIn,
    NpSteerOut,
    NpTopLogprob,
    SteeredFeature,
    SteerIn,
    SteerOut,
    SteerView,
    TokenLogprob,
)
from app.keys import Scope
from app.routes import runs
from app.routes.access import requires
from app.routes.activations import ready_feature
from app.routes.deps import invalid, model_queue, not_found, read_db, read_vocab
from app.routes.errors import documented, validation_message
from app.routes.render import page

router = APIRouter()

ERRORS = documented(404, 413, 422, 503)
SETTINGS = ("method", "normalize", "n_tokens", "temperature", "seed", "top_logprobs",
            "freq_penalty")
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def steer_url(req: SteerIn) -> str:
    """The steer page of a request; settings at their defaults are left out."""
    fields = SteerIn.model_fields
    settings = {k: getattr(req, k) for k in SETTINGS if getattr(req, k) != fields[k].default}
    return urls.steer(req.model, req.prompt, [(f.source, f.index, f.strength)
                                              for f in req.features], **settings)


def parse_request(params: QueryParams) -> SteerIn | None:
    """The request a steer page's URL or form holds (`urls.steer`; without a prompt, the
    default one); None when it names no model. Malformed values are a 422 that says which."""
    if not params.get("model"):
        return None
    features = []
    for text in params.getlist("f"):
        if not text.strip():
            continue
        parts = text.strip().rsplit(":", 2)
        if len(parts) != 3:
            raise invalid(f"f={text!r}: expected SOURCE:INDEX:STRENGTH, e.g. 6-mlp:42:8")
        features.append({"source": parts[0], "index": parts[1], "strength": parts[2]})
    data: dict[str, object] = {"model": params["model"],
                               "prompt": params.get("prompt", DEFAULT_PROMPT),
                               "features": features}
    for key in SETTINGS:
        value = params.get(key, "").strip()
        if key == "normalize" and value.lower() in _TRUE + _FALSE:
            data[key] = value.lower() in _TRUE
        elif value:
            data[key] = value
    try:
        return SteerIn.model_validate(data)
    except ValidationError as exc:
        raise invalid(validation_message(exc.errors())) from None


def _check(session: Session, req: SteerIn):
    """The model's row; a 404 for an unknown model or feature."""
    row = queries.model_by_slug(session, slug=req.model)
    if row is None:
        raise not_found(f"unknown model {req.model!r}")
    for f in req.features:
        ready_feature(session, req.model, f.source, f.index)
    return row


async def run_steer(request: Request, req: SteerIn) -> SteerOut:
    queue = model_queue(request)
    row = await read_db(request, _check, req)
    ids = (await queue.tokenize(req.model, [req.prompt]))[0]

    def work(models):
        from workers.steering import SteerFeature, steer  # torch: only with loaded models

        served = models.model(req.model)
        feats = [SteerFeature(f.source, f.index, f.strength) for f in req.features]
        default, steered = steer(
            served, ids, feats, method=req.method, normalize=req.normalize,
            n_tokens=req.n_tokens, temperature=req.temperature, seed=req.seed,
            top_logprobs=req.top_logprobs, freq_penalty=req.freq_penalty)
        decode = served.lm.tokenizer.decode
        hooks = [served.source(f.source).hook_name for f in req.features]
        return default, steered, decode(default.ids), decode(steered.ids), hooks

    default, steered, default_text, steered_text, hooks = await queue.call(work)
    vocab = await read_vocab(request, row)

    def continuation(gen, text: str) -> Continuation:
        tokens = []
        for i, (tok, lp) in enumerate(zip(gen.ids, gen.logprobs, strict=True)):
            top = [TokenLogprob(id=t, token=vocab.text(t), logprob=v)
                   for t, v in zip(gen.top_ids[i], gen.top_logprobs[i], strict=True)
                   ] if gen.top_ids else []
            tokens.append(GeneratedToken(id=tok, token=vocab.text(tok), logprob=lp, top=top))
        return Continuation(text=text, tokens=tokens)

    return SteerOut(
        model=req.model, prompt=req.prompt, prompt_tokens=list(vocab.many(ids)), prompt_ids=ids,
        features=[SteeredFeature(source=f.source, index=f.index, strength=f.strength,
                                 hook_name=h) for f, h in zip(req.features, hooks, strict=True)],
        method=req.method, normalize=req.normalize, temperature=req.temperature, seed=req.seed,
        default=continuation(default, default_text), steered=continuation(steered, steered_text),
        url=steer_url(req))


@router.post("/api/v1/steer", response_model=SteerOut, responses=ERRORS,
             summary="Generate without and with features steered (added, set or capped)",
             dependencies=[requires(Scope.live)])
async def steer_api(request: Request, body: SteerIn):
    return runs.fresh_json(await run_steer(request, body))


def _np_logprobs(c: Continuation, with_top: bool) -> list[NpLogprob]:
    return [NpLogprob(token=t.token, logprob=t.logprob,
                      topLogprobs=[NpTopLogprob(token=x.token, logprob=x.logprob) for x in t.top]
                      if with_top else None) for t in c.tokens]


@router.post("/api/steer", response_model=NpSteerOut, responses=ERRORS,
             summary="Steering shaped like Neuronpedia's /api/steer",
             dependencies=[requires(Scope.live)])
async def neuronpedia_steer(request: Request, body: NpSteerIn):
    if body.stream:
        raise invalid("stream is not supported: send stream false (or leave it out)")
    other = [f.modelId for f in body.features if f.modelId != body.modelId]
    if other:
        raise invalid(f"every feature's modelId must be {body.modelId!r}, got {other[0]!r}")
    req = SteerIn(
        model=body.modelId, prompt=body.prompt,
        features=[{"source": f.layer, "index": f.index,
                   "strength": f.strength * body.strength_multiplier} for f in body.features],
        method="orthogonal" if body.steer_method == "ORTHOGONAL_DECOMP" else "additive",
        normalize=body.normalize_steering, n_tokens=body.n_tokens, temperature=body.temperature,
        seed=body.seed % 2**63, top_logprobs=body.n_logprobs, freq_penalty=body.freq_penalty)
    out = await run_steer(request, req)
    top = body.n_logprobs > 0
    return runs.fresh_json(NpSteerOut(
        STEERED=body.prompt + out.steered.text, DEFAULT=body.prompt + out.default.text,
        steeredLogProbs=_np_logprobs(out.steered, top),
        defaultLogProbs=_np_logprobs(out.default, top), shareUrl=out.url))


def _view(request: Request):
    """The steer page's context maker: the request (else a default one) and, after a run, its
    result or error."""
    loaded = runs.live_models(request)

    def make(req: SteerIn | None, **more) -> SteerView:
        if req is None:
            req = SteerIn(model=(loaded or [""])[0], prompt=DEFAULT_PROMPT)
        return SteerView(request=req, url=steer_url(req), api=urls.steer_api(),
                         live=loaded is not None, models=loaded or [req.model], **more)
    return make


def _runnable(params: QueryParams) -> SteerIn:
    req = parse_request(params)
    if req is None:
        raise invalid("choose a model")
    return req


@page(router, "/steer", name="steer", schema=SteerView,
      summary="The steer page: the request its URL holds (opening it runs nothing)")
async def steer_page(request: Request):
    return runs.show(request, parse_request, _view(request), template="steer.html",
                     partial="_steer.html")


@router.post("/steer", include_in_schema=False, dependencies=[requires(Scope.live)])
async def steer_run(request: Request):
    """The steer page with the result of its request (htmx: the result part alone)."""
    return await runs.run(request, _runnable, lambda req: run_steer(request, req),
                          _view(request), template="steer.html", partial="_steer.html")
