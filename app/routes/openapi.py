"""The OpenAPI description as this server answers: FastAPI's, completed with what each operation
needs and how it may be refused. Its scope (`x-scope`) and whether a key is optional on this
server; 401 and 403 where a key is needed or a browser on another site is refused, 429 where a
rate limit applies, 413 wherever a body is taken; and the error envelope (`ErrorOut`) in place
of FastAPI's own shape of a 422."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

from app.keys import Scope
from app.routes.access import Access, scope_of
from app.schemas import ErrorOut

ENVELOPE = {"$ref": "#/components/schemas/ErrorOut"}
WHY = {
    401: "no key, or a key that is unknown or revoked, where this needs one",
    403: "the key's scope is short of what this needs, or a browser sent it from another site",
    413: "the body is over the server's limit (FEATURESCOPE_MAX_BODY), or a text is too long",
    422: "malformed input",
    429: "too many requests that run the model from this key or address (see Retry-After)",
}


def _error(status: int) -> dict:
    return {"description": WHY.get(status, "error"),
            "content": {"application/json": {"schema": ENVELOPE}}}


def _complete_operation(op: dict, scope: Scope, explicit: bool, access: Access) -> None:
    free = access.free(scope) and not explicit
    keys = [{"ApiKey": []}, {"Bearer": []}]
    op["security"] = keys + ([{}] if free else [])
    op["x-scope"] = scope.value
    note = (f"Scope `{scope.value}`: open on this server; a key is optional." if free else
            f"Needs a key with scope `{scope.value}`"
            + (" in the request's headers (a GET runs the model only with one)." if explicit
               else "."))
    op["description"] = f"{op.get('description', '')}\n\n{note}".strip()
    responses = op.setdefault("responses", {})
    wanted = ([401, 403] if not free else []) + ([403] if scope is not Scope.read else []) \
        + ([429] if scope is Scope.live else []) + ([413] if "requestBody" in op else [])
    for status in wanted:
        responses.setdefault(str(status), _error(status))
    bad = responses.get("422")
    if bad is not None and "HTTPValidationError" in str(bad):
        responses["422"] = _error(422)


def complete(app: FastAPI, spec: dict) -> dict:
    access: Access = app.state.access
    spec.setdefault("components", {}).setdefault("schemas", {}).setdefault(
        "ErrorOut", ErrorOut.model_json_schema())
    for route in iter_route_contexts(app.routes):  # included routers' routes, with their context
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        found = scope_of(route) or (Scope.read, False)  # reading: open unless the settings
        ops = spec["paths"].get(route.path_format, {})  # close it (then a route declares it)
        for method in route.methods:
            op = ops.get(method.lower())
            if op is not None:
                _complete_operation(op, *found, access)
    for schemas in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{schemas}" not in str(spec["paths"]):
            spec["components"]["schemas"].pop(schemas, None)
    return spec
