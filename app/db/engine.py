"""Engines, sessions and schema upgrades."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from app.config import normalize_db_url

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def make_engine(url: str, **kwargs) -> Engine:
    """An engine for a SQLite file (WAL, synchronous=NORMAL, busy timeout) or PostgreSQL; a
    ValueError for a URL that is neither."""
    url = check_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - runs per connection
            cur = dbapi_conn.cursor()
            # Takes effect when the file is made (a no-op on an existing one). A feature's
            # example blocks (2.8 kB top and bottom, 0.7 kB quantile) leave a quarter of 4 kB
            # pages empty and a tenth of 8 kB ones (bench/scale.py: 12.4, 11.0, 9.9 kB each).
            cur.execute("PRAGMA page_size=16384")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to the newest migration (alembic upgrade head), or to `revision`;
    a revision older than the database's goes down to it."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        current = MigrationContext.configure(conn).get_current_revision()
        if revision != "head" and current is not None and current > revision:
            command.downgrade(cfg, revision)
        else:
            command.upgrade(cfg, revision)


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """A session whose work commits at the end of the block, or rolls back on error."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session


EXAMPLE_URLS = "sqlite:///PATH/featurescope.db or postgresql+psycopg://USER@HOST/DATABASE"


def check_url(url: str) -> str:
    """`url` with PostgreSQL's usual spellings normalized, or a ValueError saying why it is not a
    URL of a SQLite or PostgreSQL database."""
    url = normalize_db_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"{url!r} is not a database URL: give {EXAMPLE_URLS}") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"{parsed.render_as_string(hide_password=True)}: featurescope keeps "
                         f"its data in SQLite or PostgreSQL, not {parsed.get_backend_name()!r}: "
                         f"give {EXAMPLE_URLS}")
    return url


def database_problem(url: str, exc: SQLAlchemyError) -> str:
    """One line saying what is wrong with the database at `url`, from the error that using it
    raised: a SQLite path that is a folder, not writable or not a SQLite file; a PostgreSQL
    server that refuses, or lacks the database."""
    try:
        url = check_url(url)
    except ValueError as bad:
        return str(bad)
    cause = str(exc.orig if isinstance(exc, DBAPIError) else exc).strip().splitlines()
    why = cause[0].removeprefix("connection failed: ").strip() if cause else type(exc).__name__
    if url.startswith("sqlite"):
        path = Path(url.split("///", 1)[-1])
        if path.is_dir():
            return f"the database {path} is a folder, not a SQLite file: name a file in it, " \
                   f"e.g. sqlite:///{path / 'featurescope.db'}"
        if "not a database" in why:
            return f"{path} is not a SQLite database (a file of something else is there)"
        return f"cannot open or write the SQLite database {path} ({why}): choose a writable " \
               "location"
    if "does not exist" in why:
        name = make_url(url).database
        why += f" (create it: createdb {name}, or CREATE DATABASE \"{name}\")"
    return f"cannot use the database {make_url(url).render_as_string(hide_password=True)}: {why}"
