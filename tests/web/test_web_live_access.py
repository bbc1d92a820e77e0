"""Every route that runs the model, with the models loaded, on SQLite and PostgreSQL, asked from
another machine: 401 without a key, 403 with a read key, 200 with a live key, then 429 with
Retry-After once the key's bucket is empty; from loopback to a server bound to loopback, no key
is needed. The pages that hold a request (`/steer`, `/patch`) still open from their shareable
URL without a key, and without running anything."""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from support import LOOPBACK

from app import urls
from app.config import Settings
from app.intervention_schemas import IOI
from app.keys import create_key
from app.main import create_app
from app.model_queue import InferenceLimits, ModelQueue

SAE = "1-res-sae-48"
REMOTE = ("198.51.100.30", 40000)


@pytest.fixture(scope="module")
def world(live_world):
    return live_world


@pytest.fixture(scope="module")
def live(world) -> ModelQueue:
    return ModelQueue(world.models, InferenceLimits(max_tokens=48, max_texts=4, max_wait=30))


@pytest.fixture(scope="module")
def remote(world, live) -> Iterator[TestClient]:
    """From another machine, one request that runs the model a minute per key or address."""
    app = create_app(Settings(database_url=world.url, live_rate=1, live_burst=1),
                     engine=world.engine, live=live)
    with TestClient(app, client=REMOTE) as c:
        yield c


def key(world, scope: str, name: str) -> str:
    with Session(world.engine) as session:
        return create_key(session, name=name, scope=scope)[1]


def _np_steer(m: str) -> dict:
    return {"prompt": "The meaning of", "modelId": m, "temperature": 0, "n_tokens": 2,
            "features": [{"modelId": m, "layer": SAE, "index": 3, "strength": 4}]}


def _mlp_text(field: str) -> Callable[[str], dict]:
    return lambda m: {"modelId": m, "source": "0-mlp", field: "x = 1"}


# (name, path of the model, "json" or "data" (a form), body of the model)
ROUTES = [
    ("/api/v1/activations", lambda m: "/api/v1/activations", "json",
     lambda m: {"model": m, "source": "0-mlp", "index": 1, "text": "x = 1"}),
    ("/api/v1/search", lambda m: "/api/v1/search", "json", lambda m: {"model": m, "text": "x"}),
    ("/api/v1/steer", lambda m: "/api/v1/steer", "json",
     lambda m: {"model": m, "prompt": "x =", "n_tokens": 2,
                "features": [{"source": SAE, "index": 3, "strength": 4}]}),
    ("/api/steer", lambda m: "/api/steer", "json", _np_steer),
    ("/api/v1/ablate", lambda m: "/api/v1/ablate", "json",
     lambda m: {"model": m, "text": "x = 1", "features": [{"source": "1-mlp", "index": 4}]}),
    ("/api/v1/patch", lambda m: "/api/v1/patch", "json",
     lambda m: {"model": m, **IOI, "kinds": ["resid"]}),
    ("/api/activation/new", lambda m: "/api/activation/new", "json",
     lambda m: {"feature": {"modelId": m, "source": SAE, "index": "3"}, "customText": "x = 1"}),
    ("/api/activation/source", lambda m: "/api/activation/source", "json",
     _mlp_text("customText")),
    ("/api/search-all", lambda m: "/api/search-all", "json",
     lambda m: {"modelId": m, "sourceSet": "mlp", "text": "x = 1"}),
    ("/api/search-all/", lambda m: "/api/search-all/", "json",
     lambda m: {"modelId": m, "sourceSet": "mlp", "text": "x = 1"}),
    ("/api/search-topk-by-token", lambda m: "/api/search-topk-by-token", "json",
     _mlp_text("text")),
    ("/steer (form)", lambda m: "/steer", "data",
     lambda m: {"model": m, "prompt": "x =", "n_tokens": "2", "f": f"{SAE}:3:4"}),
    ("/patch (form)", lambda m: "/patch", "data", lambda m: {"model": m, "kinds": "resid"}),
    ("/search (form)", lambda m: "/search", "data", lambda m: {"model": m, "text": "x = 1"}),
    ("effect box", lambda m: urls.effect(m, SAE, 3), "data",
     lambda m: {"text": "x = 1", "mode": "zero"}),
    ("try box", lambda m: f"/{m}/{SAE}/3/try", "data", lambda m: {"text": "x = 1"}),
]


def send(client: TestClient, world, route, headers: dict[str, str]):
    _, path, kind, body = route
    model = world.lm.slug
    return client.post(path(model), **{kind: body(model)}, headers=headers)


@pytest.mark.parametrize("route", ROUTES, ids=[r[0] for r in ROUTES])
def test_what_runs_the_model_wants_a_live_key_and_is_rate_limited(world, remote, route):
    r = send(remote, world, route, {})
    assert r.status_code == 401, r.text
    assert "scope 'live'" in html.unescape(r.text)
    assert r.headers["www-authenticate"].startswith("Bearer")
    read = key(world, "read", f"reader of {route[0]}")
    r = send(remote, world, route, {"x-api-key": read})
    assert r.status_code == 403, r.text
    assert "has scope 'read'; this needs scope 'live'" in html.unescape(r.text)
    runner = key(world, "live", f"runner of {route[0]}")
    r = send(remote, world, route, {"Authorization": f"Bearer {runner}"})
    assert r.status_code == 200, r.text
    assert "no-store" in r.headers["cache-control"]
    r = send(remote, world, route, {"x-api-key": runner})  # its one request a minute is spent
    assert r.status_code == 429, r.text
    assert "too many requests" in html.unescape(r.text)
    assert 1 <= int(r.headers["retry-after"]) <= 60


def test_from_loopback_a_loopback_server_needs_no_key(world, live):
    app = create_app(Settings(database_url=world.url, live_rate=1, live_burst=1),
                     engine=world.engine, live=live)
    with TestClient(app, client=LOOPBACK) as c:
        for route in ROUTES:  # and no rate limit
            for _ in range(2):
                r = send(c, world, route, {})
                assert r.status_code == 200, (route[0], r.text)


def test_the_shareable_pages_open_without_a_key_and_run_nothing(world, remote):
    m = world.lm.slug
    for url, result in ((urls.steer(m, "x =", [(SAE, 3, 4.0)]), "steer-out"),
                        (urls.patch(m), 'id="hm-resid"'),
                        (urls.try_text(m, SAE, 3, "x = 1"), "max <span class=\"num\">")):
        page = remote.get(url)
        assert page.status_code == 200, page.text
        assert result not in page.text
