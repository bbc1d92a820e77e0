"""Live inference (`serve --live`): your own text through a real tiny model and a real SAE loaded
from its files, against the stored examples and against brute force; searches by text and by
token; the 413 and 503 limits; the pages, in a real browser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select
from support import CHROMIUM, fresh_pg_url, postgres_available, random_sae, serve_in_thread

from app.config import Settings
from app.db.engine import make_engine, upgrade
from app.db.tables import ExampleBlock, PeakToken
from app.live import LiveLimits, LiveService
from app.main import create_app
from workers import store
from workers.corpus import load_dataset
from workers.finalize import finalize
from workers.harvest import HarvestConfig, Harvester, neuron_sources, run_harvest
from workers.live import LiveModels
from workers.models import load_model
from workers.sae import sae_sources, save_sae

SEQ_LEN = 32
MAX_TOKENS = 48
SAE_HOOK = "blocks.1.hook_resid_post"


class World:
    """A tiny Llama harvested (neurons of layers 0 and 1, and an SAE) into a SQLite file."""

    def __init__(self, model_dir, tmp, url: str):
        self.lm = load_model(str(model_dir))
        sae = random_sae("topk", d_in=self.lm.d_model, d_sae=48, hook=SAE_HOOK, seed=3)
        self.sae_dir = save_sae(sae, tmp / "sae")
        self.sae = sae
        self.cfg = HarvestConfig(top_k=5, n_ranges=2, per_range=2, window=12, batch_size=8,
                                 shard_sequences=64)
        self.ds = load_dataset("pydoc", self.lm.tokenizer, seq_len=SEQ_LEN,
                               max_tokens=24 * SEQ_LEN)
        self.specs = neuron_sources(self.lm, [0, 1]) + sae_sources(self.lm, [str(self.sae_dir)])
        states = run_harvest(Harvester(self.lm, self.ds.tokens, self.specs, self.cfg,
                                       bos_first=True))
        self.url = url
        self.engine = make_engine(self.url)
        upgrade(self.engine)
        reg = store.begin(self.engine, self.lm, self.ds, self.specs, self.cfg)
        store.write(self.engine, reg, finalize(self.lm, self.ds, self.specs, states, self.cfg))
        self.states = states
        self.models = LiveModels.load(self.engine, device="cpu")

    def brute(self, ids: list[int]) -> dict[str, np.ndarray]:
        """Every source's activations at every token, straight from the model and the SAE."""
        out = {}
        x = torch.tensor([ids])
        hooks = [s.hook_name for s in self.specs]

        def take(name, act):
            for s in self.specs:
                if s.hook_name == name:
                    a = act if s.kind == "neurons" else self.sae.encode(act)
                    out[s.slug] = a[0].float().numpy().copy()

        self.lm.run_with_hooks(x, hooks, take)
        return out


@pytest.fixture(scope="module",
                params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def world(request, tiny_llama_dir, tmp_path_factory) -> World:
    """The world in a SQLite file, and in a fresh PostgreSQL database."""
    tmp = tmp_path_factory.mktemp("live")
    if request.param == "sqlite":
        return World(tiny_llama_dir, tmp, f"sqlite:///{tmp / 'live.db'}")
    reason = postgres_available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI requires PostgreSQL)")
        pytest.skip(reason)
    return World(tiny_llama_dir, tmp, fresh_pg_url("fs_test_live"))


@pytest.fixture(scope="module")
def live(world) -> LiveService:
    return LiveService(world.models, LiveLimits(max_tokens=MAX_TOKENS, max_texts=4, max_wait=0.3))


@pytest.fixture(scope="module")
def client(world, live):
    app = create_app(Settings(database_url=world.url), engine=world.engine, live=live)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def off_client(world):
    """The same database served without --live."""
    with TestClient(create_app(Settings(database_url=world.url), engine=world.engine)) as c:
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


def test_neuronpedia_activation_new_gives_the_same_values(client, world):
    text = "class A(object):\n    pass"
    ours = _post(client, "/api/v1/activations",
                 {"model": world.lm.slug, "source": "1-mlp", "index": 9, "text": text})
    theirs = _post(client, "/api/activation/new", {
        "feature": {"modelId": world.lm.slug, "source": "1-mlp", "index": "9"},
        "customText": text})
    assert theirs == {"tokens": ours["tokens"], "values": ours["values"],
                      "maxValue": ours["max_value"], "maxValueTokenIndex": ours["max_index"],
                      "minValue": min(ours["values"])}


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


def test_search_page_holds_its_query_and_matches_the_api(client, world):
    text = "for i in range(10):"
    api = _post(client, "/api/v1/search", {"model": world.lm.slug, "text": text,
                                           "sources": ["1-res-sae-48", "0-mlp"]})
    assert api["sources"] == ["1-res-sae-48", "0-mlp"]
    query = parse_qs(urlsplit(api["url"]).query)
    assert query == {"model": [world.lm.slug], "text": [text], "sources": ["1-res-sae-48,0-mlp"]}
    again = client.get(api["url"].replace("/search?", "/search.json?")).json()
    assert again == api
    page = client.get(api["url"])
    assert page.status_code == 200
    for hit in api["features"][:5]:
        assert f'href="{hit["url"]}"' in page.text
    assert "for i in range(10):" in page.text  # the query, back in the box


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
    assert {x["token_id"] for x in out["features"]} <= {bare, spaced}
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


# ------------------------------------------------------------------ without --live


def test_without_live_the_api_says_how_to_enable_it(off_client, world):
    out = _post(off_client, "/api/v1/activations", {"model": world.lm.slug, "source": "0-mlp",
                                                    "index": 0, "text": "x"}, 503)
    assert "serve --live" in out["error"]
    assert _post(off_client, "/api/v1/search", {"model": world.lm.slug, "text": "x"}, 503)
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
    model = world.lm.slug
    text = "while True:\n    pass"
    r = client.get(f"/{model}/1-res-sae-48/7/try", params={"text": text})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert 'id="try-result"' in r.text and "of its max over the dataset" in r.text
    api = _post(client, "/api/v1/activations",
                {"model": model, "source": "1-res-sae-48", "index": 7, "text": text})
    part = client.get(f"/{model}/1-res-sae-48/7/try", params={"text": text},
                      headers={"HX-Request": "true", "HX-Target": "try-result"})
    assert part.text.lstrip().startswith('<div id="try-result"')
    assert part.text.count('<span class="t') == len(api["token_ids"])
    long = client.get(f"/{model}/0-mlp/0/try", params={"text": " word" * 80},
                      headers={"HX-Request": "true", "HX-Target": "try-result"})
    assert long.status_code == 200 and f"at most {MAX_TOKENS} tokens" in long.text


@pytest.fixture(scope="module")
def live_url(client):
    with serve_in_thread(client.app) as url:
        yield url


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed (make browser)")
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
    page.goto(page.url)  # reload the shared URL: the same result, rendered by the server
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
    links = other.locator("#search-results .hit-head a")
    want = [f"{h['source']}/{h['index']}" for h in search["features"]]
    assert [links.nth(i).text_content() for i in range(min(5, links.count()))] == want
    other.screenshot(path=str(artifacts / "search.png"), full_page=True)
    other.goto(f"/tokens?model={model}&token=the")
    other.screenshot(path=str(artifacts / "tokens.png"))
    assert not problems, problems
    ctx.close()
