"""A GET on a path that is served only for other methods (`/api/v1/activations`, POST) answers
405 with `Allow`, instead of falling through to a `/{model}/{source}/{index}` pattern that would
read it as a feature. (HEAD is answered wherever GET is by `app.middleware.HeadAsGet`.)"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.routing import APIRoute, iter_route_contexts


def _refusal(allow: str):
    async def refuse(request: Request):
        raise HTTPException(405, f"{request.method} is not served at {request.url.path}: "
                                 f"it takes {allow}", headers={"Allow": allow})

    return refuse


def refusals(routers: list[APIRouter]) -> APIRouter:
    """A router, to include before `routers`, with a 405 for GET on every path they serve
    without GET."""
    served: dict[str, set[str]] = {}
    for router in routers:
        for route in iter_route_contexts(router.routes):
            if isinstance(route.original_route, APIRoute):
                served.setdefault(route.path_format, set()).update(route.methods)
    out = APIRouter()
    for path, methods in served.items():
        if "GET" not in methods:
            out.add_api_route(path, _refusal(", ".join(sorted(methods))), methods=["GET"],
                              include_in_schema=False)
    return out
