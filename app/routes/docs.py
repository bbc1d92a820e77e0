"""`/docs`: the OpenAPI description as a page rendered here (no CDN, no script), next to
`/openapi.json` for tools. The bundled Swagger UI of FastAPI would load its code from a CDN,
which closed networks do not reach and the Content-Security-Policy forbids."""

from __future__ import annotations

from fastapi import APIRouter, Request

router = APIRouter()


def _type(schema: dict) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[1]
    if "anyOf" in schema:
        return " | ".join(_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(repr(v) for v in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list[{_type(schema.get('items', {}))}]"
    if kind == "null":
        return "null"
    return {"integer": "int", "number": "float", "string": "str", "boolean": "bool",
            "object": "object"}.get(kind, kind)


def describe(spec: dict) -> dict:
    """The parts of an OpenAPI description the page shows: operations and schemas."""
    operations = []
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            params = [{"name": p["name"], "where": p["in"], "type": _type(p.get("schema", {})),
                       "required": p.get("required", False),
                       "description": p.get("description") or p.get("schema", {}).get(
                           "description", "")} for p in op.get("parameters", [])]
            answers = []
            for status, r in op.get("responses", {}).items():
                body = r.get("content", {}).get("application/json", {}).get("schema")
                answers.append({"status": status, "type": _type(body) if body else "",
                                "description": r.get("description", "")})
            operations.append({"method": method.upper(), "path": path,
                               "summary": op.get("summary", ""), "params": params,
                               "answers": answers, "scope": op.get("x-scope", ""),
                               "key_optional": {} in op.get("security", [{}])})
    schemas = []
    for name, s in spec.get("components", {}).get("schemas", {}).items():
        if name in ("HTTPValidationError", "ValidationError"):
            continue
        required = set(s.get("required", []))
        fields = [{"name": k, "type": _type(v), "required": k in required,
                   "description": v.get("description", "")}
                  for k, v in s.get("properties", {}).items()]
        schemas.append({"name": name, "description": s.get("description", ""),
                        "fields": fields})
    return {"title": spec["info"]["title"], "version": spec["info"]["version"],
            "description": spec["info"].get("description", ""), "operations": operations,
            "schemas": schemas}


@router.get("/docs", include_in_schema=False)
def docs(request: Request):
    ctx = describe(request.app.openapi())
    return request.app.state.templates.TemplateResponse(request, "docs.html", {"ctx": ctx})
