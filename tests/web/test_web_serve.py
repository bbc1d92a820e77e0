"""`featurescope serve`: upgrades the schema, prints its URL, runs uvicorn on the app."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect

from app.config import Settings
from app.main import create_app, serve


def test_serve_upgrades_prints_and_runs(tmp_path, monkeypatch, capsys):
    import uvicorn

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    settings = Settings(data_dir=tmp_path, host="127.0.0.1", port=8123, database_url=url,
                        live=True)
    assert serve(settings) == 0
    assert "on http://127.0.0.1:8123" in capsys.readouterr().out
    assert (ran["host"], ran["port"]) == ("127.0.0.1", 8123)
    engine = ran["app"].state.engine
    assert "features" in inspect(engine).get_table_names()  # alembic ran first
    with TestClient(ran["app"]) as client:  # an empty database is a page, not an error
        r = client.get("/")
        assert r.status_code == 200 and "No models yet" in r.text
        # it follows a harvest about to start: polls its fragment, or reloads without JS
        assert 'hx-trigger="load delay:2s"' in r.text and 'http-equiv="refresh"' in r.text
        assert client.get("/.json").json() == {"ok": True, "models": []}


def test_create_app_defaults_to_the_settings_database(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATURESCOPE_DATA_DIR", str(tmp_path))
    app = create_app(Settings())
    assert str(tmp_path) in app.state.engine.url.database


def test_command_line_options_override_the_environment(tmp_path, monkeypatch):
    """`serve --port/--db/--live` over FEATURESCOPE_*: what cmd_serve hands to serve()."""
    monkeypatch.setenv("FEATURESCOPE_PORT", "9001")
    monkeypatch.setenv("FEATURESCOPE_DATA_DIR", str(tmp_path))
    env = Settings()
    assert env.with_options(port=None, live=None).port == 9001
    flags = env.with_options(port=8123, live=True, database_url=f"sqlite:///{tmp_path}/x.db")
    assert (flags.port, flags.live, flags.data_dir) == (8123, True, tmp_path)
    assert flags.db_url == f"sqlite:///{tmp_path}/x.db" and env.db_url.endswith("featurescope.db")
    with pytest.raises(ValueError, match="sqlite or postgresql"):
        env.with_options(database_url="mysql://x")
