"""One error shape: the JSON envelope {"ok": false, "status": ..., "error": ...} for JSON and API
URLs, an error page for the others, and for htmx the message alone, swapped into the element
the request was to update. Malformed input answers 422, unknown things 404, and what
the loaded models refuse (`app.inference_errors`) the status its error names."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from app.inference_errors import InferenceError
from app.routes.render import is_htmx, wants_json
from app.schemas import ErrorOut

log = logging.getLogger(__name__)


def documented(*statuses: int) -> dict[int, dict]:
    """The `responses` of an API route: the error envelope under each of these statuses."""
    return {status: {"model": ErrorOut} for status in statuses}


def described(exc: HTTPException | InferenceError) -> tuple[int, str, dict[str, str]]:
    """(status, message, headers) of an error: what its answer says, or what a page that shows
    errors in place of its result shows."""
    if isinstance(exc, InferenceError):
        return exc.status, str(exc), exc.headers
    return exc.status_code, str(exc.detail), dict(exc.headers or {})


def in_place(call, *, as_json: bool):
    """(result, error message, status) of a page's search, whose page shows an error in place
    of its result: `call()`'s result, or what its HTTPException says. JSON raises instead."""
    try:
        return call(), None, 200
    except HTTPException as exc:
        if as_json:
            raise
        status, message, _ = described(exc)
        return None, message, status


def error_response(request: Request, status: int, message: str,
                   headers: dict[str, str] | None = None) -> Response:
    headers = {**(headers or {}), "Cache-Control": "no-store"}
    accept = request.headers.get("accept", "")
    if wants_json(request) or ("text/html" not in accept and "json" in accept):
        body = ErrorOut(status=status, error=message).model_dump_json()
        return Response(body, status_code=status, media_type="application/json", headers=headers)
    name = "error.html"
    target = request.headers.get("hx-target")
    if is_htmx(request):  # the message in place of what the request was to update
        name = "_alert.html"
        if target and target.replace("-", "").replace("_", "").isalnum():
            headers.update({"HX-Retarget": f"#{target}", "HX-Reswap": "innerHTML"})
    return request.app.state.templates.TemplateResponse(
        request, name, {"status": status, "message": message}, status_code=status,
        headers=headers)


def validation_message(errors: list) -> str:
    """What a list of pydantic validation errors says, on one line (the first five)."""
    parts = []
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("path", "query", "body")]
        parts.append(f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "malformed request"


BODY_UNREADABLE = "There was an error parsing the body"
"""FastAPI's 400 for a body it could not decode (bytes that are not UTF-8, a broken form)."""


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = exc.detail if isinstance(exc.detail, str) else "error"
    status = exc.status_code
    if status == 404 and message == "Not Found":
        message = f"nothing at {request.url.path}"
    if status == 400 and message == BODY_UNREADABLE:  # malformed input: 422 like the rest
        status, message = 422, "request: the body could not be read (not UTF-8 JSON or a form)"
    return error_response(request, status, message, dict(exc.headers or {}))


async def _inference_error(request: Request, exc: InferenceError) -> Response:
    return error_response(request, *described(exc))


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return error_response(request, 422, validation_message(exc.errors()))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("error serving %s", request.url.path, exc_info=exc)
    return error_response(request, 500, "internal server error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(InferenceError, _inference_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _server_error)
