"""Live inference (`serve --live`): your own text through a real tiny model and a real SAE loaded
from its files, against the stored examples and against brute force; searches by text and by
token; the 413 and 503 limits; the pages, in a real browser."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from urllib.parse import parse_qs, urlencode, urlsplit

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select
from support import (
    LOOPBACK,
    LiveWorld,
    openapi_failures,
    serve_in_thread,
)

from app.config import Settings
from app.db.engine import make_engine, upgrade
from app.db.tables import ExampleBlock, PeakToken
from app.main import create_app
from app.model_queue import InferenceLimits, ModelQueue
from workers.inference import ServedModel, ServedModels

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def world(live_world) -> LiveWorld:
    """The world in a SQLite file, and in a fresh PostgreSQL database."""
    return live_world


@pytest.fixture(scope="module")
def live(world) -> ModelQueue:
    return ModelQueue(world.models, InferenceLimits(max_tokens=MAX_TOKENS, max_texts=4, max_wait=0.3))


@pytest.fixture(scope="module")
def client(world, live):
    app = create_app(Settings(database_url=world.url), engine=world.engine, live=live)
    with TestClient(app, client=LOOPBACK) as c:
        yield c


@pytest.fixture(scope="module")
def off_client(world):
    """The same database served without --live."""
    with TestClient(create_app(Settings(database_url=world.url), engine=world.engine),
                    client=LOOPBACK) as c:
        yield c


def _post(client, path, body, status=200):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    return r.json()


def test_every_source_is_served_live(world):
    live_model = world.models.model(world.lm.slug)
    assert sorted(live_model.sources) == sorted(s.slug for s in world.specs)
    assert live_model.sources["1-res-sae-48"].encode is not None


# ------------------------------------------------------------------ fidelity


def _stored_examples(client, model, source, index):
    page = client.get(f"/{model}/{source}/{index}.json").json()
    return page, page["top"] + page["bottom"] + [e for g in page["quantiles"]
                                                for e in g["examples"]]


def _close_to_stored(live_values, ex):
    """Live float32 values against a stored window: float16 rounding (2**-11 relative) and
    the summation-order noise of another batch shape."""
    stored = np.asarray(ex["acts"], dtype=np.float32)
    got = np.asarray(live_values[ex["start"]:ex["start"] + len(stored)], dtype=np.float32)
    np.testing.assert_allclose(got, stored, rtol=2**-10, atol=1e-5)
    assert live_values[ex["peak_pos"]] == pytest.approx(ex["peak_value"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("source", ["0-mlp", "1-mlp", "1-res-sae-48"])
def test_fidelity_example_text_gives_the_stored_values(client, world, source):
    """The bug users of other explorers report most: the live values of an example's text are
    the stored ones. Each example is sent as text (its sequence up to the window's end, decoded)
    and as the same token ids."""
    model, tok = world.lm.slug, world.lm.tokenizer
    checked = as_text = 0
    for index in range(0, 48, 5):
        _, examples = _stored_examples(client, model, source, index)
        for ex in examples[:4]:
            seq = world.ds.tokens[ex["seq_idx"]].tolist()
            prefix = seq[:ex["start"] + len(ex["acts"])]
            assert prefix[ex["start"]:] == ex["token_ids"]
            out = _post(client, "/api/v1/activations",
                        {"model": model, "source": source, "index": index, "tokens": prefix})
            assert out["token_ids"] == prefix
            _close_to_stored(out["values"], ex)
            text = tok.decode(prefix[1:])
            out = _post(client, "/api/v1/activations",
                        {"model": model, "source": source, "index": index, "text": text})
            if out["token_ids"] == prefix:  # the text tokenizes back to the same ids
                _close_to_stored(out["values"], ex)
                as_text += 1
            checked += 1
    assert checked >= 10
    assert as_text >= checked // 2, (as_text, checked)


def test_activations_match_brute_force(client, world):
    model = world.lm.slug
    texts = ["def add(a, b):\n    return a + b", "The quick brown fox.", "x = [1, 2, 3]"]
    out = _post(client, "/api/v1/activations",
                {"model": model, "source": "1-res-sae-48", "index": 7, "texts": texts})
    assert len(out["results"]) == 3 and out["bos_first"] is True
    for text, res in zip(texts, out["results"], strict=True):
        ids = [world.lm.tokenizer.bos_token_id] + world.lm.tokenizer(
            text, add_special_tokens=False)["input_ids"]
        assert res["token_ids"] == ids
        assert res["tokens"] == [world.lm.tokenizer.decode([i]) for i in ids]
        want = world.brute(ids)["1-res-sae-48"][:, 7]
        np.testing.assert_allclose(res["values"], want, rtol=1e-5, atol=1e-6)
        body = want[1:]  # the BOS token is never the max
        assert res["max_index"] == 1 + int(np.argmax(body))
        assert res["max_value"] == pytest.approx(float(body.max()), rel=1e-5, abs=1e-6)
    one = _post(client, "/api/v1/activations",
                {"model": model, "source": "0-mlp", "index": 3, "text": texts[0]})
    assert set(one) >= {"tokens", "token_ids", "values", "max_value", "max_index"}
    assert "results" not in one


@pytest.mark.parametrize("body, status, words", [
    ({"text": "a"}, 404, "no source"),
    ({"text": "hi", "tokens": [1]}, 422, "exactly one"),
    ({"text": "   "}, 422, "empty"),
    ({"tokens": [10**9]}, 422, "out of the vocabulary"),
    ({"texts": ["a"] * 5}, 413, "at most 4"),
])
def test_activations_refusals(client, world, body, status, words):
    req = {"model": world.lm.slug, "source": "0-mlp", "index": 0, **body}
    if status == 404:
        req["source"] = "9-mlp"
    out = _post(client, "/api/v1/activations", req, status)
    assert out["ok"] is False and out["status"] == status and words in out["error"]


def test_unknown_feature_index_is_404(client, world):
    out = _post(client, "/api/v1/activations", {"model": world.lm.slug, "source": "0-mlp",
                                                "index": 10**6, "text": "x"}, 404)
    assert "features 0 to" in out["error"]


def test_too_long_text_is_413_and_says_the_limit(client, world):
    text = " word" * (MAX_TOKENS + 5)
    out = _post(client, "/api/v1/activations",
                {"model": world.lm.slug, "source": "0-mlp", "index": 0, "text": text}, 413)
    assert f"at most {MAX_TOKENS} tokens" in out["error"]
    out = _post(client, "/api/v1/search", {"model": world.lm.slug, "text": text}, 413)
    assert str(MAX_TOKENS) in out["error"]


def test_a_request_that_waits_too_long_is_503_with_retry_after(client, live, world):
    """While the model is busy longer than max_wait, a request is answered 503 with
    Retry-After; once it is free, the same request succeeds."""
    release, started = threading.Event(), threading.Event()

    def hold(models):
        started.set()
        release.wait(10)

    busy = client.portal.start_task_soon(live.call, hold)
    assert started.wait(10)
    req = {"model": world.lm.slug, "source": "0-mlp", "index": 0, "text": "hello"}
    r = client.post("/api/v1/activations", json=req)
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) >= 1
    assert "busy" in r.json()["error"]
    release.set()
    busy.result(timeout=10)
    assert client.post("/api/v1/activations", json=req).status_code == 200


def test_a_lone_surrogate_and_a_huge_index_are_422_not_500(client, world):
    """With the models loaded: what once reached the tokenizer (a TypeError) or pydantic's
    ValidationError unhandled (the index) is refused as malformed input."""
    model = world.lm.slug
    feature = {"modelId": model, "source": "0-mlp"}
    for path, body in (
            ("/api/v1/activations", {"model": model, "source": "0-mlp", "index": 0,
                                     "text": "a\ud800b"}),
            ("/api/v1/search", {"model": model, "text": "a\ud800b"}),
            ("/api/activation/new", {"feature": {**feature, "index": 0},
                                     "customText": "a\ud800b"}),
            ("/api/activation/new", {"feature": {**feature, "index": 99999999999},
                                     "customText": "hi"}),
            ("/api/activation/new", {"feature": {**feature, "index": "99999999999"},
                                     "customText": "hi"})):
        r = client.post(path, content=json.dumps(body),
                        headers={"content-type": "application/json"})
        assert r.status_code == 422, (path, r.text)
        assert r.json()["status"] == 422
    ok = client.post("/api/activation/new", json={"feature": {**feature, "index": "0"},
                                                  "customText": "a b"})
    assert ok.status_code == 200


def test_the_live_answers_keep_to_the_openapi_description(world, live, live_key):
    """A bounded schemathesis run with the models loaded and a live key, on a server bound to
    every interface: no 5xx but a documented 503 (the model busy), and no answer that breaks
    the description."""
    app = create_app(Settings(database_url=world.url, host="0.0.0.0", live_rate=0),
                     engine=world.engine, live=live)
    failures = openapi_failures(app, headers={"x-api-key": live_key}, max_examples=25)
    assert not failures, "\n\n".join(failures)


def test_live_requests_waiting_for_the_model_hold_no_database_connection(world, live_key):
    """16 clients post to the model while it is busy (activations, Neuronpedia's activation/new
    and search-topk-by-token, ablation, steering), beside readers of feature pages, over a
    pool of 2 connections that gives up after 1 s: the live requests get 200, 429 or 503
    (never a 5xx from an exhausted pool), and the pages keep answering."""
    from sqlalchemy.orm import Session

    from app.keys import create_key

    with Session(world.engine) as session:
        keys = [live_key, create_key(session, name="second", scope="live")[1]]
    engine = make_engine(world.url, pool_size=2, max_overflow=0, pool_timeout=1)
    queue = ModelQueue(world.models, InferenceLimits(max_tokens=MAX_TOKENS, max_wait=0.5))
    app = create_app(Settings(database_url=world.url, live_rate=120, live_burst=10),
                     engine=engine, live=queue)
    release, started = threading.Event(), threading.Event()

    def hold(models):
        started.set()
        release.wait(10)

    live_codes, page_codes = [], []
    with TestClient(app, client=("198.51.100.20", 40000), raise_server_exceptions=False) as c:
        busy = c.portal.start_task_soon(queue.call, hold)
        assert started.wait(10)

        def poster(i: int) -> None:
            m, text = world.lm.slug, f"x = {i}"
            mix = [("/api/v1/activations", {"model": m, "source": "0-mlp", "index": i,
                                            "text": text}),
                   ("/api/activation/new", {"feature": {"modelId": m, "source": "0-mlp",
                                                        "index": str(i)}, "customText": text}),
                   ("/api/v1/ablate", {"model": m, "text": text,
                                       "features": [{"source": "0-mlp", "index": i}]}),
                   ("/api/v1/steer", {"model": m, "prompt": text, "n_tokens": 2,
                                      "features": [{"source": "0-mlp", "index": i,
                                                    "strength": 2}]}),
                   ("/api/search-topk-by-token", {"modelId": m, "source": "0-mlp",
                                                  "text": text})]
            for j in range(4):
                path, body = mix[(i + j) % len(mix)]
                r = c.post(path, json=body, headers={"x-api-key": keys[i % 2]})
                live_codes.append(r.status_code)

        def reader(i: int) -> None:
            for j in range(6):
                page_codes.append(c.get(f"/{world.lm.slug}/1-mlp/{i + j}.json").status_code)

        threads = [threading.Thread(target=poster, args=(i,)) for i in range(16)]
        threads += [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        threading.Timer(1.5, release.set).start()
        for t in threads:
            t.join(60)
        busy.result(timeout=10)
    engine.dispose()
    assert len(live_codes) == 64 and set(live_codes) <= {200, 429, 503}, sorted(live_codes)
    assert {200, 429, 503} <= set(live_codes)  # served, limited, and turned away while busy
    assert page_codes == [200] * 24


# ------------------------------------------------------------------ search by text


def test_search_ranks_features_like_brute_force(client, world):
    text = "import os\nprint(os.path.join('a', 'b'))"
    out = _post(client, "/api/v1/search", {"model": world.lm.slug, "text": text, "top": 12,
                                           "per_token": 3})
    sources = [s.slug for s in world.specs]
    assert out["sources"] == sources
    acts = world.brute(out["token_ids"])
    cands = []
    for order, slug in enumerate(sources):
        a = acts[slug][1:]
        for f in range(a.shape[1]):
            if a[:, f].max() > 0:
                cands.append((-float(a[:, f].max()), order, f))
    cands.sort()
    want = [(sources[o], f) for _, o, f in cands[:12]]
    assert len(want) == 12
    assert [(h["source"], h["index"]) for h in out["features"]] == want
    for h in out["features"]:
        col = acts[h["source"]][:, h["index"]]
        np.testing.assert_allclose(h["values"], col, rtol=1e-5, atol=1e-6)
        assert h["max_index"] == 1 + int(np.argmax(col[1:]))
        page = client.get(urls_json(h["url"])).json()
        assert h["max_act"] == page["stats"]["max_act"]
        assert h["relative"] == pytest.approx(h["max_value"] / page["stats"]["max_act"])
    assert out["per_token"][0] == []  # BOS
    for t in range(1, len(out["token_ids"])):
        row = [(-float(acts[s][t, f]), o, f) for o, s in enumerate(sources)
               for f in range(acts[s].shape[1]) if acts[s][t, f] > 0]
        row.sort()
        assert [(x["source"], x["index"]) for x in out["per_token"][t]] == \
            [(sources[o], f) for _, o, f in row[:3]]


def urls_json(url: str) -> str:
    return url + ".json"


@pytest.fixture
def live_key(world) -> str:
    """A key with the live scope, in the world's database (made per test: a test of the
    migrations takes the schema down and up again)."""
    from sqlalchemy.orm import Session

    from app.keys import create_key

    with Session(world.engine) as session:
        return create_key(session, name="live tests", scope="live")[1]


def test_search_page_holds_its_query_and_matches_the_api(client, world, live_key):
    """The search's URL holds its query: its JSON twin answers the API's result (a GET runs the
    model only with a key), its page shows the query with the button that runs it, and the
    posted form answers the results, pushing that URL."""
    text = "for i in range(10):"
    api = _post(client, "/api/v1/search", {"model": world.lm.slug, "text": text,
                                           "sources": ["1-res-sae-48", "0-mlp"]})
    assert api["sources"] == ["1-res-sae-48", "0-mlp"]
    query = parse_qs(urlsplit(api["url"]).query)
    assert query == {"model": [world.lm.slug], "text": [text], "sources": ["1-res-sae-48,0-mlp"]}
    json_url = api["url"].replace("/search?", "/search.json?")
    assert client.get(json_url, headers={"x-api-key": live_key}).json() == api
    refused = client.get(json_url)
    assert refused.status_code == 401 and "a GET runs the model only with a key" in \
        refused.json()["error"]
    page = client.get(api["url"])
    assert page.status_code == 200 and api["features"]
    assert "for i in range(10):" in page.text  # the query, back in the box
    assert 'id="search-ready"' in page.text and 'class="hit"' not in page.text
    form = {"model": world.lm.slug, "text": text, "sources": "1-res-sae-48,0-mlp"}
    ran = client.post("/search", data=form)
    assert ran.status_code == 200
    for hit in api["features"][:5]:
        assert f'href="{hit["url"]}"' in ran.text
    part = client.post("/search", data=form, headers={"HX-Request": "true",
                                                      "HX-Target": "search-results"})
    assert part.text.lstrip().startswith('<div id="search-results"')
    assert part.headers["hx-push-url"] == api["url"]


def test_search_of_an_unknown_source_or_model_is_404(client, world):
    out = _post(client, "/api/v1/search", {"model": world.lm.slug, "text": "x",
                                           "sources": ["7-mlp"]}, 404)
    assert "7-mlp" in out["error"]
    out = _post(client, "/api/v1/search", {"model": "nope", "text": "x"}, 404)
    assert "unknown model" in out["error"]


# ------------------------------------------------------------------ search by token


def _brute_peak_counts(world, slug: str) -> dict[int, list[tuple[int, int]]]:
    """Per feature, its top-5 peak tokens of top examples with counts, from the harvest state."""
    st = world.states[slug]
    out = {}
    for f in range(st.top.seq.shape[1]):
        counts: dict[int, int] = {}
        for r in range(st.top.size):
            if torch.isfinite(st.top.score[r, f]):
                t = int(world.ds.tokens[int(st.top.seq[r, f]), int(st.top.pos[r, f])])
                counts[t] = counts.get(t, 0) + 1
        ranked = sorted(counts.items(), key=lambda tc: (-tc[1], tc[0]))[:5]
        out[f] = ranked
    return out


def test_token_search_matches_brute_force(client, world):
    model = world.lm.slug
    brute = {s.slug: _brute_peak_counts(world, s.slug) for s in world.specs}
    common: dict[int, int] = {}
    for per_feature in brute.values():
        for ranked in per_feature.values():
            for t, _ in ranked:
                common[t] = common.get(t, 0) + 1
    assert len(common) >= 4
    for token_id in sorted(common, key=lambda t: -common[t])[:4]:
        out = client.get(f"/tokens.json?model={model}&id={token_id}&limit=500").json()
        want = {(slug, f, c) for slug, per in brute.items() for f, ranked in per.items()
                for t, c in ranked if t == token_id}
        got = {(x["source"], x["index"], x["count"]) for x in out["features"]}
        assert got == want
        counts = [x["count"] for x in out["features"]]
        assert counts == sorted(counts, reverse=True)
        for x in out["features"][:3]:
            page = client.get(x["url"] + ".json").json()
            assert x["n_top"] == len(page["top"]) and x["max_act"] == page["stats"]["max_act"]


def test_token_search_by_text_finds_the_spaced_token_too(client, world):
    tok = world.lm.tokenizer
    bare, spaced = tok.convert_tokens_to_ids("the"), tok.convert_tokens_to_ids("Ġthe")
    out = client.get(f"/tokens.json?model={world.lm.slug}&token=the").json()
    assert [t["id"] for t in out["tokens"]] == [bare, spaced]
    assert out["features"] and {x["token_id"] for x in out["features"]} <= {bare, spaced}
    page = client.get(f"/tokens?model={world.lm.slug}&token=the")
    assert page.status_code == 200 and f"#{spaced}" in page.text
    assert client.get("/tokens.json?model=nope&token=a").status_code == 404
    assert client.get(f"/tokens.json?model={world.lm.slug}").status_code == 422
    assert client.get(f"/tokens.json?model={world.lm.slug}&token=").status_code == 422


def test_older_databases_are_migrated_to_what_a_harvest_writes(world):
    """A database made before peak_tokens existed gets them; one with a row per example gets
    its example blocks back byte for byte (0003 down to a row per example, then up again)."""
    def dump():
        with world.engine.connect() as conn:
            return (sorted(conn.execute(select(PeakToken.__table__)).all()),
                    sorted(conn.execute(select(ExampleBlock.__table__)).all()))

    before = dump()
    assert before[0] and before[1]
    upgrade(world.engine, "0002")
    with world.engine.connect() as conn:
        n_rows = conn.exec_driver_sql("SELECT COUNT(*) FROM examples").scalar()
    assert n_rows == sum(b.n for b in before[1])
    upgrade(world.engine, "0001")
    upgrade(world.engine)
    assert dump() == before


# ------------------------------------------------------------------ what the models refuse


@pytest.fixture(scope="module")
def partial_client(world):
    """The same database served with only the model's 0-mlp source loaded."""
    served = world.models.model(world.lm.slug)
    models = ServedModels({world.lm.slug: ServedModel(served.lm,
                                                      {"0-mlp": served.sources["0-mlp"]})})
    app = create_app(Settings(database_url=world.url), engine=world.engine,
                     live=ModelQueue(models, InferenceLimits(max_tokens=MAX_TOKENS)))
    with TestClient(app, client=LOOPBACK) as c:
        yield c


