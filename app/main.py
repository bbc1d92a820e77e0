"""The web explorer: `create_app(settings)` and `serve` (the `featurescope serve` command).

Reads the database only; imports no torch and no `workers`."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio.to_thread
from fastapi import FastAPI, HTTPException
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlalchemy import Engine, event

from app import urls
from app.config import Settings
from app.db.engine import make_engine
from app.db.queries import VocabCache, half_table
from app.explanation_search import SearchIndex
from app.explanations import ExplanationCache
from app.keys import Scope
from app.middleware import outermost
from app.model_queue import ModelQueue, start_live
from app.routes import (
    ablate,
    activations,
    api,
    docs,
    errors,
    explanations,
    features,
    lists,
    methods,
    models,
    neuronpedia,
    neuronpedia_lists,
    neuronpedia_live,
    openapi,
    patch,
    relations,
    search,
    sources,
    steer,
    tokens,
    trial,
)
from app.routes.access import Access, is_loopback, requires
from app.routes.heads import head_cells, row_text
from app.routes.intervention_present import GLOBALS as INTERVENTION_GLOBALS
from app.routes.present import GLOBALS

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES_DIR = ROOT / "templates"
STATIC_DIR = ROOT / "static"
HTMX = STATIC_DIR / "vendor" / "htmx.min.js"

WORKER_THREADS = 2 * (os.cpu_count() or 1) + 2
"""Threads that run the sync views. The work of a view is mostly CPU under the GIL (rows from
SQLite, pydantic, Jinja), so more threads only add contention: on 2 cores under 32 concurrent
requests, 2 to 6 threads cost 10-25% less CPU per feature JSON than anyio's default of 40."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    anyio.to_thread.current_default_thread_limiter().total_tokens = WORKER_THREADS
    await anyio.to_thread.run_sync(half_table)  # the float16 decoding table, before requests
    yield


def build_id() -> str:
    """A short hash of the templates and static files: part of every ETag and asset URL, so a
    new release never serves a stale page from a cache."""
    h = hashlib.sha256()
    for base in (TEMPLATES_DIR, STATIC_DIR):
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:10]


def make_templates(build: str) -> Jinja2Templates:
    env = Environment(loader=FileSystemLoader(TEMPLATES_DIR), autoescape=select_autoescape(),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                      auto_reload=False)
    env.globals.update(GLOBALS, **INTERVENTION_GLOBALS, head_cells=head_cells, row_text=row_text,
                       urls=urls, build=build, has_htmx=HTMX.is_file())
    return Jinja2Templates(env=env)


def tune_for_reads(engine: Engine) -> None:
    """SQLite: map the database file into memory and keep a larger page cache per connection,
    so feature pages read their rows without copying pages through read() calls."""
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _read_pragmas(dbapi_conn, _record):  # pragma: no cover - runs per connection
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA mmap_size=1073741824")
        cur.execute("PRAGMA cache_size=-32768")
        cur.close()


class Assets(StaticFiles):
    """The files under static/ that pages load (styles, scripts, images), and nothing else
    there (not the script that fetches the vendored ones, nor its version stamp)."""

    SUFFIXES = frozenset({".css", ".js", ".svg", ".png", ".ico", ".woff2"})

    async def get_response(self, path: str, scope):
        if Path(path).suffix not in self.SUFFIXES:
            raise HTTPException(404, f"nothing at /static/{path}")
        return await super().get_response(path, scope)


class Explorer(FastAPI):
    """FastAPI, with `app.middleware.outermost` around its whole stack (its error handling
    included)."""

    def build_middleware_stack(self):
        return outermost(super().build_middleware_stack(),
                         max_bytes=self.state.settings.max_body)

    def openapi(self) -> dict:
        spec = super().openapi()
        if getattr(self, "_completed", None) is not spec:
            self._completed = openapi.complete(self, spec)
        return spec


def create_app(settings: Settings, *, engine: Engine | None = None,
               live: ModelQueue | None = None) -> FastAPI:
    """The explorer over `engine` (default: settings.db_url). The schema must be up to date
    (`serve` upgrades it first). `live`: the loaded models for your own text (`serve --live`).
    `settings.host` is the address the server binds to (loopback: local requests need no key)."""
    access = Access(settings)
    # Reading needs a key only where the settings close it; where it is open (the default),
    # the hot read paths skip the check altogether.
    app = Explorer(title="featurescope",
                   summary="Neurons and SAE features of transformer language models",
                   description="Every page answers as JSON with `.json` appended to its URL. "
                   "Errors share one envelope: `{\"ok\": false, \"status\": 404, \"error\": ...}`."
                   " What runs the model or writes needs an API key with its scope, sent as "
                   "`x-api-key` or `Authorization: Bearer` (each operation says which).",
                   version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan,
                   dependencies=[] if Scope.read in access.open else [requires(Scope.read)])
    app.state.settings = settings
    app.state.access = access
    app.state.engine = engine if engine is not None else make_engine(settings.db_url)
    tune_for_reads(app.state.engine)
    app.state.build = build_id()
    app.state.templates = make_templates(app.state.build)
    app.state.vocabs = VocabCache()
    app.state.live = live
    app.state.explanations = ExplanationCache()
    app.state.search = SearchIndex()
    errors.install(app)
    app.mount("/static", Assets(directory=STATIC_DIR), name="static")
    # Fixed paths (/docs, /api/..., /search, /tokens, /steer, /patch, /lists) before the
    # /{model}/... patterns.
    routers = [m.router for m in (docs, api, neuronpedia, neuronpedia_live, neuronpedia_lists,
                                  activations, search, explanations, tokens, steer, patch, ablate,
                                  lists, trial, relations, features, models, sources)]
    for router in [methods.refusals(routers), *routers]:
        app.include_router(router)
    return app


def _warn_open(access: Access, host: str) -> None:
    if is_loopback(host):
        log.info("bound to loopback: requests from this machine need no key")
        return
    wide = sorted(s.value for s in access.open if s is not Scope.read)
    if wide:
        log.warning("serving on %s with %s open to anyone, without a key "
                    "(FEATURESCOPE_OPEN_SCOPES)", host, ", ".join(wide))


def serve(settings: Settings) -> int:
    """Upgrade the schema of settings.db_url, then serve it on settings.host:port until
    interrupted (with the live models when settings.live)."""
    import uvicorn

    from app.db.engine import upgrade

    engine = make_engine(settings.db_url)
    upgrade(engine)
    live = start_live(engine, settings) if settings.live else None
    if live is not None and not live.models.models:
        log.warning("--live: no model could be loaded; serving the stored features only")
    app = create_app(settings, engine=engine, live=live)
    host, port = settings.host, settings.port
    _warn_open(app.state.access, host)
    if not HTMX.is_file():
        log.warning("%s is missing (run static/fetch_vendor.sh): pages work, without partial "
                    "updates", HTMX.relative_to(ROOT))
    print(f"serving {engine.url.render_as_string(hide_password=True)} on http://{host}:{port}",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False,
                access_log=settings.access_log)
    return 0
