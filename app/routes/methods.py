"""A GET on a path that is served only for other methods (`/api/v1/activations`, POST) answers
405 with `Allow`, instead of falling through to a `/{model}/{source}/{index}` pattern that would
read it as a feature. (HEAD is answered wherever GET is by `app.middleware.HeadAsGet`.)"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from fastapi.routing import APIRoute
from starlette.routing import Route


def _refusal(allow: str):
    async def refuse(request: Request):
        raise HTTPException(405, f"{request.method} is not served at {request.url.path}: "
                                 f"it takes {allow}", headers={"Allow": allow})

    return refuse


def refuse_other_methods(app: FastAPI) -> None:
    """Put a 405 for GET in front of every path the routes serve without GET."""
    served: dict[str, set[str]] = {}
    for route in app.router.routes:
        if isinstance(route, APIRoute):
            served.setdefault(route.path, set()).update(route.methods)
    for path, methods in served.items():
        if "GET" not in methods:
            app.router.routes.insert(0, Route(path, _refusal(", ".join(sorted(methods))),
                                              methods=["GET"], include_in_schema=False))
