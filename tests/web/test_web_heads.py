"""Head pages and the head map over a real heads harvest of a tiny GPT-2: every number against
the stored metrics and a brute-force recomputation from the model's eager attention."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from support import eager_attentions, serve_in_thread

from app.config import Settings
from app.db.engine import make_engine, transaction
from app.db.tables import Source
from app.head_schemas import HeadPage
from app.main import create_app
from app.routes.heads import METRICS
from app.schemas import ModelPage
from workers.corpus import load_dataset
from workers.harvest import HarvestConfig
from workers.loading import load_model
from workers.runner import HarvestRunner, RunConfig

SEQ_LEN = 32
N_SEQ = 24


@pytest.fixture(scope="module")
def heads_db(tiny_gpt2_dir, tmp_path_factory):
    """Layer 0's neurons and every layer's heads of the tiny GPT-2, in a SQLite file."""
    url = f"sqlite:///{tmp_path_factory.mktemp('heads') / 'fs.db'}"
    cfg = HarvestConfig(top_k=4, n_ranges=2, per_range=2, window=12, batch_size=8)
    res = HarvestRunner(RunConfig(db_url=url, model=str(tiny_gpt2_dir), dataset="pydoc",
                                  layers="0", heads="all", max_tokens=N_SEQ * SEQ_LEN,
                                  seq_len=SEQ_LEN, harvest=cfg, progress_bar=False)).run()
    engine = make_engine(url)
    yield url, engine, res.model
    engine.dispose()


@pytest.fixture(scope="module")
def app(heads_db):
    url, engine, _ = heads_db
    return create_app(Settings(database_url=url), engine=engine)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def attn(tiny_gpt2_dir):
    lm = load_model(str(tiny_gpt2_dir))
    ds = load_dataset("pydoc", lm.tokenizer, seq_len=SEQ_LEN, max_tokens=N_SEQ * SEQ_LEN)
    return eager_attentions(lm, ds.tokens)


def stored_metrics(engine, source: str) -> dict:
    with transaction(engine) as session:
        return session.scalar(select_metrics(source))


def select_metrics(source: str):
    from sqlalchemy import select

    return select(Source.head_metrics).where(Source.slug == source)


@pytest.mark.parametrize("layer, head", [(0, 0), (1, 3)])
def test_head_page_json_equals_brute_force(client, heads_db, attn, layer, head):
    _, engine, model = heads_db
    page = HeadPage.model_validate(client.get(f"/{model}/{layer}-attn/{head}.json").json())
    assert (page.kind, page.layer, page.index) == ("heads", layer, head)
    a = attn[layer]
    peak = a[:, head, 1:, 1:].amax(-1).max(-1).values
    want = sorted(range(len(peak)), key=lambda s: (-peak[s].item(), s))[:4]
    assert [ex.seq_idx for ex in page.top] == want
    for ex in page.top:
        row = a[ex.seq_idx, head, ex.peak_pos]
        assert ex.peak_value == pytest.approx(float(row[1:].max()), rel=1e-5)
        np.testing.assert_array_equal(np.array(ex.acts, dtype=np.float16),
                                      row[ex.start:ex.start + len(ex.acts)].half().numpy())
        assert ex.key_pos == int(row[1:].argmax()) + 1
        assert ex.bos_weight == pytest.approx(float(row[0].half()), abs=0)
        window = a[ex.seq_idx, head, ex.start:ex.start + len(ex.acts),
                   ex.start:ex.start + len(ex.acts)]  # every window query's row
        np.testing.assert_array_equal(np.array(ex.rows, dtype=np.float16), window.half().numpy())
    stored = stored_metrics(engine, f"{layer}-attn")
    got = {m.name: (m.value, m.control) for m in page.head.metrics}
    assert list(got) == list(METRICS)
    for name in METRICS:
        assert got[name] == (stored["metrics"][name][head], stored["controls"][name])
    prev = a[:, head].diagonal(-1, 1, 2).double().mean()  # from every query q >= 1 to q - 1
    assert got["previous-token"][0] == pytest.approx(float(prev), rel=1e-5)
    hist = stored["distance_hist"][head]
    assert [b.mass for b in page.head.distance] == hist[:len(page.head.distance)]
    assert page.head.distance[-1].mass > 0 and not any(hist[len(page.head.distance):])


def test_head_page_marks_the_query_and_shows_metrics_with_controls(client, heads_db):
    _, _, model = heads_db
    url = f"/{model}/1-attn/2"
    page = HeadPage.model_validate(client.get(url + ".json").json())
    html = client.get(url).text
    assert "Head</span> 1.2" in html
    for m in page.head.metrics:
        assert f'id="metric-{m.name}"' in html
    assert html.count('class="t') >= len(page.top) * len(page.top[0].acts)
    assert html.count(" q\"") + html.count(" q pk\"") + html.count(" q bos\"") >= len(page.top)
    assert 'id="distance-hist"' in html
    # the generic views of a source serve a heads source too
    assert client.get(f"/{model}/1-attn").status_code == 200
    np_json = client.get(page.links.neuronpedia).json()
    assert np_json["index"] in ("2", 2)


def test_model_page_has_a_head_map_per_metric(client, heads_db):
    _, engine, model = heads_db
    for metric in ("induction", "previous-token"):
        url = f"/{model}" + ("" if metric == "induction" else f"?metric={metric}")
        ctx = ModelPage.model_validate(client.get(f"/{model}.json" + url[len(model) + 1:]).json())
        hm = ctx.head_map
        assert hm.metric == metric
        assert [layer.source for layer in hm.layers] == ["0-attn", "1-attn"]
        for layer in hm.layers:
            stored = stored_metrics(engine, layer.source)
            assert [c.value for c in layer.heads] == stored["metrics"][metric]
            assert layer.control == stored["controls"][metric]
            assert [c.url for c in layer.heads] == [f"/{model}/{layer.source}/{h}"
                                                    for h in range(4)]
        html = client.get(url).text
        assert html.count('class="cell"') == 8
        assert f'aria-current="true">{metric}<' in html
    bad = client.get(f"/{model}.json?metric=nope")
    assert bad.status_code == 404 and "unknown head metric" in bad.json()["error"]
    neurons_only = client.get(f"/{model}/0-mlp/0.json").json()
    assert "head" not in neurons_only


@pytest.fixture(scope="module")
def live_server(app):
    with serve_in_thread(app) as url:
        yield url


@pytest.mark.browser
def test_head_map_cell_opens_its_head_page(browser, live_server, heads_db, artifacts):
    _, _, model = heads_db
    ctx = browser.new_context(viewport={"width": 1200, "height": 900}, base_url=live_server)
    page = ctx.new_page()
    problems = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(f"/{model}?metric=previous-token")
    assert page.locator("#head-map a.cell").count() == 8
    page.locator("#heads").screenshot(path=str(artifacts / "head-map.png"))
    page.locator('#head-map a.cell[data-head="1.2"]').click()
    page.wait_for_url(f"**/{model}/1-attn/2")
    assert page.locator("h1").inner_text().endswith("1.2")
    assert page.locator(".head-ex .t.q").count() >= 1
    # hovering (or focusing) a token recolours its example by that token's own row
    ex = page.locator(".head-ex[data-rows]").first
    token = ex.locator(".t[data-row]").nth(5)
    row = [float(x) for x in token.get_attribute("data-row").split()]
    token.focus()
    classes = ex.locator(".toks .t").evaluate_all("els => els.map(e => e.className)")
    for cls, w in zip(classes, row, strict=True):
        k = min(round(w * 100), 100)
        assert (f"a{k}" in cls.split()) == (k > 0), (cls, w)
    assert "from" in classes[5].split()
    page.locator("#copy").focus()  # focus leaves the example: the peak query's row is back
    assert "from" not in ex.locator(".toks .t").nth(5).get_attribute("class").split()
    assert problems == []
    ctx.close()
