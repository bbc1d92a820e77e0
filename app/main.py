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
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlalchemy import Engine, event

from app import urls
from app.config import Settings
from app.db.engine import make_engine
from app.db.queries import VocabCache, half_table
from app.live import LiveService, start_live
from app.routes import api, docs, errors, features, models, neuronpedia, sources
from app.routes import live as live_routes
from app.routes.present import GLOBALS

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES_DIR = ROOT / "templates"
STATIC_DIR = ROOT / "static"
HTMX = STATIC_DIR / "vendor" / "htmx.min.js"

SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self'; "
     b"img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
     b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


class SecurityHeaders:
    """Pure ASGI middleware: a strict Content-Security-Policy (no inline script, so corpus text
    could run nothing even if it escaped) and nosniff on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        return await self.app(scope, receive, send_with_headers)


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
    env.globals.update(GLOBALS, urls=urls, build=build, has_htmx=HTMX.is_file())
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


def create_app(settings: Settings, *, engine: Engine | None = None,
               live: LiveService | None = None) -> FastAPI:
    """The explorer over `engine` (default: settings.db_url). The schema must be up to date
    (`serve` upgrades it first). `live`: the loaded models for your own text (`serve --live`)."""
    app = FastAPI(title="featurescope",
                  summary="Neurons and SAE features of transformer language models",
                  description="Every page answers as JSON with `.json` appended to its URL. "
                  "Errors share one envelope: `{\"ok\": false, \"status\": 404, \"error\": ...}`.",
                  version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine if engine is not None else make_engine(settings.db_url)
    tune_for_reads(app.state.engine)
    app.state.build = build_id()
    app.state.templates = make_templates(app.state.build)
    app.state.vocabs = VocabCache()
    app.state.live = live
    errors.install(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Fixed paths (/docs, /api/..., /search, /tokens) before the /{model}/... patterns.
    for module in (docs, api, neuronpedia, live_routes, features, models, sources):
        app.include_router(module.router)
    app.add_middleware(SecurityHeaders)
    return app


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
    if not HTMX.is_file():
        log.warning("%s is missing (run static/fetch_vendor.sh): pages work, without partial "
                    "updates", HTMX.relative_to(ROOT))
    print(f"serving {engine.url.render_as_string(hide_password=True)} on http://{host}:{port}",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False,
                access_log=settings.access_log)
    return 0
