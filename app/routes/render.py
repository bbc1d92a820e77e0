"""The last step every view shares: one context object out as a page, an htmx partial or JSON,
with the ETag of a finished source and a 304 for a matching If-None-Match."""

from __future__ import annotations

from fastapi import Request, Response
from pydantic import BaseModel

from app.urls import JSON_SUFFIX


def wants_json(request: Request) -> bool:
    path = request.url.path
    return path.endswith(JSON_SUFFIX) or path.startswith("/api/")


def is_htmx(request: Request) -> bool:
    """An htmx request for a fragment (a boosted one and a history restore want the page)."""
    headers = request.headers
    return (headers.get("hx-request") == "true" and headers.get("hx-boosted") != "true"
            and headers.get("hx-history-restore-request") != "true")


def etag(request: Request, version_hash: str | None) -> str | None:
    """The ETag of a page of a finished source: its version hash, the build of the server
    (templates and static files) and the representation. None while a source is building."""
    if not version_hash:
        return None
    variant = "j" if wants_json(request) else ("h" if is_htmx(request) else "p")
    if request.app.state.live is not None:  # pages offer your own text only when live
        variant += "l"
    return f'"{version_hash}-{request.app.state.build}-{variant}"'


def json_headers(tag: str | None) -> dict[str, str]:
    """The headers of a JSON answer that a view writes itself (the ones `render` sends)."""
    return _headers(tag)


def _headers(tag: str | None) -> dict[str, str]:
    headers = {"Cache-Control": "no-cache", "Vary": "HX-Request"}
    if tag:
        headers["ETag"] = tag
    return headers


def not_modified(request: Request, tag: str | None) -> Response | None:
    """A 304 when the client already holds this version, else None."""
    if tag is None:
        return None
    sent = request.headers.get("if-none-match")
    if not sent:
        return None
    tags = {t.strip().removeprefix("W/") for t in sent.split(",")}
    if tag in tags or "*" in tags:
        return Response(status_code=304, headers=_headers(tag))
    return None


def render(request: Request, ctx: BaseModel, *, template: str, partial: str | None = None,
           tag: str | None = None, status_code: int = 200) -> Response:
    """JSON for `.json` and /api/ URLs, the partial alone for htmx, else the whole page."""
    headers = _headers(tag)
    if wants_json(request):
        return Response(ctx.model_dump_json(), status_code=status_code,
                        media_type="application/json", headers=headers)
    name = partial if partial and is_htmx(request) else template
    return request.app.state.templates.TemplateResponse(
        request, name, {"ctx": ctx}, status_code=status_code, headers=headers)


def page(router, path: str, *, name: str, schema: type[BaseModel], summary: str,
         responses: dict | None = None):
    """Register a view for a page and for its JSON twin (`.json` appended; `/.json` for `/`).
    Only the JSON one appears in the OpenAPI description, with its schema and error shape (and
    `responses`, more answers it may give)."""
    from app.schemas import ErrorOut

    json_path = "/.json" if path == "/" else path + JSON_SUFFIX
    errors = {404: {"model": ErrorOut}, 422: {"model": ErrorOut}, **(responses or {})}

    def register(view):
        router.add_api_route(json_path, view, methods=["GET"], name=f"{name}_json",
                             response_model=schema, summary=summary, responses=errors)
        router.add_api_route(path, view, methods=["GET"], name=name, include_in_schema=False)
        return view

    return register
