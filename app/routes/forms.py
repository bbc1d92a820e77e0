"""The HTML forms' POSTs (the try box, the search box, lists): a browser's
`application/x-www-form-urlencoded` body read into a pydantic model. No multipart: the forms
send only short texts. The body is capped before it is read (`app.middleware.BodyLimit`)."""

from __future__ import annotations

from typing import TypeVar
from urllib.parse import parse_qsl

from fastapi import HTTPException, Request
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

FORM_TYPE = "application/x-www-form-urlencoded"


def _describe(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'form'}: {e['msg']}"
                     for e in exc.errors()[:5])


async def read_form(request: Request, model: type[M]) -> M:
    """The form's fields as `model` (the last value of a repeated field); 422 for a body that
    is not a form, or fields the model refuses."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != FORM_TYPE:
        raise HTTPException(422, f"send the form as {FORM_TYPE}")
    body = await request.body()
    try:
        fields = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                                max_num_fields=100, errors="strict"))
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(422, "the form is not valid UTF-8 or has too many fields") from None
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise HTTPException(422, _describe(exc)) from None