def test_a_source_not_loaded_is_the_envelope_with_503_and_a_hint(partial_client, world,
                                                                 live_key):
    """The loaded models raise it; the one handler answers it like every other error."""
    model = world.lm.slug
    r = partial_client.post("/api/v1/activations", json={
        "model": model, "source": "1-mlp", "index": 0, "text": "x = 1"})
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store" and "retry-after" not in r.headers
    assert r.json() == {"ok": False, "status": 503, "error": (
        f"{model} has no live source '1-mlp'; live sources: 0-mlp (harvested sources are "
        "served live when their model and SAE files load as they were harvested)")}
    r = partial_client.get("/search.json", params={"model": model, "text": "x = 1",
                                                   "sources": "0-mlp,1-res-sae-48"},
                           headers={"x-api-key": live_key})
    assert r.status_code == 503 and r.json()["status"] == 503, r.text
    assert "no live source '1-res-sae-48'" in r.json()["error"]
    # the search page and the try box show it in place
    page = partial_client.post("/search", data={"model": model, "text": "x = 1",
                                                "sources": "1-mlp"})
    assert page.status_code == 503 and 'id="search-results"' in page.text
    assert "no live source &#39;1-mlp&#39;" in page.text
    part = partial_client.post(f"/{model}/1-mlp/0/try", data={"text": "x = 1"},
                               headers={"HX-Request": "true", "HX-Target": "try-result"})
    assert part.status_code == 200 and part.text.lstrip().startswith('<div id="try-result"')
    assert "no live source &#39;1-mlp&#39;" in part.text
    # the source that is loaded still answers, and a search without sources keeps to it
    out = _post(partial_client, "/api/v1/search", {"model": model, "text": "x = 1"})
    assert out["sources"] == ["0-mlp"]


