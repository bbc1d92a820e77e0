"""A bounded schemathesis run against the OpenAPI description (SQLite and PostgreSQL, with an
admin key and without a key, a server bound to every interface so that keys count): no 5xx
but a documented 503, and no answer that breaks the description. The run with the models loaded
(`serve --live`) is in test_web_live.py."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session
from support import disposing_engines, fresh_pg_url, needs_postgres, openapi_failures

from app.config import Settings
from app.keys import create_key
from app.main import create_app

EXAMPLES = 25


@pytest.fixture(scope="module",
                params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def served(request, web_db, write_db):
    """The app over the session's SQLite harvest, or over the tiny Llama's in PostgreSQL."""
    if request.param == "sqlite":
        yield web_db
        return
    needs_postgres()
    url = fresh_pg_url("fs_test_openapi")
    with disposing_engines(url):
        yield write_db(url, slice(0, 1))


@pytest.mark.parametrize("with_key", [True, False], ids=["admin key", "no key"])
def test_the_answers_keep_to_the_openapi_description(served, with_key):
    if not with_key and served.engine.dialect.name != "sqlite":
        pytest.skip("the refusals without a key read no table: SQLite covers them")
    app = create_app(Settings(database_url=served.url, host="0.0.0.0"), engine=served.engine)
    headers = {}
    if with_key:
        with Session(served.engine) as session:
            headers["x-api-key"] = create_key(session, name="fuzz", scope="admin")[1]
    failures = openapi_failures(app, headers=headers,
                                max_examples=EXAMPLES if with_key else EXAMPLES // 3)
    assert not failures, "\n\n".join(failures)
