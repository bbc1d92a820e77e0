"""A bounded schemathesis run against the OpenAPI description (SQLite and PostgreSQL, with an
admin key and without a key, a server bound to every interface so that keys count): no 5xx
but a documented 503, and no answer that breaks the description. The run with the models loaded
(`serve --live`) is in test_web_live.py."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session
from support import openapi_failures

from app.config import Settings
from app.keys import create_key
from app.main import create_app

EXAMPLES = 25


@pytest.mark.parametrize("with_key", [True, False], ids=["admin key", "no key"])
def test_the_answers_keep_to_the_openapi_description(llama_db, with_key):
    if not with_key and llama_db.engine.dialect.name != "sqlite":
        pytest.skip("the refusals without a key read no table: SQLite covers them")
    app = create_app(Settings(database_url=llama_db.url, host="0.0.0.0"), engine=llama_db.engine)
    headers = {}
    if with_key:
        with Session(llama_db.engine) as session:
            headers["x-api-key"] = create_key(session, name="fuzz", scope="admin")[1]
    failures = openapi_failures(app, headers=headers,
                                max_examples=EXAMPLES if with_key else EXAMPLES // 3)
    assert not failures, "\n\n".join(failures)