def test_a_model_not_loaded_is_the_envelope_with_503(world):
    app = create_app(Settings(database_url=world.url), engine=world.engine,
                     live=ModelQueue(ServedModels({}), InferenceLimits()))
    with TestClient(app, client=LOOPBACK) as client:
        out = _post(client, "/api/v1/activations", {"model": world.lm.slug, "source": "0-mlp",
                                                    "index": 0, "text": "x"}, 503)
    assert out == {"ok": False, "status": 503, "error": (
        f"model '{world.lm.slug}' is not loaded for live inference; loaded: none (harvested "
        "sources are served live when their model and SAE files load as they were harvested)")}


def test_token_ids_the_model_cannot_take_are_the_envelope_with_422(client, world):
    """Checked by the loaded model, inside the queue: the same envelope."""
    vocab = world.lm.vocab_size
    out = _post(client, "/api/v1/activations", {"model": world.lm.slug, "source": "0-mlp",
                                                "index": 0, "tokens": [1, vocab, 2]}, 422)
    assert out == {"ok": False, "status": 422,
                   "error": f"token ids out of the vocabulary (0 to {vocab - 1}): [{vocab}]"}
    ids = [1, 2, 3]
    ok = _post(client, "/api/v1/activations", {"model": world.lm.slug, "source": "0-mlp",
                                               "index": 0, "tokens": ids})
    np.testing.assert_allclose(ok["values"], world.brute(ids)["0-mlp"][:, 0], rtol=1e-5,
                               atol=1e-6)


