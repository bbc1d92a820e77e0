"""Explanations on the pages and search by meaning, over a real tiny harvest with explanations
and scores written straight into the database, on SQLite and PostgreSQL. Every judgement is
checked against its definition computed with numpy from the stored rows."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np
import pytest
from explanation_data import FILLER, SCRIPT, Written, source_id, write_explanations
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session
from support import fresh_pg_url, needs_embedder, needs_postgres

from app import embedding
from app.config import Settings
from app.db import queries
from app.db.tables import Explanation, ExplanationScore, Feature
from app.explanation_schemas import ExplanationSearchOut
from app.explanation_search import SearchIndex
from app.explanations import MIN_PAIRS
from app.main import create_app
from app.neuronpedia_schemas import NpFeature
from app.schemas import ErrorOut, FeaturePage, SourcePage


@dataclass
class Explained:
    db: object
    ids: Written
    client: TestClient
    app: object
    embedded: bool

    @property
    def model(self) -> str:
        return self.db.llama


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres",
                                                               marks=pytest.mark.postgres)])
def explained(request, write_db, tmp_path_factory):
    """The tiny Llama's harvest with the explanations of explanation_data, their vectors where
    the embedding model is installed, and the app over it."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('explained') / 'featurescope.db'}"
    else:
        needs_postgres()
        url = fresh_pg_url("fs_test_explained")
    db = write_db(url, slice(0, 1))
    ids = write_explanations(db.engine, db.llama)
    embedded = embedding.available() is None
    if embedded:
        assert embedding.store_missing_vectors(db.engine) == 24
    app = create_app(Settings(database_url=url), engine=db.engine)
    with TestClient(app) as client:
        yield Explained(db, ids, client, app, embedded)
    db.engine.dispose()


def get(client, url, schema, status=200):
    r = client.get(url)
    assert r.status_code == status, (url, r.text[:300])
    return schema.model_validate_json(r.content)


