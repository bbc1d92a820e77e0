"""Who may call what, on SQLite and PostgreSQL: keys with scopes (401, 403), what needs no key
(open scopes, loopback), requests from another site, rate limits (429 with Retry-After), bodies
over the cap (413, before they are parsed), and the keys' hashes kept out of every answer and
log. The endpoints that run the model are reached without `--live`: a request the checks let
through is answered 503 (live inference off) by the route itself."""

from __future__ import annotations

import hashlib
import logging
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session
from support import LOOPBACK, serve_in_thread

from app.cli import main
from app.config import Settings
from app.db.tables import ApiKey
from app.keys import create_key, revoke_key
from app.main import create_app

LIVE = "/api/v1/activations"
WRITE = "/api/v1/lists"


@pytest.fixture(scope="module")
def db(llama_db):
    return llama_db


@pytest.fixture(scope="module")
def keys(db) -> dict[str, str]:
    """One key per scope, and one revoked: name -> key."""
    out = {}
    with Session(db.engine) as session:
        for scope in ("read", "live", "write", "admin"):
            out[scope] = create_key(session, name=f"{scope} key", scope=scope)[1]
        out["revoked"] = create_key(session, name="old key", scope="admin")[1]
        revoke_key(session, key=out["revoked"][:10])
    return out


def client_for(db, *, address=("203.0.113.7", 40000), **settings) -> TestClient:
    """A client of the app over `db`, calling from `address` (by default another machine)."""
    app = create_app(Settings(database_url=db.url, **settings), engine=db.engine)
    return TestClient(app, client=address)


@pytest.fixture(scope="module")
def remote(db) -> Iterator[TestClient]:
    with client_for(db) as c:
        yield c


def activation(db) -> dict:
    return {"model": db.llama, "source": "1-mlp", "index": 3, "text": "hello"}


