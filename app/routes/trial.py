"""The "try your own text" box: `/{model}/{source}/{index}/try?text=...` is the feature page with
the text highlighted like its examples (htmx swaps in the `_try.html` part alone). Errors show
in the box, not as an error page, and without `serve --live` the box says how to enable it."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool

from app.inference_errors import InferenceError
from app.model_queue import MAX_TEXT_CHARS
from app.routes.deps import FeatureIndex, ModelSlug, SessionDep, SourceSlug, load_source
from app.routes.errors import described
from app.routes.features import build_feature
from app.routes.render import is_htmx
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


@router.get("/{model}/{source}/{index}/try", include_in_schema=False)
async def try_text(request: Request, session: SessionDep, model: ModelSlug, source: SourceSlug,
                   index: FeatureIndex,
                   text: Annotated[str, Query(max_length=MAX_TEXT_CHARS)] = ""):
    """The feature page with a text of the user's highlighted (htmx: that part alone)."""
    queue = request.app.state.live
    src = await run_in_threadpool(load_source, session, model, source)
    ctx = await run_in_threadpool(build_feature, session, request.app.state.vocabs, src, index)
    headers = {"Cache-Control": "no-store"}
    trial, error, status = None, None, 200
    if text.strip() and queue is not None:
        try:
            ids = (await queue.tokenize(model, [text]))[0]
            run = (await queue.call(
                lambda models: models.model(model).activations(source, index, [ids])))[0]
            vocab = await run_in_threadpool(request.app.state.vocabs.get, session,
                                            model_id=src.model_id,
                                            tokenizer_hash=src.tokenizer_hash)
            trial = text_example(ids, list(vocab.many(ids)), run.values, run.max_index,
                                 run.max_value)
        except (HTTPException, InferenceError) as exc:
            status, error, more = described(exc)
            headers.update(more)
    page = {"ctx": ctx, "trial": trial, "trial_text": text, "trial_error": error}
    name = "_try.html" if is_htmx(request) and request.headers.get("hx-target") == "try-result" \
        else "feature.html"
    # An htmx swap shows an error in place (htmx swaps only 2xx answers).
    code = 200 if name == "_try.html" else status
    return request.app.state.templates.TemplateResponse(request, name, page, status_code=code,
                                                        headers=headers)
