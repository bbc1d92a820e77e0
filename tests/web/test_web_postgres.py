"""The JSON pages once more, over the same harvest written to PostgreSQL."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.neuronpedia_schemas import NpFeature
from app.schemas import ErrorOut, FeaturePage, HomePage, ModelPage, SourcePage


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_json_pages_on_postgres(db_url, write_db, client):
    """Every page validates, and gives the same data as the SQLite copy of the harvest."""
    db = write_db(db_url, slice(0, 1))  # the tiny Llama: neurons, an SAE, a building source
    assert db.engine.dialect.name == "postgresql"
    with TestClient(create_app(Settings(database_url=db_url), engine=db.engine)) as pg:
        def get(url, schema, status=200):
            r = pg.get(url)
            assert r.status_code == status, (url, r.text[:200])
            return schema.model_validate_json(r.content)

        home = get("/.json", HomePage)
        assert {m.slug for m in home.models} == {db.llama}
        for m in home.models:
            model = get(m.json_url, ModelPage)
            for s in model.model.sources:
                page = get(s.json_url + "?sort=max_act&limit=20", SourcePage)
                lite = SourcePage.model_validate(client.get(s.json_url + "?sort=max_act&limit=20")
                                                 .json())
                assert [f.index for f in page.features] == [f.index for f in lite.features]
                if page.next_url:
                    nxt = get(page.next_url.replace("?", ".json?", 1), SourcePage)
                    assert nxt.features[0].max_act <= page.features[-1].max_act
                if s.status != "ready":
                    continue
                for i in (0, s.n_features - 1)[:1 if s.kind == "sae" else 2]:
                    url = f"/{m.slug}/{s.slug}/{i}.json"
                    a, b = get(url, FeaturePage), FeaturePage.model_validate(
                        client.get(url).json())
                    assert a.model_dump(exclude={"links"}) == b.model_dump(exclude={"links"})
                    get(f"/api/feature/{m.slug}/{s.slug}/{i}", NpFeature)
        err = get(f"/{db.llama}/1-mlp/96.json", ErrorOut, 404)
        assert err.status == 404
        get(f"/{db.llama}/1-mlp/x.json", ErrorOut, 422)
        r = pg.get(f"/{db.llama}/1-mlp/3.json")
        assert pg.get(f"/{db.llama}/1-mlp/3.json",
                      headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    db.engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_many_concurrent_requests_share_a_small_pool(db_url, write_db):
    """48 requests at once (pages and JSON) over a pool of 2 PostgreSQL connections: every one
    is answered, none waits out the pool's timeout (a session gives its connection back as
    soon as its view is done, not when a worker thread gets round to closing it)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from support import serve_in_thread

    from app.db.engine import make_engine

    db = write_db(db_url, slice(0, 1))
    engine = make_engine(db_url, pool_size=2, max_overflow=0, pool_timeout=5)
    app = create_app(Settings(database_url=db_url), engine=engine)
    urls = [f"/{db.llama}/1-mlp/{i % 40}" + (".json" if i % 2 else "") for i in range(48)]
    with serve_in_thread(app) as base, httpx.Client(base_url=base, timeout=60) as http:
        with ThreadPoolExecutor(max_workers=48) as pool:
            codes = list(pool.map(lambda u: http.get(u).status_code, urls))
    assert codes == [200] * len(urls)
    engine.dispose()
    db.engine.dispose()
