"""The JSON twin of every page: schemas, stored data, errors, keyset pages and ETags."""

from __future__ import annotations

import struct

import pytest
from sqlalchemy import select
from support import stored_examples

from app.db.tables import ExampleGroup, Feature, Sequence, Source, Vocabulary
from app.histogram import histogram_edges
from app.schemas import ErrorOut, FeaturePage, HomePage, ModelPage, SourcePage


def get_json(client, url, schema, status=200):
    r = client.get(url)
    assert r.status_code == status, (url, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    return schema.model_validate_json(r.content)


def feature_urls(client, web_db):
    """Every (model, source, index) of the ready sources, a few features each."""
    home = get_json(client, "/.json", HomePage)
    for m in home.models:
        for s in m.sources:
            if s.status == "ready":
                for i in (0, 1, s.n_features // 2, s.n_features - 1):
                    yield m.slug, s, i


def test_every_page_validates_against_its_schema(client, web_db):
    home = get_json(client, "/.json", HomePage)
    slugs = {m.slug for m in home.models}
    assert {web_db.llama, web_db.gpt2} <= slugs
    for m in home.models:
        page = get_json(client, m.json_url, ModelPage)
        assert page.model.slug == m.slug
        for s in page.model.sources:
            sp = get_json(client, s.json_url, SourcePage)
            assert sp.source.slug == s.slug
    n = 0
    for model, s, i in feature_urls(client, web_db):
        fp = get_json(client, f"/{model}/{s.slug}/{i}.json", FeaturePage)
        assert (fp.model, fp.source, fp.index, fp.hook_name) == (model, s.slug, i, s.hook_name)
        n += 1
    assert n >= 16


def test_feature_json_is_the_pydantic_document(client, app, web_db):
    """The feature JSON is written without pydantic (the hot path of the API): it must be the
    document that `build_feature(...).model_dump_json()` writes, on every feature."""
    import json

    from sqlalchemy.orm import Session

    from app.db import queries
    from app.routes.features import build_feature

    n = 0
    with Session(web_db.engine) as session:
        for model, s, _ in feature_urls(client, web_db):
            src = queries.source_by_slug(session, model=model, source=s.slug)
            for i in range(s.n_features) if n == 0 else (0, s.n_features - 1):
                want = build_feature(session, app.state.vocabs, src, i).model_dump_json()
                got = client.get(f"/{model}/{s.slug}/{i}.json").content
                assert json.loads(got) == json.loads(want), (model, s.slug, i)
                n += 1
    assert n > 16


def test_home_lists_sources_with_kind_hook_count_dataset_and_progress(client, web_db):
    home = get_json(client, "/.json", HomePage)
    llama = next(m for m in home.models if m.slug == web_db.llama)
    by_slug = {s.slug: s for s in llama.sources}
    assert set(by_slug) == {"0-mlp", "1-mlp", "1-res-sae-48", "0-res-sae-32"}
    assert by_slug["1-mlp"].kind == "neurons" and by_slug["1-mlp"].n_features == 96
    assert by_slug["1-mlp"].hook_name == "blocks.1.mlp.hook_post"
    assert by_slug["1-res-sae-48"].kind == "sae"
    building = by_slug["0-res-sae-32"]
    assert building.status == "building"
    assert 0 < building.progress < 1
    assert building.progress == pytest.approx(building.progress_tokens / building.total_tokens)
    assert all(s.dataset.startswith("pydoc-") for s in llama.sources)


def test_feature_json_matches_the_stored_rows(client, web_db):
    with web_db.engine.connect() as conn:
        src = conn.execute(select(Source).where(Source.slug == "1-mlp")).one()
        vocab = conn.scalar(select(Vocabulary.tokens).where(Vocabulary.model_id == src.model_id))
        feat = conn.execute(select(Feature).where(Feature.source_id == src.id,
                                                  Feature.idx == 5)).one()
        rows = stored_examples(conn, src.id, 5)
        seqs = dict(conn.execute(select(Sequence.idx, Sequence.tokens).where(
            Sequence.dataset_id == src.dataset_id)).all())
    fp = get_json(client, f"/{web_db.llama}/1-mlp/5.json", FeaturePage)
    assert fp.stats.max_act == feat.max_act and fp.stats.frac_active == feat.frac_active
    assert fp.histogram.counts == feat.histogram
    assert fp.histogram.edges[-1] is None and fp.histogram.edges[:-1] == histogram_edges()[:-1]
    assert [(t.id, t.value) for t in fp.top_logits] == [tuple(x) for x in feat.top_logits]
    assert [t.text for t in fp.bottom_logits] == [vocab[t] for t, _ in feat.bottom_logits]
    assert [(t.id, t.count) for t in fp.top_tokens] == [tuple(x) for x in feat.top_tokens]

    shown = {"top": fp.top, "bottom": fp.bottom}
    for g in fp.quantiles:
        shown[g.name] = g.examples
    assert sum(len(v) for v in shown.values()) == len(rows)
    for row in rows:
        group = ExampleGroup.name_of(row.group)
        ex = next(e for e in shown[group] if e.rank == row.rank)
        acts = struct.unpack(f"<{len(row.acts) // 2}e", row.acts)
        ids = struct.unpack(f"<{len(seqs[row.seq_idx]) // 4}i", seqs[row.seq_idx])
        # the shortest decimals that read back to exactly the stored float16 values
        assert struct.pack(f"<{len(ex.acts)}e", *ex.acts) == row.acts
        assert all(len(repr(a)) <= len(repr(b)) for a, b in zip(ex.acts, acts, strict=True))
        assert ex.token_ids == list(ids[row.start:row.start + len(acts)])
        assert ex.tokens == [vocab[t] for t in ex.token_ids]
        assert (ex.seq_idx, ex.start, ex.peak_pos, ex.peak_value) == (
            row.seq_idx, row.start, row.peak_pos, row.peak_value)
        assert ex.peak_index == row.peak_pos - row.start
        assert ex.acts[ex.peak_index] == pytest.approx(row.peak_value, rel=1e-3, abs=1e-3)
    assert [e.peak_value for e in fp.top] == sorted((e.peak_value for e in fp.top), reverse=True)
    assert fp.bottom and min(e.peak_value for e in fp.bottom) < 0  # neurons go negative
    # ranges highest first, each with its examples highest first
    assert [g.group for g in fp.quantiles] == sorted((g.group for g in fp.quantiles), reverse=True)
    for g in fp.quantiles:
        values = [e.peak_value for e in g.examples]
        assert values == sorted(values, reverse=True) and (g.lo, g.hi) == (min(values), max(values))
    assert fp.bos_first
    assert fp.links.prev == f"/{web_db.llama}/1-mlp/4" and fp.links.next == f"/{web_db.llama}/1-mlp/6"


def test_sae_source_has_no_bottom_examples_and_shows_its_metrics(client, web_db):
    fp = get_json(client, f"/{web_db.llama}/1-res-sae-48/3.json", FeaturePage)
    assert fp.kind == "sae" and fp.bottom == []
    assert fp.top and all(a >= 0 for e in fp.top for a in e.acts)
    sp = get_json(client, f"/{web_db.llama}/1-res-sae-48.json", SourcePage)
    assert sp.source.metrics.l0 == 11.5 and sp.source.metrics.dead_fraction == 0.0208
    assert sp.source.sae_config["d_sae"] == 48


def test_first_and_last_features_have_no_prev_or_next(client, web_db):
    first = get_json(client, f"/{web_db.llama}/0-mlp/0.json", FeaturePage)
    last = get_json(client, f"/{web_db.llama}/0-mlp/95.json", FeaturePage)
    assert first.links.prev is None and first.links.next.endswith("/1")
    assert last.links.next is None and last.links.prev.endswith("/94")


@pytest.mark.parametrize("sort,order", [("index", "asc"), ("index", "desc"),
                                        ("max_act", "desc"), ("max_act", "asc"),
                                        ("frac_active", "desc"), ("frac_active", "asc")])
def test_keyset_pages_walk_every_feature_once_in_order(client, web_db, sort, order):
    url = f"/{web_db.llama}/1-mlp.json?sort={sort}&order={order}&limit=7"
    seen, pages = [], 0
    while url:
        page = get_json(client, url, SourcePage)
        assert len(page.features) <= 7
        seen += page.features
        pages += 1
        url = page.next_url and page.next_url.replace(f"/{web_db.llama}/1-mlp?",
                                                      f"/{web_db.llama}/1-mlp.json?")
    assert sorted(f.index for f in seen) == list(range(96))
    key = {"index": lambda f: (f.index,), "max_act": lambda f: (f.max_act, f.index),
           "frac_active": lambda f: (f.frac_active, f.index)}[sort]
    assert [key(f) for f in seen] == sorted((key(f) for f in seen), reverse=order == "desc")
    assert pages == 14


def test_page_tokens_are_opaque_and_checked(client, web_db):
    base = f"/{web_db.llama}/1-mlp.json"
    first = get_json(client, base + "?sort=max_act&limit=5", SourcePage)
    token = first.next
    assert token and "max_act" not in token
    again = get_json(client, f"{base}?sort=max_act&limit=5&next={token}", SourcePage)
    assert again.features[0].index != first.features[0].index
    for bad in ("zzz", "e30", token + "x"):
        err = get_json(client, f"{base}?sort=max_act&next={bad}", ErrorOut, 422)
        assert err.status == 422 and "next" in err.error
    err = get_json(client, f"{base}?sort=index&next={token}", ErrorOut, 422)
    assert "another sort" in err.error
    get_json(client, f"{base}?limit=501", ErrorOut, 422)


@pytest.mark.parametrize("path,status,needle", [
    ("/no-such-model.json", 404, "unknown model"),
    ("/{llama}/no-such-source.json", 404, "no source"),
    ("/{llama}/1-mlp/96.json", 404, "no feature 96"),
    ("/{llama}/1-mlp/100000.json", 404, "no feature"),
    ("/{llama}/0-res-sae-32/1.json", 404, "still being harvested"),
    ("/{llama}/1-mlp/abc.json", 422, "index"),
    ("/{llama}/1-mlp/-1.json", 422, "index"),
    ("/{llama}/1-mlp/1.5.json", 422, "index"),
    ("/{llama}/1-mlp/99999999999999999999.json", 422, "index"),
    ("/bad%20slug.json", 422, "model"),
    ("/{llama}/%3Cscript%3E.json", 422, "source"),
    ("/api/feature/{llama}/1-mlp/x", 422, "index"),
    ("/api/feature/{llama}/1-mlp/96", 404, "no feature"),
    ("/api/feature/nope/1-mlp/1", 404, "unknown model"),
    ("/api/v1/random/{llama}/nope", 404, "no source"),
    ("/api/v1/random/{llama}/0-res-sae-32", 404, "no features"),
    ("/a/b/c/d.json", 404, "nothing at"),
])
def test_errors_share_one_envelope(client, web_db, path, status, needle):
    url = path.format(llama=web_db.llama)
    get_json(client, url, ErrorOut, status)
    body = client.get(url).json()
    assert set(body) == {"ok", "status", "error"}
    assert body["ok"] is False and body["status"] == status
    assert isinstance(body["error"], str) and needle in body["error"]


def test_html_errors_are_pages_with_the_same_status(client, web_db):
    for path, status in ((f"/{web_db.llama}/1-mlp/96", 404), (f"/{web_db.llama}/1-mlp/x", 422),
                         ("/nope", 404)):
        r = client.get(path)
        assert r.status_code == status and r.headers["content-type"].startswith("text/html")
        assert f"<h1>{status}</h1>" in r.text
    r = client.get("/nope", headers={"accept": "application/json"})
    assert r.json()["status"] == 404


def test_finished_sources_answer_304_to_their_etag(client, web_db):
    for url in (f"/{web_db.llama}/1-mlp/3.json", f"/{web_db.llama}/1-mlp/3",
                f"/{web_db.llama}/1-mlp", f"/api/feature/{web_db.llama}/1-mlp/3"):
        r = client.get(url)
        tag = r.headers["etag"]
        again = client.get(url, headers={"If-None-Match": tag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == tag
        other = client.get(url, headers={"If-None-Match": '"something-else"'})
        assert other.status_code == 200
    # the JSON, the page and the htmx fragment of one URL are different representations
    tags = {client.get(f"/{web_db.llama}/1-mlp/3{s}", headers=h).headers["etag"]
            for s, h in ((".json", {}), ("", {}), ("", {"HX-Request": "true"}))}
    assert len(tags) == 3
    # a source still being harvested changes: no ETag
    r = client.get(f"/{web_db.llama}/0-res-sae-32.json")
    assert r.status_code == 200 and "etag" not in r.headers


def test_random_and_jump_redirect_to_feature_pages(client, web_db):
    r = client.get(f"/api/v1/random/{web_db.llama}/1-mlp", follow_redirects=False)
    assert r.status_code == 303 and r.headers["cache-control"] == "no-store"
    index = int(r.headers["location"].rsplit("/", 1)[1])
    assert r.headers["location"] == f"/{web_db.llama}/1-mlp/{index}" and 0 <= index < 96
    r = client.get(f"/{web_db.llama}/1-mlp?jump=42", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/{web_db.llama}/1-mlp/42"
    assert client.get(f"/{web_db.llama}/1-mlp?jump=x").status_code == 422


def test_openapi_describes_the_json_pages(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for p in ("/.json", "/{model}.json", "/{model}/{source}.json",
              "/{model}/{source}/{index}.json", "/api/feature/{model}/{source}/{index}",
              "/api/v1/random/{model}/{source}"):
        assert p in paths, p
    assert "FeaturePage" in spec["components"]["schemas"]
    assert "ErrorOut" in spec["components"]["schemas"]