def stored_pairs(engine, sid: int) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """(values, controls) of a source's scores that have a control, by (scorer, model)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(ExplanationScore.scorer, ExplanationScore.scorer_model,
                   ExplanationScore.value, ExplanationScore.control)
            .join(Explanation, Explanation.id == ExplanationScore.explanation_id)
            .where(Explanation.source_id == sid, ExplanationScore.control.is_not(None))).all()
    out: dict = {}
    for scorer, model, value, control in rows:
        out.setdefault((scorer, model), ([], []))
        out[(scorer, model)][0].append(value)
        out[(scorer, model)][1].append(control)
    return {k: (np.array(v), np.array(c)) for k, (v, c) in out.items()}


def verdict(values, controls) -> str:
    d = values - controls
    if len(d) < MIN_PAIRS:
        return "too-few"
    return "informative" if d.mean() > 2 * d.std(ddof=1) / math.sqrt(len(d)) else "uninformative"


def test_feature_page_lists_explanations_best_first_with_judged_scores(explained):
    e = explained
    page = get(e.client, f"/{e.model}/1-mlp/3.json", FeaturePage)
    assert [x.id for x in page.explanations] == [e.ids.closing, e.ids.closing_other]
    best = page.explanations[0]
    assert (best.text, best.explainer, best.author, best.tokens_used, best.prompt_version) == (
        "closing parenthesis at the end of a call", "tokens", "tester", 123, "v1")
    assert [(s.scorer, s.value, s.control) for s in best.scores] == [
        ("detection", 0.91, 0.52), ("fuzzing", 0.64, 0.63)]
    other = page.explanations[1]
    assert (other.explainer, other.explainer_model) == ("local", "smollm2-135m-instruct")
    assert [s.value for s in other.scores] == [0.99, 0.71]  # highest first

    with Session(e.db.engine) as session:
        sid = source_id(session, e.model, "1-mlp")
    pairs = stored_pairs(e.db.engine, sid)
    assert {k: verdict(*v) for k, v in pairs.items()} == {
        ("detection", "smollm2-135m-instruct"): "informative",
        ("fuzzing", "smollm2-135m-instruct"): "uninformative",
        ("simulation", "gpt-4o-mini"): "too-few"}
    for page_index, scorers in ((3, {"detection", "fuzzing"}),
                                (10, {"detection", "fuzzing", "simulation"})):
        page = get(e.client, f"/{e.model}/1-mlp/{page_index}.json", FeaturePage)
        judged = {(j.scorer, j.scorer_model): j for j in page.scorers}
        assert {scorer for scorer, _ in judged} == scorers  # those that scored the feature
        for key, j in judged.items():
            values, controls = pairs[key]
            d = values - controls
            assert j.verdict == verdict(values, controls)
            assert j.n_pairs == len(d) == (4 if key[0] == "simulation" else 22)
            assert j.mean_value == pytest.approx(values.mean())
            assert j.mean_control == pytest.approx(controls.mean())
            assert j.mean_difference == pytest.approx(d.mean())
            assert j.standard_error == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)))
        for x in page.explanations:
            for s in x.scores:
                assert s.verdict == judged[(s.scorer, s.scorer_model)].verdict
    assert get(e.client, f"/{e.model}/1-mlp/0.json", FeaturePage).explanations == []


def test_feature_json_is_the_pydantic_document_with_explanations(explained):
    from app.routes.features import build_feature

    e = explained
    with Session(e.db.engine) as session:
        src = queries.source_by_slug(session, model=e.model, source="1-mlp")
        for i in (0, 3, 5, 10, 13):
            want = build_feature(session, e.app.state.vocabs, src, i).model_dump_json()
            got = e.client.get(f"/{e.model}/1-mlp/{i}.json").content
            assert json.loads(got) == json.loads(want), i


def test_feature_page_shows_explanations_as_text_and_marks_uninformative_scores(explained):
    e = explained
    html = e.client.get(f"/{e.model}/1-mlp/3").text
    head = html.split('<div class="fbody">')[0]  # under the header, before the examples
    assert "closing parenthesis at the end of a call" in head
    assert head.index("closing parenthesis") < head.index("python function definitions")
    assert "uninformative here" in head and "not enough scores to judge" not in head
    assert re.search(r'class="score uninformative"[^>]*>.*?fuzzing', head)
    assert re.search(r'class="score informative"[^>]*>.*?detection', head)
    script = e.client.get(f"/{e.model}/1-mlp/5").text
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in script
    assert "<script>window.__pwned" not in script
    few = e.client.get(f"/{e.model}/1-mlp/10").text
    assert "not enough scores to judge" in few
    assert 'id="no-explanations"' in e.client.get(f"/{e.model}/1-mlp/0").text


def test_neuronpedia_feature_fills_its_explanations(explained):
    e = explained
    r = e.client.get(f"/api/feature/{e.model}/1-mlp/3")
    np_feature = NpFeature.model_validate_json(r.content)
    first, second = r.json()["explanations"]
    assert [x.id for x in np_feature.explanations] == [str(e.ids.closing),
                                                       str(e.ids.closing_other)]
    assert (first["modelId"], first["layer"], first["source"], first["index"]) == (
        e.model, "1-mlp", "1-mlp", "3")
    assert first["description"] == "closing parenthesis at the end of a call"
    assert (first["typeName"], first["explanationModelName"], first["authorId"]) == (
        "tokens", None, "tester")
    assert second["explanationModelName"] == "smollm2-135m-instruct"
    assert first["scoreV1"] == 0.91
    score = first["scores"][0]
    assert (score["explanationScoreTypeName"], score["explanationScoreModelName"],
            score["value"], score["explanationId"]) == (
        "detection", "smollm2-135m-instruct", 0.91, str(e.ids.closing))
    details = json.loads(score["jsonDetails"])
    assert details == {"control": 0.52, "verdict": "informative",
                       "details": {"n_examples": 20}}


def _matching(engine, sid: int, word: str) -> set[int]:
    """Brute force: the features with an explanation that has the word."""
    with engine.connect() as conn:
        rows = conn.execute(select(Explanation.feature_idx, Explanation.text)
                            .where(Explanation.source_id == sid)).all()
    return {i for i, t in rows if re.search(rf"\b{word}\b", t, re.I)}


def test_source_table_has_each_features_best_explanation_and_a_filter(explained):
    e = explained
    page = get(e.client, f"/{e.model}/1-mlp.json", SourcePage)
    by_index = {f.index: f.explanation for f in page.features}
    assert by_index[3] == "closing parenthesis at the end of a call"
    assert by_index[5] == SCRIPT and by_index[0] is None
    assert by_index[12] == f"{FILLER[2]} (2)"
    assert page.q is None

    with Session(e.db.engine) as session:
        sid = source_id(session, e.model, "1-mlp")
        maxes = dict(session.execute(select(Feature.idx, Feature.max_act)
                                     .where(Feature.source_id == sid)).all())
    for word in ("parenthesis", "names", "sentence", "zebra"):
        want = _matching(e.db.engine, sid, word)
        # keyset pages of 2, by max activation, the filter kept through every page
        url, got = f"/{e.model}/1-mlp.json?sort=max_act&limit=2&q={word}", []
        while url:
            p = get(e.client, url, SourcePage)
            assert p.q == word
            got += [f.index for f in p.features]
            url = p.next_url.replace("?", ".json?", 1) if p.next_url else None
            assert url is None or f"q={word}" in url
        assert got == sorted(want, key=lambda i: (-maxes[i], -i)), word
    html = e.client.get(f"/{e.model}/1-mlp?q=parenthesis").text
    assert 'value="parenthesis"' in html and "closing parenthesis at the end" in html
    assert "No feature of this source has an explanation that matches zebra" in \
        e.client.get(f"/{e.model}/1-mlp?q=zebra").text


def search(client, query: str, **params) -> ExplanationSearchOut:
    r = client.get("/search/explanations.json", params={"q": query, **params})
    assert r.status_code == 200, r.text[:300]
    return ExplanationSearchOut.model_validate_json(r.content)


def test_search_puts_the_feature_whose_explanation_has_the_words_first(explained):
    e = explained
    for params in ({}, {"model": e.model}, {"model": e.model, "sources": "1-mlp"}):
        found = search(e.client, "closing parenthesis", **params)
        first = found.results[0]
        assert (first.model, first.source, first.index) == (e.model, "1-mlp", 3)
        assert (first.explanation_id, first.text_rank) == (e.ids.closing, 1)
        assert found.mode == ("hybrid" if e.embedded else "text")
        assert (found.note is None) == e.embedded
        assert found.searched == (24 if params.get("sources") is None else 23)
        assert found.with_vectors == (found.searched if e.embedded else 0)
        keys = [(h.source, h.index) for h in found.results]
        assert len(keys) == len(set(keys))  # one result per feature
    # the feature's other explanation finds it too, and stands for it
    found = search(e.client, "python function definitions", model=e.model)
    assert (found.results[0].index, found.results[0].explanation_id) == (
        3, e.ids.closing_other)
    sae = search(e.client, "html tags", model=e.model, sources="1-res-sae-48")
    assert {(h.source, h.index) for h in sae.results} == {("1-res-sae-48", 7)}
    assert sae.results[0].max_act is not None and sae.url.startswith("/search/explanations?")


def test_search_by_meaning_finds_explanations_without_the_words(explained):
    needs_embedder()
    e = explained
    found = search(e.client, "women called Mary or Anne", model=e.model)
    assert found.mode == "hybrid"
    assert all(h.text_rank is None for h in found.results)  # no explanation has the words
    first = found.results[0]
    assert first.text.startswith("female names") and first.meaning_rank == 1
    q = embedding.embed(["women called Mary or Anne"])[0]
    with Session(e.db.engine) as session:
        texts = dict(session.execute(select(Explanation.id, Explanation.text)).all())
    cos = {i: float(embedding.embed([t])[0] @ q) for i, t in texts.items()}
    assert first.similarity == pytest.approx(cos[first.explanation_id], abs=1e-5)
    assert first.similarity == pytest.approx(max(cos.values()), abs=1e-5)


def test_text_only_search_says_so_and_ranks_all_words_before_some(explained):
    e = explained
    app = create_app(Settings(database_url=e.db.url), engine=e.db.engine)
    app.state.search = SearchIndex(use_embedder=False)
    with TestClient(app) as client:
        found = search(client, "female names", model=e.model)
        assert found.mode == "text" and found.note
        texts = [h.text for h in found.results]
        n_full = sum(1 for t in texts if t.startswith("female names"))
        assert n_full == 2 and all(t.startswith("female names") for t in texts[:n_full])
        some = search(client, "parenthesis names", model=e.model)
        assert {h.index for h in some.results} == {3, 11, 21}
        for h in some.results:
            assert re.search(r"\b(parenthesis|names)\b", h.text)
        html = client.get("/search/explanations", params={"q": "female names"}).text
        assert 'id="search-note"' in html and "by their words only" in html


def test_search_pages_and_errors(explained):
    e = explained
    page = e.client.get("/search/explanations", params={"q": "closing parenthesis"})
    assert page.status_code == 200
    assert f'href="/{e.model}/1-mlp/3"' in page.text
    assert 'rel="alternate" type="application/json"' in page.text
    assert e.client.get("/search/explanations").status_code == 200  # the empty form
    bad = e.client.get("/search/explanations", params={"q": "x", "model": "nope"})
    assert bad.status_code == 404 and "unknown model" in bad.text and "error-msg" in bad.text
    for params, status in (({}, 422), ({"q": "x", "model": "nope"}, 404),
                           ({"q": "x", "sources": "1-mlp"}, 422),
                           ({"q": "x", "model": e.model, "sources": "0-res-sae-32"}, 404),
                           ({"q": "x", "offset": "-1"}, 422)):
        r = e.client.get("/search/explanations.json", params=params)
        assert r.status_code == status, (params, r.text)
        assert ErrorOut.model_validate_json(r.content).status == status
    script = e.client.get("/search/explanations", params={"q": "bold quotes"}).text
    assert "&lt;script&gt;window.__pwned" in script and "<script>window.__pwned" not in script


def test_search_pages_by_offset(explained):
    from app.explanation_search import search as run_search

    e = explained
    query = "names sentence weather nouns"
    with Session(e.db.engine) as session:
        whole = run_search(session, e.app.state.search, query=query, source_ids=None, limit=100)
        assert len(whole.hits) >= 4 and not whole.more
        pages, offset, more = [], 0, True
        while more:
            page = run_search(session, e.app.state.search, query=query, source_ids=None,
                              offset=offset, limit=3)
            pages += page.hits
            offset, more = offset + 3, page.more
    assert [h.row.id for h in pages] == [h.row.id for h in whole.hits]
    keys = [(h.row.source_id, h.row.feature_idx) for h in pages]
    assert len(keys) == len(set(keys))
    first = search(e.client, query)
    assert first.offset == 0 and first.next_offset is None  # under a page of 20


def test_neuronpedia_explanation_search_shapes(explained):
    e = explained
    c = e.client
    r = c.post("/api/explanation/search", json={
        "modelId": e.model, "layers": ["1-mlp"], "query": "closing parenthesis"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request"] == {"modelId": e.model, "layers": ["1-mlp"],
                               "query": "closing parenthesis", "offset": 0}
    first = body["results"][0]
    assert (first["modelId"], first["layer"], first["index"], first["description"]) == (
        e.model, "1-mlp", "3", "closing parenthesis at the end of a call")
    assert first["neuron"]["index"] == "3" and first["neuron"]["maxActApprox"] is not None
    assert (first["cosine_similarity"] is not None) == e.embedded
    assert body["resultsCount"] == len(body["results"])
    assert body["nextOffset"] == len(body["results"])
    model = c.post("/api/explanation/search-model",
                   json={"modelId": e.model, "query": "html tags"}).json()
    assert ("1-res-sae-48", "7") in {(h["layer"], h["index"]) for h in model["results"]}
    everything = c.post("/api/explanation/search-all", json={"query": "html tags"}).json()
    assert everything["request"]["modelId"] is None
    assert [h["id"] for h in everything["results"]] == [h["id"] for h in model["results"]]
    for path, payload, status in (
            ("search", {"modelId": e.model, "layers": ["nope"], "query": "x"}, 404),
            ("search", {"modelId": e.model, "layers": [], "query": "x"}, 422),
            ("search-model", {"modelId": "nope", "query": "x"}, 404),
            ("search-all", {"query": ""}, 422),
            ("search-all", {"query": "   "}, 422)):
        r = c.post(f"/api/explanation/{path}", json=payload)
        assert r.status_code == status, (path, payload, r.text)
        assert ErrorOut.model_validate_json(r.content).status == status


def test_pages_and_search_follow_new_explanations(db_url, write_db):
    """A page held by a client is stale once explanations change (its ETag moves), and the
    search index reads what was added and drops what was deleted."""
    from sqlalchemy import delete, insert

    db = write_db(db_url, slice(0, 1))
    app = create_app(Settings(database_url=db_url), engine=db.engine)
    embedded = embedding.available() is None
    with TestClient(app) as client:
        urls = [f"/{db.llama}/1-mlp/3", f"/{db.llama}/1-mlp/3.json", f"/{db.llama}/1-mlp",
                f"/api/feature/{db.llama}/1-mlp/3"]
        tags = {u: client.get(u).headers["etag"] for u in urls}
        for u in urls:
            assert client.get(u, headers={"If-None-Match": tags[u]}).status_code == 304
        assert search(client, "closing parenthesis").results == []
        with Session(db.engine) as session, session.begin():
            sid = source_id(session, db.llama, "1-mlp")
            new = session.execute(insert(Explanation).values(
                source_id=sid, feature_idx=3, text="closing parenthesis",
                explainer="human")).inserted_primary_key[0]
        if embedded:
            assert embedding.store_missing_vectors(db.engine) == 1
        for u in urls:
            r = client.get(u, headers={"If-None-Match": tags[u]})
            assert r.status_code == 200 and r.headers["etag"] != tags[u], u
        page = get(client, f"/{db.llama}/1-mlp/3.json", FeaturePage)
        assert [x.text for x in page.explanations] == ["closing parenthesis"]
        found = search(client, "closing parenthesis")
        assert [(h.index, h.meaning_rank is not None) for h in found.results] == [(3, embedded)]
        assert len(app.state.search.vectors) == (1 if embedded else 0)
        with Session(db.engine) as session, session.begin():  # one more, read on its own
            other = session.execute(insert(Explanation).values(
                source_id=sid, feature_idx=4, text="opening parenthesis",
                explainer="human")).inserted_primary_key[0]
        if embedded:
            assert embedding.store_missing_vectors(db.engine) == 1
        found = search(client, "opening parenthesis")
        assert (found.results[0].index, found.results[0].explanation_id) == (4, other)
        assert len(app.state.search.vectors) == (2 if embedded else 0)
        with Session(db.engine) as session, session.begin():
            session.execute(delete(Explanation).where(Explanation.id.in_([new, other])))
        assert search(client, "closing parenthesis").results == []
        assert len(app.state.search.vectors) == 0
        assert get(client, f"/{db.llama}/1-mlp/3.json", FeaturePage).explanations == []
    db.engine.dispose()
