"""A bounded schemathesis run against the OpenAPI description (SQLite and PostgreSQL, with an
admin key and without a key, a server bound to every interface so that keys count): no 5xx
but a documented 503, and no answer that breaks the description. The run with the models loaded
(`serve --live`) is in test_web_live.py."""

from __future__ import annotations

from sqlalchemy.orm import Session
from support import openapi_failures

from app.config import Settings
from app.keys import create_key
from app.main import create_app

EXAMPLES = 25


def _fuzz(db, headers: dict[str, str], examples: int) -> None:
    app = create_app(Settings(database_url=db.url, host="0.0.0.0"), engine=db.engine)
    failures = openapi_failures(app, headers=headers, max_examples=examples)
    assert not failures, "\n\n".join(failures)


def test_the_answers_keep_to_the_openapi_description(llama_db):
    """With an admin key: every operation runs, on SQLite and PostgreSQL."""
    with Session(llama_db.engine) as session:
        key = create_key(session, name="fuzz", scope="admin")[1]
    _fuzz(llama_db, {"x-api-key": key}, EXAMPLES)


def test_the_refusals_keep_to_the_openapi_description(web_db):
    """Without a key: what needs one answers its documented 401, the rest as with one."""
    _fuzz(web_db, {}, EXAMPLES // 3)
