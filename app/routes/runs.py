"""What the pages that hold a request share (`/steer`, `/patch`): a GET shows the request of its
URL and runs nothing; a POST of the same fields runs it and shows the result (htmx: the result
part alone, with the request's shareable URL pushed into the address bar). Also the JSON answer
of an API route that computes, which is never cached."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import HTTPException, Request, Response
from pydantic import BaseModel
from starlette.datastructures import QueryParams

from app.inference_errors import InferenceError
from app.routes.errors import described
from app.routes.render import is_htmx, render, wants_json

R = TypeVar("R")


def live_models(request: Request) -> list[str] | None:
    """The models loaded for live inference, by name; None on a server without them."""
    live = request.app.state.live
    return None if live is None else sorted(live.models.models)


def fresh_json(out: BaseModel) -> Response:
    """A computed answer: JSON, not to be stored by caches."""
    return Response(out.model_dump_json(), media_type="application/json",
                    headers={"Cache-Control": "no-store"})


async def posted_form(request: Request) -> QueryParams:
    """The fields of a form POST (urlencoded, as browsers and htmx send it)."""
    return QueryParams((await request.body()).decode("utf-8", "replace"))


def show(request: Request, parse: Callable[[QueryParams], R], view: Callable[..., BaseModel],
         *, template: str, partial: str) -> Response:
    """The page of the request its URL holds (a malformed one: the page with the error, 422;
    its JSON: the error envelope)."""
    try:
        req, error = parse(request.query_params), None
    except HTTPException as exc:
        if wants_json(request):
            raise
        req, error = None, str(exc.detail)
    return render(request, view(req, error=error), template=template, partial=partial,
                  status_code=422 if error else 200)


async def run(request: Request, parse: Callable[[QueryParams], R],
              work: Callable[[R], Awaitable[BaseModel]], view: Callable[..., BaseModel], *,
              template: str, partial: str) -> Response:
    """The page after running the request of a POSTed form, with its result or its error (in
    place; htmx swaps only 2xx answers, so its part comes with 200)."""
    req = result = error = None
    status, headers = 200, {}
    try:
        req = parse(await posted_form(request))
        result = await work(req)
    except (HTTPException, InferenceError) as exc:
        status, error, headers = described(exc)
    page = view(req, result=result, error=error)
    response = render(request, page, template=template, partial=partial,
                      status_code=200 if is_htmx(request) else status)
    response.headers.update({**headers, "Cache-Control": "no-store"})
    if result is not None:
        response.headers["HX-Push-Url"] = page.url
    return response