# ------------------------------------------------------------------ without --live


def test_without_live_the_api_says_how_to_enable_it(off_client, world):
    out = _post(off_client, "/api/v1/activations", {"model": world.lm.slug, "source": "0-mlp",
                                                    "index": 0, "text": "x"}, 503)
    assert "serve --live" in out["error"]
    out = _post(off_client, "/api/v1/search", {"model": world.lm.slug, "text": "x"}, 503)
    assert "serve --live" in out["error"]
    page = off_client.get(f"/{world.lm.slug}/0-mlp/0").text
    assert "featurescope serve --live" in page and 'id="try-text"' in page
    assert "featurescope serve --live" in off_client.get("/search").text
    # search by token reads the harvest: it works without a model
    assert off_client.get(f"/tokens.json?model={world.lm.slug}&token=the").status_code == 200


def test_the_server_without_live_imports_no_torch(world):
    code = ("import sys; from app.config import Settings; from app.main import create_app; "
            f"create_app(Settings(database_url={world.url!r})); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'workers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out.strip().replace("'", '"')) == []


# ------------------------------------------------------------------ the pages


def test_try_page_without_javascript_renders_the_text_on_the_feature_page(client, world):
    """The box's URL shows the text, ready to run (a GET runs nothing); its form posts it, and
    the answer is the page with the text highlighted (htmx: the box's result alone, the URL
    pushed)."""
    model = world.lm.slug
    text = "while True:\n    pass"
    url = f"/{model}/1-res-sae-48/7/try"
    r = client.get(url, params={"text": text})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert 'id="try-ready"' in r.text and "of its max over the dataset" not in r.text
    assert ">while True:\n    pass</textarea>" in r.text
    assert f'<form class="try" method="post" action="{url}"' in r.text
    ran = client.post(url, data={"text": text})
    assert ran.status_code == 200 and ran.headers["cache-control"] == "no-store"
    assert 'id="try-result"' in ran.text and "of its max over the dataset" in ran.text
    api = _post(client, "/api/v1/activations",
                {"model": model, "source": "1-res-sae-48", "index": 7, "text": text})
    part = client.post(url, data={"text": text},
                       headers={"HX-Request": "true", "HX-Target": "try-result"})
    assert part.text.lstrip().startswith('<div id="try-result"')
    assert part.text.count('<span class="t') == len(api["token_ids"])
    assert part.headers["hx-push-url"] == f"{url}?{urlencode({'text': text})}"
    long = client.post(f"/{model}/0-mlp/0/try", data={"text": " word" * 80},
                       headers={"HX-Request": "true", "HX-Target": "try-result"})
    assert long.status_code == 200 and f"at most {MAX_TOKENS} tokens" in long.text


@pytest.fixture(scope="module")
def live_url(client):
    with serve_in_thread(client.app) as url:
        yield url


@pytest.mark.browser
def test_browser_try_box_and_shared_search(browser, live_url, world, client, artifacts):
    """Type a text into the box on a feature page and see it highlighted; then open a search
    page's URL in a fresh page and get the same results."""
    model = world.lm.slug
    ctx = browser.new_context(base_url=live_url)
    page = ctx.new_page()
    problems = []
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(f"/{model}/1-res-sae-48/7")
    text = "import sys\nsys.exit(0)"
    page.fill("#try-text", text)
    page.click("form.try button[type=submit]")
    page.wait_for_selector("#try-result .ex")
    api = _post(client, "/api/v1/activations",
                {"model": model, "source": "1-res-sae-48", "index": 7, "text": text})
    spans = page.locator("#try-result .toks .t")
    assert spans.count() == len(api["token_ids"])
    peak = page.locator("#try-result .pk")
    assert peak.count() == 1
    assert peak.text_content() == api["tokens"][api["max_index"]].replace("\n", "↵")
    assert "/try?text=" in page.url  # the box's state is in the URL
    page.goto(page.url)  # the shared URL: the text in the box, run with one click
    assert page.input_value("#try-text") == text and page.locator("#try-ready").count() == 1
    page.click("form.try button[type=submit]")
    page.wait_for_selector("#try-result .ex")
    assert page.locator("#try-result .toks .t").count() == len(api["token_ids"])
    page.screenshot(path=str(artifacts / "try.png"))

    search = _post(client, "/api/v1/search", {"model": model, "text": text, "top": 5})
    page.goto(f"/search?model={model}")
    page.fill("#text", text)
    page.click("form.search-form button[type=submit]")
    page.wait_for_selector("#search-results .hit")
    shared = page.url
    assert "text=" in shared
    other = ctx.new_page()
    other.goto(shared)
    assert other.input_value("#text") == text
    other.click("form.search-form button[type=submit]")
    other.wait_for_selector("#search-results .hit")
    links = other.locator("#search-results .hit-head a")
    want = [f"{h['source']}/{h['index']}" for h in search["features"]]
    assert [links.nth(i).text_content() for i in range(min(5, links.count()))] == want
    other.screenshot(path=str(artifacts / "search.png"), full_page=True)
    other.goto(f"/tokens?model={model}&token=the")
    other.screenshot(path=str(artifacts / "tokens.png"))
    assert not problems, problems
    ctx.close()
