"""Activation patching: `POST /api/v1/patch` and the page `/patch`.

A sweep copies the clean prompt's activations into the corrupted prompt's run, one site at a
time (`workers.patching`), and answers the normalised logit difference of each (0 = corrupted,
1 = clean). The page opens with the indirect-object example; its URL holds the whole request and
opening it runs nothing. Running is a POST of the same fields (htmx swaps the heatmaps in and
pushes the shareable URL; without JavaScript the whole page comes back with them).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import ValidationError
from sqlalchemy import Row
from sqlalchemy.orm import Session
from starlette.datastructures import QueryParams

from app import urls
from app.db import queries
from app.intervention_schemas import IOI, MAX_PATCH_RUNS, PATCH_KINDS, PatchIn, PatchOut, PatchView
from app.keys import Scope
from app.routes import runs
from app.routes.access import requires
from app.routes.deps import invalid, model_queue, not_found, read_db, read_vocab
from app.routes.errors import documented, validation_message
from app.routes.render import page
from app.schemas import TokenRef

router = APIRouter()

ERRORS = documented(404, 413, 422, 503)
TOKENS_PER_PASS = 2048
"""Tokens of one batched forward pass of a sweep (the clean and corrupted runs included)."""


def patch_url(req: PatchIn) -> str:
    kinds = None if list(req.kinds) == list(PATCH_KINDS) else req.kinds
    return urls.patch(req.model, req.clean, req.corrupted, req.answer, req.wrong, kinds)


def parse_request(params: QueryParams, model: str) -> PatchIn:
    """The request of a patch page's URL or form; the indirect-object example where it names
    none (on `model` where it names no model)."""
    data: dict[str, object] = {"model": params.get("model") or model}
    for key in ("clean", "corrupted", "answer", "wrong"):
        data[key] = params[key] if key in params else IOI[key]
    kinds = [k.strip() for k in ",".join(params.getlist("kinds")).split(",") if k.strip()]
    if kinds:
        data["kinds"] = list(dict.fromkeys(kinds))
    try:
        return PatchIn.model_validate(data)
    except ValidationError as exc:
        raise invalid(validation_message(exc.errors())) from None


def _model(session: Session, slug: str) -> Row:
    row = queries.model_by_slug(session, slug=slug)
    if row is None:
        raise not_found(f"unknown model {slug!r}")
    return row


async def run_patch(request: Request, req: PatchIn) -> PatchOut:
    queue = model_queue(request)
    row = await read_db(request, _model, req.model)
    clean, corrupted, answer, wrong = await queue.tokenize(
        req.model, [req.clean, req.corrupted, req.answer, req.wrong])
    served = queue.models.model(req.model)
    if len(clean) != len(corrupted):
        raise invalid(f"the clean prompt is {len(clean)} tokens long and the corrupted one "
                      f"{len(corrupted)}: patching needs prompts of the same length")
    lead = 1 if served.bos_first else 0
    for name, ids in (("answer", answer), ("wrong", wrong)):
        if len(ids) - lead != 1:
            raise invalid(f"the {name} {getattr(req, name)!r} is {len(ids) - lead} tokens; it "
                          "must be one token (mind the leading space, e.g. ' Mary')")
    batch = 2 + max(1, min(64, TOKENS_PER_PASS // len(clean)))

    def work(models):
        from workers.patching import sweep  # torch: only with loaded models

        return sweep(models.model(req.model).lm, clean, corrupted, answer[-1], wrong[-1],
                     kinds=list(req.kinds), batch_size=batch, max_runs=MAX_PATCH_RUNS)

    sw = await queue.call(work)
    vocab = await read_vocab(request, row)
    return PatchOut(
        model=req.model, clean_tokens=list(vocab.many(clean)),
        corrupted_tokens=list(vocab.many(corrupted)), clean_ids=clean, corrupted_ids=corrupted,
        answer=TokenRef(id=answer[-1], text=vocab.text(answer[-1])),
        wrong=TokenRef(id=wrong[-1], text=vocab.text(wrong[-1])),
        logit_diff_clean=sw.logit_diff_clean, logit_diff_corrupted=sw.logit_diff_corrupted,
        first_diff=sw.first_diff, resid=None if sw.resid is None else sw.resid.tolist(),
        heads=None if sw.heads is None else sw.heads.tolist(),
        mlp=None if sw.mlp is None else sw.mlp.tolist(), runs=sw.runs, passes=sw.passes,
        url=patch_url(req))


@router.post("/api/v1/patch", response_model=PatchOut, responses=ERRORS,
             summary="Patch clean activations into a corrupted run, at every layer and "
             "position, head and MLP", dependencies=[requires(Scope.live)])
async def patch_api(request: Request, body: PatchIn):
    return runs.fresh_json(await run_patch(request, body))


def _view(request: Request):
    """The patch page's context maker: the request (else the indirect-object example) and,
    after a run, its result or error."""
    loaded = runs.live_models(request)

    def make(req: PatchIn | None, **more) -> PatchView:
        if req is None:
            req = parse_request(QueryParams(""), (loaded or [""])[0])
        return PatchView(request=req, url=patch_url(req), api=urls.patch_api(),
                         live=loaded is not None, models=loaded or [req.model], **more)
    return make


def _parse(request: Request):
    """parse_request on the first loaded model where the request names none."""
    model = (runs.live_models(request) or [""])[0]
    return lambda params: parse_request(params, model)


@page(router, "/patch", name="patch", schema=PatchView,
      summary="The patch page: the request its URL holds (opening it runs nothing)")
async def patch_page(request: Request):
    return runs.show(request, _parse(request), _view(request), template="patch.html",
                     partial="_patch.html")


@router.post("/patch", include_in_schema=False, dependencies=[requires(Scope.live)])
async def patch_run(request: Request):
    """The patch page with the heatmaps of its request (htmx: the result part alone)."""
    return await runs.run(request, _parse(request), lambda req: run_patch(request, req),
                          _view(request), template="patch.html", partial="_patch.html")
