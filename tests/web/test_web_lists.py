"""Lists of features with a note per feature, on SQLite and PostgreSQL: made with a write key,
shared by their link (`/lists/{id}` and its JSON), changed only by the key that made them (or an
admin one, or from loopback), put together from the feature pages without JavaScript, and
answered in Neuronpedia's shape to Neuronpedia's own Python client."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect
from sqlalchemy.orm import Session
from support import serve_in_thread

from app.config import Settings
from app.db import lists as store
from app.db.engine import make_engine, upgrade
from app.keys import create_key
from app.main import create_app

REMOTE = ("203.0.113.9", 40000)
NOTE = '<script>alert("x")</script> fires on "def" & friends'


@pytest.fixture(scope="module")
def db(llama_db):
    return llama_db


@pytest.fixture(scope="module")
def keys(db) -> dict[str, str]:
    with Session(db.engine) as session:
        return {name: create_key(session, name=f"{name} key", scope=scope)[1]
                for name, scope in (("alice", "write"), ("bob", "write"), ("admin", "admin"),
                                    ("reader", "read"))}


@pytest.fixture(scope="module")
def app(db):
    return create_app(Settings(database_url=db.url), engine=db.engine)


@pytest.fixture(scope="module")
def remote(app):
    with TestClient(app, client=REMOTE) as c:
        yield c


def key(name: str, keys) -> dict[str, str]:
    return {"x-api-key": keys[name]}


def test_a_list_shows_what_the_server_knows_of_each_feature(db, remote, keys):
    alice = key("alice", keys)
    r = remote.post("/api/v1/lists", json={"name": "code features", "description": "for <b>"},
                    headers=alice)
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["owner"] == "alice key" and made["features"] == []
    assert r.headers["location"] == made["url"] == f"/lists/{made['id']}"
    lid = made["id"]
    wanted = [("1-mlp", 3, NOTE), ("1-res-sae-48", 7, ""), ("0-mlp", 90, "second")]
    for source, index, note in wanted:
        r = remote.post(f"/api/v1/lists/{lid}/features", headers=alice,
                        json={"model": db.llama, "source": source, "index": index, "note": note})
        assert r.status_code == 200, r.text
    # a feature already there keeps its place and takes the new note
    r = remote.post(f"/api/v1/lists/{lid}/features", headers=alice,
                    json={"model": db.llama, "source": "0-mlp", "index": 90, "note": "renamed"})
    assert [f["note"] for f in r.json()["features"]] == [NOTE, "", "renamed"]
    # what the server does not have is refused
    for source, index, words in (("9-mlp", 0, "no source"), ("1-mlp", 10**6, "has no feature")):
        r = remote.post(f"/api/v1/lists/{lid}/features", headers=alice,
                        json={"model": db.llama, "source": source, "index": index})
        assert r.status_code == 404 and words in r.json()["error"]

    shared = remote.get(f"/lists/{lid}.json").json()  # read by anyone, without a key
    assert [(f["source"], f["index"]) for f in shared["features"]] == [
        (s, i) for s, i, _ in wanted]
    for f in shared["features"]:
        page = remote.get(f"{f['url']}.json").json()
        assert f["harvested"] and f["max_act"] == page["stats"]["max_act"]
        assert f["frac_active"] == page["stats"]["frac_active"]
        assert f["top_tokens"] == page["top_tokens"]
    html = remote.get(f"/lists/{lid}").text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; fires on &#34;def&#34; &amp; friends" \
        in html and "<script>alert" not in html
    assert f'href="/{db.llama}/1-res-sae-48/7"' in html
    assert f'<link rel="alternate" type="application/json" href="/lists/{lid}.json">' in html
    assert any(x["id"] == lid and x["n_features"] == 3
               for x in remote.get("/lists.json").json()["lists"])

    r = remote.delete(f"/api/v1/lists/{lid}/features/{db.llama}/1-res-sae-48/7", headers=alice)
    assert [f["index"] for f in r.json()["features"]] == [3, 90]
    assert remote.delete(f"/api/v1/lists/{lid}/features/{db.llama}/1-res-sae-48/7",
                         headers=alice).status_code == 404
    assert remote.delete(f"/api/v1/lists/{lid}", headers=alice).json() == {
        "ok": True, "deleted": lid}
    assert remote.get(f"/lists/{lid}.json").status_code == 404


def test_only_the_key_that_made_a_list_or_an_admin_changes_it(db, remote, local, keys):
    lid = remote.post("/api/v1/lists", json={"name": "alice's"},
                      headers=key("alice", keys)).json()["id"]
    item = {"model": db.llama, "source": "1-mlp", "index": 1}
    r = remote.post(f"/api/v1/lists/{lid}/features", json=item, headers=key("bob", keys))
    assert r.status_code == 403 and "made with another key" in r.json()["error"]
    assert remote.delete(f"/api/v1/lists/{lid}", headers=key("bob", keys)).status_code == 403
    assert remote.post(f"/api/v1/lists/{lid}/features", json=item,
                       headers=key("reader", keys)).status_code == 403
    assert remote.post(f"/api/v1/lists/{lid}/features", json=item,
                       headers=key("admin", keys)).status_code == 200
    assert local.post(f"/api/v1/lists/{lid}/features", json={**item, "index": 2}).status_code \
        == 200
    # a list made without a key (from loopback) may be changed by any write key
    open_list = local.post("/api/v1/lists", json={"name": "local"}).json()
    assert open_list["owner"] is None
    assert remote.post(f"/api/v1/lists/{open_list['id']}/features", json=item,
                       headers=key("bob", keys)).status_code == 200


def test_a_list_holds_at_most_its_cap(db, local, monkeypatch):
    monkeypatch.setattr(store, "MAX_FEATURES", 2)
    lid = local.post("/api/v1/lists", json={"name": "small"}).json()["id"]
    for i in range(2):
        assert local.post(f"/api/v1/lists/{lid}/features",
                          json={"model": db.llama, "source": "1-mlp", "index": i}).status_code \
            == 200
    r = local.post(f"/api/v1/lists/{lid}/features",
                   json={"model": db.llama, "source": "1-mlp", "index": 5})
    assert r.status_code == 422 and "holds 2 features" in r.json()["error"]


def test_from_a_feature_page_to_a_list_without_javascript(db, local):
    page = local.get(f"/{db.llama}/1-mlp/4").text
    add_url = f"/lists/add?model={db.llama}&source=1-mlp&index=4"
    assert f'href="{add_url.replace("&", "&amp;")}"' in page
    form = local.get(add_url).text
    assert 'method="post"' in form and 'name="new_list"' in form and 'name="note"' in form
    r = local.post("/lists/add", follow_redirects=False, data={
        "model": db.llama, "source": "1-mlp", "index": "4", "note": "plain form",
        "new_list": "from the page"})
    assert r.status_code == 303
    lst = local.get(r.headers["location"] + ".json").json()
    assert lst["name"] == "from the page"
    assert [(f["index"], f["note"]) for f in lst["features"]] == [(4, "plain form")]
    assert f'value="{lst["id"]}"' in local.get(add_url).text  # now offered on the form
    r = local.post("/lists/add", follow_redirects=False, data={
        "model": db.llama, "source": "1-mlp", "index": "5", "list": lst["id"]})
    assert r.headers["location"] == lst["url"]
    r = local.post(f"{lst['url']}/remove", follow_redirects=False,
                   data={"model": db.llama, "source": "1-mlp", "index": "4"})
    assert r.status_code == 303
    assert [f["index"] for f in local.get(lst["url"] + ".json").json()["features"]] == [5]
    r = local.post("/lists", follow_redirects=False, data={"name": "empty one"})
    assert r.status_code == 303 and "No features on this list yet" in local.get(
        r.headers["location"]).text
    assert local.post("/lists/add", data={"model": db.llama, "source": "1-mlp",
                                          "index": "4"}).status_code == 422  # no list chosen


def test_neuronpedia_list_get_answers_neuronpedia_shape(db, remote, keys):
    alice = key("alice", keys)
    lid = remote.post("/api/v1/lists", json={"name": "np", "description": "d"},
                      headers=alice).json()["id"]
    for index, note in ((3, "first"), (0, "")):
        remote.post(f"/api/v1/lists/{lid}/features", headers=alice,
                    json={"model": db.llama, "source": "1-mlp", "index": index, "note": note})
    for path in ("/api/list/get", "/api/list/get/"):
        r = remote.post(path, json={"listId": lid})
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["id"], out["name"], out["description"]) == (lid, "np", "d")
        assert out["user"] == {"name": "alice key"} and out["userId"] == "alice key"
        assert [(n["modelId"], n["layer"], n["index"], n["description"])
                for n in out["neurons"]] == [(db.llama, "1-mlp", "3", "first"),
                                             (db.llama, "1-mlp", "0", "")]
        for n in out["neurons"]:
            feature = remote.get(f"/api/feature/{db.llama}/1-mlp/{n['index']}").json()
            assert n["neuron"]["maxActApprox"] == feature["maxActApprox"]
            assert n["neuron"]["activations"] == feature["activations"][:3]
    r = remote.post("/api/list/get", json={"listId": "nope"})
    assert r.status_code == 404 and r.json()["error"] == "no list 'nope'"


def test_neuronpedias_own_client_makes_fills_and_reads_lists(db, app, keys, monkeypatch):
    """The official `neuronpedia` package, pointed at this server, with a write key."""
    from neuronpedia.np_list import NPList, NPListItem
    from neuronpedia.requests.base_request import NPRequest

    with serve_in_thread(app) as url:
        monkeypatch.setattr(NPRequest, "BASE_URL", f"{url}/api")
        monkeypatch.setenv("NEURONPEDIA_API_KEY", keys["bob"])
        made = NPList.new("from the client", "made by neuronpedia's client")
        made.add_items([NPListItem(model_id=db.llama, source="1-mlp", index="6",
                                   description="six"),
                        NPListItem(model_id=db.llama, source="1-res-sae-48", index="2")])
        got = NPList.get(made.id)
        assert (got.name, got.description) == ("from the client", "made by neuronpedia's client")
        assert [(i.model_id, i.source, i.index) for i in got.items] == [
            (db.llama, "1-mlp", "6"), (db.llama, "1-res-sae-48", "2")]
        owned = NPList.get_owned()
        assert [x.id for x in owned] == [made.id]  # bob's only
    assert os.environ["NEURONPEDIA_API_KEY"] == keys["bob"]


def test_migration_0005_goes_up_and_down(db_url):
    engine = make_engine(db_url)
    upgrade(engine, "0004")
    assert not {"api_keys", "lists", "list_features"} & set(inspect(engine).get_table_names())
    upgrade(engine)
    assert {"api_keys", "lists", "list_features"} <= set(inspect(engine).get_table_names())
    upgrade(engine, "0004")
    assert not {"api_keys", "lists", "list_features"} & set(inspect(engine).get_table_names())
    engine.dispose()