def error(r, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["ok"] is False and body["status"] == status
    return body["error"]


# ------------------------------------------------------------------ keys and scopes


def test_keys_are_stored_as_their_sha256_only(db, keys):
    with Session(db.engine) as session:
        rows = {r.name: r for r in session.scalars(select(ApiKey))}
    for scope in ("read", "live", "write", "admin"):
        row, key = rows[f"{scope} key"], keys[scope]
        assert row.digest == hashlib.sha256(key.encode()).hexdigest()
        assert row.scope == scope and key.startswith(row.prefix) and len(row.prefix) < 12
        assert key not in " ".join(str(v) for v in vars(row).values())


def test_what_runs_the_model_needs_a_key_with_the_live_scope(db, remote, keys):
    body = activation(db)
    msg = error(remote.post(LIVE, json=body), 401)
    assert "'live'" in msg and "x-api-key" in msg
    assert remote.post(LIVE, json=body).headers["www-authenticate"].startswith("Bearer")
    assert "unknown or revoked" in error(remote.post(LIVE, json=body,
                                                     headers={"x-api-key": "fsk_nope"}), 401)
    assert "unknown or revoked" in error(remote.post(
        LIVE, json=body, headers={"x-api-key": keys["revoked"]}), 401)
    msg = error(remote.post(LIVE, json=body, headers={"x-api-key": keys["read"]}), 403)
    assert msg == "the key 'read key' has scope 'read'; this needs scope 'live'"
    for scope in ("live", "write", "admin"):  # each scope includes the ones before it
        r = remote.post(LIVE, json=body, headers={"x-api-key": keys[scope]})
        assert "serve --live" in error(r, 503)  # let through: the route answers
    r = remote.post(LIVE, json=body, headers={"Authorization": f"Bearer {keys['live']}"})
    assert error(r, 503)


def test_writing_needs_a_key_with_the_write_scope(remote, keys):
    body = {"name": "mine"}
    assert "'write'" in error(remote.post(WRITE, json=body), 401)
    msg = error(remote.post(WRITE, json=body, headers={"x-api-key": keys["live"]}), 403)
    assert msg == "the key 'live key' has scope 'live'; this needs scope 'write'"
    r = remote.post(WRITE, json=body, headers={"x-api-key": keys["write"]})
    assert r.status_code == 201 and r.json()["owner"] == "write key"


def test_reading_is_open_and_ignores_keys_it_does_not_need(db, remote):
    """Neuronpedia's client sends a key with every request, even a made-up one."""
    for headers in ({}, {"x-api-key": "anything"}, {"Authorization": "Bearer x"}):
        assert remote.get("/.json", headers=headers).status_code == 200
        assert remote.get(f"/api/feature/{db.llama}/1-mlp/3", headers=headers).status_code == 200


def test_settings_choose_what_is_open(db, keys):
    with client_for(db, open_scopes="") as c:  # everything needs a key, reading too
        assert "'read'" in error(c.get("/.json"), 401)
        page = c.get(f"/{db.llama}/1-mlp/3")  # pages too, with the error page
        assert page.status_code == 401 and "scope &#39;read&#39;" in page.text
        assert c.get("/.json", headers={"x-api-key": keys["read"]}).status_code == 200
        assert c.get("/static/style.css").status_code == 200  # the page's own assets stay open
    with client_for(db, open_scopes="read,live") as c:
        assert error(c.post(LIVE, json=activation(db)), 503)
        assert error(c.post(WRITE, json={"name": "x"}), 401)
    with pytest.raises(ValueError, match="unknown scope 'reed'"):
        Settings(open_scopes="read,reed")


def test_loopback_needs_no_key_when_the_server_binds_to_loopback(db):
    body = activation(db)
    with client_for(db, address=LOOPBACK) as c:  # `make run`: host 127.0.0.1
        assert error(c.post(LIVE, json=body), 503)
        assert c.post(WRITE, json={"name": "local"}).status_code == 201
        # a request a proxy on this machine forwarded is not a local one
        for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
            assert error(c.post(LIVE, json=body, headers={header: "198.51.100.1"}), 401)
    with client_for(db, address=("::1", 5000)) as c:
        assert error(c.post(LIVE, json=body), 503)
    with client_for(db, address=LOOPBACK, host="0.0.0.0") as c:  # bound to every interface
        assert error(c.post(LIVE, json=body), 401)
    with client_for(db, address=LOOPBACK, loopback_open=False) as c:
        assert error(c.post(LIVE, json=body), 401)


def test_a_page_of_another_site_cannot_make_a_browser_run_or_write(db, keys):
    """Even where no key is needed, what a browser posts from another site is refused."""
    with client_for(db, address=LOOPBACK) as c:
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Sec-Fetch-Site": "cross-site"}):
            assert "another site" in error(c.post(WRITE, json={"name": "x"}, headers=headers),
                                           403)
            r = c.post(f"/{db.llama}/1-mlp/3/try", data={"text": "hi"}, headers=headers)
            assert r.status_code == 403 and "another site" in r.text
        same = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
        assert c.post(WRITE, json={"name": "x"}, headers=same).status_code == 201
        # reading is not refused: a link from anywhere may open a page
        assert c.get("/.json", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_a_get_runs_the_model_only_with_a_key(db, keys):
    """Any page can make a browser send a GET, from loopback too: a GET that would run the
    model wants a key in the request's headers."""
    url = f"/search.json?model={db.llama}&text=hello"
    with client_for(db, address=LOOPBACK, open_scopes="read,live") as c:
        assert "a GET runs the model only with a key" in error(c.get(url), 401)
        assert error(c.get(url, headers={"x-api-key": keys["live"]}), 503)
        assert "'live'" in error(c.get(url, headers={"x-api-key": keys["read"]}), 403)
        page = c.get(f"/{db.llama}/1-mlp/3/try?text=hello")  # the text, ready to run
        assert page.status_code == 200 and 'id="try-ready"' in page.text


# ------------------------------------------------------------------ rate limits


def test_what_runs_the_model_is_rate_limited_per_key_and_per_address(db, keys):
    body = activation(db)
    with client_for(db, open_scopes="read,live", live_rate=6, live_burst=2) as c:
        for _ in range(2):
            assert error(c.post(LIVE, json=body), 503)  # let through
        r = c.post(LIVE, json=body)
        assert "too many requests" in error(r, 429) and "this address" in r.json()["error"]
        assert 1 <= int(r.headers["retry-after"]) <= 10  # a token every 10 s
        # a key has a bucket of its own; the same key from elsewhere shares it
        key = {"x-api-key": keys["live"]}
        for _ in range(2):
            assert error(c.post(LIVE, json=body, headers=key), 503)
        assert "the key 'live key'" in error(c.post(LIVE, json=body, headers=key), 429)
        assert error(c.post(LIVE, json=body, headers={"x-api-key": keys["admin"]}), 503)
        # what does not run the model is not limited
        for _ in range(5):
            assert c.get("/.json").status_code == 200
    with client_for(db, address=LOOPBACK, live_rate=6, live_burst=1) as c:
        for _ in range(4):  # a local caller has no limit
            assert error(c.post(LIVE, json=body), 503)


# ------------------------------------------------------------------ bodies


def test_a_body_over_the_cap_is_refused_before_it_is_parsed(db, keys):
    key = {"x-api-key": keys["write"], "content-type": "application/json"}
    with client_for(db, max_body=1000) as c:
        broken = b"{" * 1001  # not JSON: a parsed body would answer 422
        msg = error(c.post(WRITE, content=broken, headers=key), 413)
        assert "1,000 bytes" in msg and "FEATURESCOPE_MAX_BODY" in msg
        # a body without Content-Length (chunked) is counted as it streams
        chunks = (b"{" * 100 for _ in range(11))
        assert "1,000 bytes" in error(c.post(WRITE, content=chunks, headers=key), 413)
        assert error(c.post(WRITE, content=b"{" * 1000, headers=key), 422)  # at the cap: read
        # the check comes first: no key is needed to be told
        assert error(c.post(WRITE, content=broken), 413)


def test_the_server_answers_413_without_reading_the_body(db):
    """A client announcing 5 MB is answered at once, before it sends a byte of it."""
    app = create_app(Settings(database_url=db.url), engine=db.engine)
    with serve_in_thread(app) as url:
        host, port = urlsplit(url).hostname, urlsplit(url).port
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"POST /api/v1/lists HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                      b"\r\nContent-Length: 5000000\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += s.recv(4096)
        head = answer.split(b"\r\n\r\n")[0].decode().lower()
        assert head.startswith("http/1.1 413")
        assert "content-security-policy" in head and "x-content-type-options: nosniff" in head


# ------------------------------------------------------------------ the keys stay secret


def test_keys_and_their_hashes_appear_in_no_answer_and_no_log(db, keys, caplog, capsys):
    secrets = [k for k in keys.values()] + [hashlib.sha256(k.encode()).hexdigest()
                                             for k in keys.values()]
    seen = []
    caplog.set_level(logging.DEBUG)
    with client_for(db, live_rate=6, live_burst=1) as c:
        for name, key in keys.items():
            for headers in ({"x-api-key": key}, {"Authorization": f"Bearer {key}"}):
                for r in (c.post(LIVE, json=activation(db), headers=headers),
                          c.post(LIVE, json=activation(db), headers=headers),  # 429
                          c.post(WRITE, json={"name": name}, headers=headers),
                          c.get("/lists.json", headers=headers), c.get("/openapi.json"),
                          c.get("/docs")):
                    seen.append(r.text + str(r.headers))
    assert main(["keys", "list", "--db", db.url]) == 0
    listing = capsys.readouterr().out
    assert "write key" in listing and "revoked" in listing
    text = "\n".join(seen + [listing] + [rec.getMessage() for rec in caplog.records])
    assert "429" in text and "'write key'" in text  # the answers were the refusals
    for s in secrets:
        assert s not in text
