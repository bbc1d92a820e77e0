"""The "try your own text" box: `/{model}/{source}/{index}/try?text=...` is the feature page with
the text in the box, and the box's Run button POSTs it to the same path, which answers the page
with the text highlighted like the examples (htmx swaps in the `_try.html` part alone and puts
the GET URL in the address bar, so the link can be shared). A GET never runs the model: any page
on the web could link to it. Running needs the `live` scope; errors show in the box, and without
`serve --live` the box says how to enable it."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import ConfigDict, Field

from app import urls
from app.inference_errors import InferenceError
from app.keys import Scope
from app.model_queue import MAX_TEXT_CHARS
from app.routes.access import requires
from app.routes.deps import FeatureIndex, ModelSlug, SourceSlug, load_source, model_queue, read_db
from app.routes.errors import described
from app.routes.features import build_feature
from app.routes.forms import read_form
from app.routes.render import is_htmx
from app.schema_types import In
from app.schemas import ExampleOut

router = APIRouter()


def text_example(token_ids: list[int], tokens: list[str], values, max_index: int,
                 max_value: float) -> ExampleOut:
    """A text of the user's as an example of a feature: values rounded to float16 like stored
    windows, the peak exact."""
    acts = np.asarray(values, dtype=np.float32).astype(np.float16).astype(np.float64)
    return ExampleOut(rank=0, seq_idx=-1, start=0, peak_pos=max_index, peak_index=max_index,
                      peak_value=max_value, token_ids=token_ids, tokens=tokens,
                      acts=acts.tolist())


class TryForm(In):
    """The box, posted."""

    model_config = ConfigDict(extra="ignore")
    text: str = Field(max_length=MAX_TEXT_CHARS)


def _stored(session, vocabs, model: str, source: str, index: int):
    src = load_source(session, model, source)
    return src, build_feature(session, vocabs, src, index)


def _render(request: Request, ctx, text: str, trial=None, error: str | None = None,
            status: int = 200, push: str | None = None):
    page = {"ctx": ctx, "trial": trial, "trial_text": text, "trial_error": error}
    fragment = is_htmx(request) and request.headers.get("hx-target") == "try-result"
    headers = {"Cache-Control": "no-store"}
    if fragment and push:
        headers["HX-Push-Url"] = push
    # An htmx swap shows an error in place (htmx swaps only 2xx answers).
    return request.app.state.templates.TemplateResponse(
        request, "_try.html" if fragment else "feature.html", page,
        status_code=200 if fragment else status, headers=headers)


@router.get("/{model}/{source}/{index}/try", include_in_schema=False)
async def try_text(request: Request, model: ModelSlug, source: SourceSlug, index: FeatureIndex,
                   text: Annotated[str, Query(max_length=MAX_TEXT_CHARS)] = ""):
    """The feature page with the text in the box, ready to run."""
    _, ctx = await read_db(request, _stored, request.app.state.vocabs, model, source, index)
    return _render(request, ctx, text)


@router.post("/{model}/{source}/{index}/try", include_in_schema=False,
             dependencies=[requires(Scope.live)])
async def run_text(request: Request, model: ModelSlug, source: SourceSlug, index: FeatureIndex):
    """The feature page with the posted text run through the model and highlighted."""
    form = await read_form(request, TryForm)
    src, ctx = await read_db(request, _stored, request.app.state.vocabs, model, source, index)
    trial, error, status = None, None, 200
    try:
        if not form.text.strip():
            raise HTTPException(422, "type a text to run")
        queue = model_queue(request)
        ids = (await queue.tokenize(model, [form.text]))[0]
        run = (await queue.call(
            lambda models: models.model(model).activations(source, index, [ids])))[0]
        vocab = await read_db(request, lambda s: request.app.state.vocabs.get(
            s, model_id=src.model_id, tokenizer_hash=src.tokenizer_hash))
        trial = text_example(ids, list(vocab.many(ids)), run.values, run.max_index,
                             run.max_value)
    except (HTTPException, InferenceError) as exc:
        status, error, _ = described(exc)
    return _render(request, ctx, form.text, trial, error, status,
                   push=urls.try_text(model, source, index, form.text))
