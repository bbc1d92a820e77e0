"""What a review of the web layer found: HEAD wherever GET is served, 405 for a GET on what only
takes POST, the security headers on every answer (a 500 too), only assets under static/, the
answers matching the OpenAPI description (required parameters, time zones, `.json?jump=N`,
malformed bodies), and inputs that answered 500 (a lone surrogate, a huge index) answering 422."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db.engine import make_engine, upgrade
from app.main import create_app
from app.middleware import SECURITY_HEADERS


def _has_security_headers(r) -> None:
    for name, value in SECURITY_HEADERS:
        assert r.headers[name.decode()] == value.decode(), name


def test_head_is_answered_wherever_get_is(client, web_db):
    m = web_db.llama
    for url in ("/", "/.json", f"/{m}", f"/{m}.json", f"/{m}/1-mlp", f"/{m}/1-mlp.json",
                f"/{m}/1-mlp/3", f"/{m}/1-mlp/3.json", f"/api/feature/{m}/1-mlp/3", "/docs",
                "/openapi.json", "/static/style.css", "/lists", "/lists.json",
                f"/tokens.json?model={m}&token=the"):
        get, head = client.get(url), client.head(url)
        assert head.status_code == get.status_code == 200, url
        assert head.content == b"" and get.content
        assert head.headers["content-length"] == get.headers["content-length"], url
        assert head.headers["content-type"] == get.headers["content-type"]
        assert head.headers.get("etag") == get.headers.get("etag")
    missing = client.head(f"/{m}/nope.json")
    assert missing.status_code == 404 and missing.content == b""


def test_a_get_on_a_path_that_takes_post_is_405_with_allow(client):
    for path in ("/api/v1/activations", "/api/v1/search", "/api/activation/new",
                 "/api/list/get", "/api/v1/lists"):
        r = client.get(path)
        assert r.status_code == 405, (path, r.text)
        assert r.headers["allow"] == "POST"
        assert r.json() == {"ok": False, "status": 405,
                            "error": f"GET is not served at {path}: it takes POST"}
        assert client.head(path).status_code == 405
    assert client.get("/api/v1/lists/abc").headers["allow"] == "DELETE"


def test_security_headers_are_on_every_answer_a_500_too(client, web_db, tmp_path):
    for r in (client.get("/"), client.get("/.json"), client.get("/nope/nope/1.json"),
              client.get("/static/style.css"), client.get("/api/v1/activations"),
              client.post("/api/v1/activations", content=b"x" * 2_000_000)):
        _has_security_headers(r)
    # a database that lost a table: the views fail, the answer is the envelope with the headers
    url = f"sqlite:///{tmp_path / 'broken.db'}"
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE vocabularies")
        conn.exec_driver_sql("DROP TABLE models")
    app = create_app(Settings(database_url=url), engine=engine)
    with TestClient(app, raise_server_exceptions=False) as c:
        for path, body in (("/.json", '{"ok":false,"status":500,"error":"internal server error"}'),
                           ("/", None)):
            r = c.get(path)
            assert r.status_code == 500
            _has_security_headers(r)
            assert body is None or r.text == body
    engine.dispose()


def test_only_the_pages_assets_are_served_from_static(client):
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/featurescope.js").status_code == 200
    for name in ("fetch_vendor.sh", "vendor/htmx.version", "vendor/htmx.LICENSE",
                 "../pyproject.toml", "%2e%2e/pyproject.toml"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 404, name
        assert "HTMX_VERSION" not in r.text and "featurescope" not in r.text[:20]


def test_openapi_says_which_parameters_are_required(client, web_db):
    spec = client.get("/openapi.json").json()

    def params(path):
        return {p["name"]: p.get("required", False) for p in spec["paths"][path]["get"]
                ["parameters"]}

    assert params("/search.json") == {"model": True, "text": True, "sources": False,
                                      "top": False}
    assert params("/tokens.json") == {"model": True, "token": False, "id": False,
                                      "limit": False}
    op = spec["paths"]["/search.json"]["get"]
    assert op["x-scope"] == "live" and {} not in op["security"]  # a GET needs its key
    assert "401" in op["responses"] and "429" in op["responses"]
    assert spec["paths"]["/.json"]["get"]["x-scope"] == "read"
    post = spec["paths"]["/api/v1/activations"]["post"]
    assert {"403", "413", "422", "429", "503"} <= set(post["responses"])
    assert {} in post["security"] and "401" not in post["responses"]  # loopback: no key needed
    wide = create_app(Settings(database_url=web_db.url, host="0.0.0.0"),
                      engine=web_db.engine).openapi()
    post = wide["paths"]["/api/v1/activations"]["post"]
    assert {"401", "403", "413", "422", "429", "503"} <= set(post["responses"])
    assert post["security"] == [{"ApiKey": []}, {"Bearer": []}]
    assert "Needs a key with scope `live`." in post["description"]
    assert {} in wide["paths"]["/.json"]["get"]["security"]  # reading is open
    for path, ops in spec["paths"].items():  # every 422 has the envelope
        for op in ops.values():
            bad = op["responses"].get("422")
            if bad:
                assert bad["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorOut"}, path
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_tokens_json_without_a_model_is_422(client):
    assert client.get("/tokens.json?token=the").status_code == 422
    assert client.get("/search.json?text=x").status_code in (401, 422)


def test_times_carry_their_zone(client, web_db):
    """SQLite keeps times without a zone; they are UTC, and the answers say so."""
    src = client.get(f"/{web_db.llama}/1-mlp.json").json()["source"]
    created = dt.datetime.fromisoformat(src["created_at"])
    assert created.utcoffset() == dt.timedelta(0)
    assert dt.datetime.fromisoformat(src["finished_at"]).tzinfo is not None


def test_jump_from_a_source_json_goes_to_the_feature_json(client, web_db):
    r = client.get(f"/{web_db.llama}/1-mlp.json?jump=42", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/{web_db.llama}/1-mlp/42.json"
    assert client.get(r.headers["location"]).json()["index"] == 42
    r = client.get(f"/{web_db.llama}/1-mlp?jump=42", follow_redirects=False)
    assert r.headers["location"] == f"/{web_db.llama}/1-mlp/42"
    r = client.get(f"/{web_db.llama}/1-mlp.json?jump=100000", follow_redirects=False)
    assert r.status_code == 404 and "has no feature 100000" in r.json()["error"]


def test_malformed_bodies_are_422_in_the_envelope(local):
    for body, ctype in ((b'{"model": ', "application/json"), (b"\xff\xfe{}", "application/json"),
                        (b"[1, 2]", "application/json"), (b"model=x", "text/plain")):
        r = local.post("/api/v1/activations", content=body, headers={"content-type": ctype})
        assert r.status_code == 422, (body, r.text)
        assert r.json()["ok"] is False and r.json()["status"] == 422


@pytest.mark.parametrize("path, body", [
    ("/api/v1/activations", {"model": "m", "source": "1-mlp", "index": 0, "text": "a\ud800b"}),
    ("/api/v1/activations", {"model": "m", "source": "1-mlp", "index": 0,
                             "texts": ["ok", "a\udfffb"]}),
    ("/api/v1/search", {"model": "m", "text": "a\ud800b"}),
    ("/api/activation/new", {"feature": {"modelId": "m", "source": "1-mlp", "index": "0"},
                             "customText": "a\ud800b"}),
    ("/api/activation/new", {"feature": {"modelId": "m", "source": "1-mlp",
                                         "index": "99999999999"}, "customText": "hi"}),
    ("/api/activation/new", {"feature": {"modelId": "m", "source": "1-mlp",
                                         "index": 99999999999}, "customText": "hi"}),
    ("/api/v1/lists", {"name": "a\ud800b"}),
    ("/api/v1/lists", {"name": "nul \x00 inside"}),
    ("/api/list/get", {"listId": "a\ud800b"}),
])
def test_texts_no_database_or_tokenizer_takes_are_422(local, path, body):
    """JSON can spell a lone surrogate and a NUL; neither reaches a tokenizer or a database.
    (Without --live: refused before the route would say live inference is off.)"""
    r = local.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["status"] == 422
