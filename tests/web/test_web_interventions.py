"""Interventions through the server (`serve --live`): `POST /api/v1/steer|ablate|patch` and
Neuronpedia's `/api/steer` against the workers and brute force, the limits, the pages `/steer`
and `/patch` (whose URLs hold the request and never run the model) and the feature page's steer
link and effect box, in a real browser too."""

from __future__ import annotations

import html
import math
import re
import threading
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from support import LOOPBACK, random_sae, serve_in_thread

from app import urls
from app.config import Settings
from app.db.engine import make_engine, upgrade
from app.intervention_schemas import IOI
from app.main import create_app
from app.model_queue import InferenceLimits, ModelQueue
from app.routes import patch as patch_routes
from app.routes.present import fmt
from workers import store
from workers.ablation import Ablation, ablate
from workers.corpus import load_dataset
from workers.finalize import finalize
from workers.harvest import HarvestConfig, Harvester, neuron_sources, run_harvest
from workers.inference import ServedModels
from workers.loading import load_model
from workers.patching import sweep
from workers.sae import sae_sources, save_sae
from workers.steering import SteerFeature, steer

SEQ_LEN = 32
MAX_TOKENS = 64
SAE = "1-res-sae-48"


class World:
    """A tiny Llama harvested (neurons of layers 0 and 1, and a TopK SAE saved to its files)
    into the database at `url`, and its models loaded for live inference."""

    def __init__(self, model_dir, tmp, url: str):
        self.lm = load_model(str(model_dir))
        sae = random_sae("topk", d_in=self.lm.d_model, d_sae=48, hook="blocks.1.hook_resid_post",
                         seed=3)
        sae_dir = save_sae(sae, tmp / "sae")
        cfg = HarvestConfig(top_k=5, n_ranges=2, per_range=2, window=12, batch_size=8,
                            shard_sequences=64)
        self.ds = load_dataset("pydoc", self.lm.tokenizer, seq_len=SEQ_LEN,
                               max_tokens=24 * SEQ_LEN)
        self.specs = neuron_sources(self.lm, [0, 1]) + sae_sources(self.lm, [str(sae_dir)])
        states = run_harvest(Harvester(self.lm, self.ds.tokens, self.specs, cfg, bos_first=True))
        self.url = url
        self.engine = make_engine(url)
        upgrade(self.engine)
        reg = store.begin(self.engine, self.lm, self.ds, self.specs, cfg)
        store.write(self.engine, reg, finalize(self.lm, self.ds, self.specs, states, cfg))
        self.models = ServedModels.load(self.engine, device="cpu")

    def ids(self, text: str) -> list[int]:
        """A text's token ids as the corpus was tokenized: BOS first."""
        return [self.lm.tokenizer.bos_token_id] + self.lm.tokenizer(
            text, add_special_tokens=False)["input_ids"]


def _served(world):
    return world.models.model(world.lm.slug)


@pytest.fixture(scope="module")
def world(tiny_llama_dir, tmp_path_factory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("interventions")
    w = World(tiny_llama_dir, tmp, f"sqlite:///{tmp / 'interventions.db'}")
    yield w
    w.engine.dispose()


@pytest.fixture(scope="module")
def live(world) -> ModelQueue:
    return ModelQueue(world.models, InferenceLimits(max_tokens=MAX_TOKENS, max_texts=4,
                                                    max_wait=0.3))


@pytest.fixture(scope="module")
def client(world, live):
    app = create_app(Settings(database_url=world.url), engine=world.engine, live=live)
    with TestClient(app, client=LOOPBACK) as c:
        yield c


@pytest.fixture(scope="module")
def off_client(world):
    with TestClient(create_app(Settings(database_url=world.url), engine=world.engine),
                    client=LOOPBACK) as c:
        yield c


def _post(client, path, body, status=200):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    return r.json()


def _steer_body(world, **more):
    return {"model": world.lm.slug, "prompt": "The meaning of life is",
            "features": [{"source": SAE, "index": 3, "strength": 12.0},
                         {"source": "0-mlp", "index": 5, "strength": -4.0}],
            "n_tokens": 10, "temperature": 0.8, "seed": 7, "top_logprobs": 3, **more}


@pytest.fixture
def busy(client, live):
    """The model held by another call until the test ends."""
    release, started = threading.Event(), threading.Event()

    def hold(models):
        started.set()
        release.wait(10)

    task = client.portal.start_task_soon(live.call, hold)
    assert started.wait(10)
    yield
    release.set()
    task.result(timeout=10)


# ------------------------------------------------------------------ steering


def test_steer_answers_the_workers_generations(client, world):
    body = _steer_body(world)
    out = _post(client, "/api/v1/steer", body)
    ids = world.ids(body["prompt"])
    default, steered = steer(_served(world), ids, [SteerFeature(SAE, 3, 12.0),
                                                 SteerFeature("0-mlp", 5, -4.0)],
                             n_tokens=10, temperature=0.8, seed=7, top_logprobs=3)
    assert out["prompt_ids"] == ids
    assert out["prompt_tokens"] == [world.lm.tokenizer.decode([i]) for i in ids]
    for got, want in ((out["default"], default), (out["steered"], steered)):
        assert [t["id"] for t in got["tokens"]] == want.ids
        assert [t["logprob"] for t in got["tokens"]] == want.logprobs
        assert [[x["id"] for x in t["top"]] for t in got["tokens"]] == want.top_ids
        assert [[x["logprob"] for x in t["top"]] for t in got["tokens"]] == want.top_logprobs
        assert got["text"] == world.lm.tokenizer.decode(want.ids)
        assert [t["token"] for t in got["tokens"]] == [world.lm.tokenizer.decode([i])
                                                       for i in want.ids]
    assert out["default"]["tokens"] != out["steered"]["tokens"]
    assert [(f["source"], f["hook_name"]) for f in out["features"]] == [
        (SAE, "blocks.1.hook_resid_post"), ("0-mlp", "blocks.0.mlp.hook_post")]
    assert _post(client, "/api/v1/steer", body) == out  # seeded: the same request, the same text
    zero = _post(client, "/api/v1/steer", _steer_body(world, features=[
        {"source": SAE, "index": 3, "strength": 0}]))
    assert zero["steered"] == zero["default"] == out["default"]
    assert _post(client, "/api/v1/steer", _steer_body(world, features=[]))["steered"] == \
        out["default"]


def test_neuronpedia_steer_gives_the_same_texts(client, world):
    ours = _post(client, "/api/v1/steer", _steer_body(world, features=[
        {"source": SAE, "index": 3, "strength": 12.0}], freq_penalty=0.5))
    theirs = _post(client, "/api/steer", {
        "prompt": "The meaning of life is", "modelId": world.lm.slug,
        "features": [{"modelId": world.lm.slug, "layer": SAE, "index": 3, "strength": 3}],
        "strength_multiplier": 4, "temperature": 0.8, "n_tokens": 10, "freq_penalty": 0.5,
        "seed": 7, "n_logprobs": 3})
    assert theirs["STEERED"] == "The meaning of life is" + ours["steered"]["text"]
    assert theirs["DEFAULT"] == "The meaning of life is" + ours["default"]["text"]
    assert theirs["steeredLogProbs"] == [
        {"token": t["token"], "logprob": t["logprob"],
         "topLogprobs": [{"token": x["token"], "logprob": x["logprob"]} for x in t["top"]]}
        for t in ours["steered"]["tokens"]]
    assert theirs["shareUrl"] == ours["url"]
    body = {"prompt": "x", "modelId": world.lm.slug, "temperature": 0, "n_tokens": 2,
            "features": [{"modelId": "gpt2", "layer": SAE, "index": 3, "strength": 1}]}
    assert "modelId" in _post(client, "/api/steer", body, 422)["error"]
    body["features"][0]["modelId"] = world.lm.slug
    assert "stream" in _post(client, "/api/steer", {**body, "stream": True}, 422)["error"]


@pytest.mark.parametrize("change, status, words", [
    ({"n_tokens": 257}, 422, "n_tokens"),
    ({"method": "multiply"}, 422, "method"),
    ({"features": [{"source": "0-mlp", "index": 1, "strength": 1}] * 17}, 422, "features"),
    ({"features": [{"source": "9-mlp", "index": 1, "strength": 1}]}, 404, "no source"),
    ({"features": [{"source": "0-mlp", "index": 10**6, "strength": 1}]}, 404, "features 0 to"),
    ({"model": "nope"}, 404, "unknown model"),
    ({"prompt": " word" * (MAX_TOKENS + 1)}, 413, f"at most {MAX_TOKENS} tokens"),
    ({"n_tokens": 250}, 413, "positions"),
])
def test_steer_refusals_are_the_envelope(client, world, change, status, words):
    body = _steer_body(world, **change)
    if change.get("n_tokens") == 250:
        body["prompt"] = " word" * 20  # 21 + 250 > the 256 positions of the tiny Llama
    out = _post(client, "/api/v1/steer", body, status)
    assert out["ok"] is False and out["status"] == status and words in out["error"]


def test_steer_without_live_says_how_to_enable_it(off_client, world):
    out = _post(off_client, "/api/v1/steer", _steer_body(world), 503)
    assert "serve --live" in out["error"]
    page = off_client.get(urls.steer(world.lm.slug, "hi"))
    assert page.status_code == 200 and "featurescope serve --live" in page.text
    assert re.search(r'<button id="run"[^>]* disabled', page.text)


def test_the_steer_page_holds_the_request_and_a_get_never_runs_the_model(client, world, busy):
    """While the model is busy, opening the page (or its JSON) answers at once: it shows the
    request of its URL and runs nothing; running it (a POST) is what waits, and gets 503."""
    url = urls.steer(world.lm.slug, "Tell me <b>more</b>", [(SAE, 3, 12.0), ("0-mlp", 5, -4.0)],
                     method="cap", normalize=True, n_tokens=9, seed=2)
    assert parse_qs(urlsplit(url).query)["f"] == [f"{SAE}:3:12", "0-mlp:5:-4"]
    view = client.get(urls.json(url)).json()
    assert view["result"] is None and view["url"] == url and view["api"] == "/api/v1/steer"
    assert view["request"] == {
        "model": world.lm.slug, "prompt": "Tell me <b>more</b>", "method": "cap", "normalize": True,
        "n_tokens": 9, "seed": 2, "temperature": 0.5, "top_logprobs": 5, "freq_penalty": 0.0,
        "features": [{"source": SAE, "index": 3, "strength": 12.0},
                     {"source": "0-mlp", "index": 5, "strength": -4.0}]}
    page = client.get(url)
    assert page.status_code == 200 and 'id="default"' not in page.text
    assert "Tell me &lt;b&gt;more&lt;/b&gt;</textarea>" in page.text
    assert f'value="{SAE}:3:12.0"' in page.text and f'<link rel="canonical" href="{html.escape(url)}">' in page.text
    form = dict(view["request"], f=[f"{SAE}:3:12", "0-mlp:5:-4"], normalize="1")
    del form["features"]
    ran = client.post("/steer", data=form)
    assert ran.status_code == 503 and "busy" in ran.text
    bad = client.get(urls.json("/steer?model=m&f=nonsense"))
    assert bad.status_code == 422 and "SOURCE:INDEX:STRENGTH" in bad.json()["error"]
    assert client.get("/steer?model=m&f=nonsense").status_code == 422


def test_running_the_steer_page_shows_both_texts_and_pushes_its_url(client, world):
    body = _steer_body(world, prompt="a <script>alert(1)</script> b")
    api = _post(client, "/api/v1/steer", body)
    form = {k: v for k, v in body.items() if k != "features"}
    form["f"] = [f"{f['source']}:{f['index']}:{f['strength']}" for f in body["features"]]
    part = client.post("/steer", data=form, headers={"HX-Request": "true"})
    assert part.status_code == 200 and part.text.lstrip().startswith('<div id="steer-result"')
    assert part.headers["hx-push-url"] == api["url"]
    assert client.get(urls.json(api["url"])).json()["request"] == {
        **body, "method": "additive", "normalize": False, "freq_penalty": 0.0}
    for name in ("default", "steered"):
        section = part.text.split(f'id="{name}"')[1].split("</section>")[0]
        tips = re.findall(r'<span class="t gen" title="logprob ([^ "]+)', section)
        assert tips == [fmt(t["logprob"], 4) for t in api[name]["tokens"]]
        assert html.escape(api[name]["text"], quote=False) in section
        shown = re.findall(r'<span class="t pr">([^<]*)</span>', section)
        assert shown == [html.escape(t, quote=False) for t in api["prompt_tokens"]]
    assert "<script>" not in part.text and "&lt;" in part.text
    whole = client.post("/steer", data=form)  # without JavaScript: the whole page
    assert whole.status_code == 200 and '<html lang="en">' in whole.text
    assert f'href="{html.escape(api["url"])}">link to this request' in whole.text


def test_the_feature_page_links_to_steering_with_the_feature(client, world):
    page = client.get(f"/{world.lm.slug}/{SAE}/3.json").json()
    strength = float(f"{4 * page['stats']['max_act']:.3g}")
    want = urls.steer(world.lm.slug, features=[(SAE, 3, strength)])
    assert f'id="steer" class="btn" href="{html.escape(want)}"' in client.get(
        f"/{world.lm.slug}/{SAE}/3").text
    view = client.get(urls.json(want)).json()
    assert view["request"]["features"] == [{"source": SAE, "index": 3, "strength": strength}]


# ------------------------------------------------------------------ ablation


def test_ablate_answers_losses_against_the_worker(client, world):
    text = "def f(x):\n    return x * 2"
    out = _post(client, "/api/v1/ablate", {"model": world.lm.slug, "text": text, "top": 3,
                                           "features": [{"source": "1-mlp", "index": 4},
                                                        {"source": SAE, "index": 3}]})
    ids = world.ids(text)
    res = ablate(_served(world), ids, [Ablation("1-mlp", 4), Ablation(SAE, 3)], top=3)
    assert out["token_ids"] == ids and out["mode"] == "zero"
    assert out["loss_clean"][0] is None and out["delta"][0] is None and out["moved"][0] == []
    np.testing.assert_array_equal(out["loss_clean"][1:], res.loss_clean[1:])
    np.testing.assert_array_equal(out["loss_ablated"][1:], res.loss_ablated[1:])
    np.testing.assert_allclose(out["delta"][1:], res.loss_ablated[1:] - res.loss_clean[1:],
                               rtol=1e-6)
    assert out["mean_loss_clean"] == pytest.approx(float(np.mean(res.loss_clean[1:])))
    with torch.inference_mode():
        logp = torch.log_softmax(world.lm.hf_model(input_ids=torch.tensor([ids])).logits[0], -1)
    for i in range(1, len(ids)):
        assert out["loss_clean"][i] == pytest.approx(-float(logp[i - 1, ids[i]]), rel=1e-6)
        moved = out["moved"][i]
        assert [m["id"] for m in moved] == res.moved_ids[i].tolist()
        assert all(m["delta"] == pytest.approx(m["ablated"] - m["clean"]) for m in moved)
        assert [abs(m["delta"]) for m in moved] == sorted((abs(m["delta"]) for m in moved),
                                                          reverse=True)
    assert [f["replacement"] for f in out["features"]] == [0.0, 0.0]


def test_mean_ablation_takes_the_harvests_mean(client, world):
    stats = client.get(f"/{world.lm.slug}/0-mlp/6.json").json()["stats"]
    out = _post(client, "/api/v1/ablate", {"model": world.lm.slug, "tokens": [1, 2, 3, 4],
                                           "mode": "mean",
                                           "features": [{"source": "0-mlp", "index": 6}]})
    assert out["features"][0]["replacement"] == stats["mean_act"] != 0
    res = ablate(_served(world), [1, 2, 3, 4], [Ablation("0-mlp", 6, stats["mean_act"])])
    np.testing.assert_array_equal(out["loss_ablated"][1:], res.loss_ablated[1:])
    value = _post(client, "/api/v1/ablate", {"model": world.lm.slug, "tokens": [1, 2, 3, 4],
                                             "mode": "value", "value": 2.5,
                                             "features": [{"source": "0-mlp", "index": 6}]})
    assert value["features"][0]["replacement"] == 2.5


@pytest.mark.parametrize("change, status, words", [
    ({"mode": "value"}, 422, "needs a value"),
    ({"text": "x", "tokens": [1, 2]}, 422, "exactly one"),
    ({"features": []}, 422, "features"),
    ({"features": [{"source": "0-mlp", "index": 10**6}]}, 404, "features 0 to"),
    ({"tokens": [1] * (MAX_TOKENS + 1)}, 413, "tokens"),
])
def test_ablate_refusals_are_the_envelope(client, world, change, status, words):
    body = {"model": world.lm.slug, "tokens": [1, 2, 3], "features": [{"source": "0-mlp",
                                                                  "index": 1}], **change}
    if "text" in change:
        body["text"] = change["text"]
    out = _post(client, "/api/v1/ablate", body, status)
    assert out["status"] == status and words in out["error"]


def test_the_effect_box_colours_the_top_examples_by_the_rise_of_their_loss(client, world):
    model, index = world.lm.slug, 2
    page = client.get(f"/{model}/{SAE}/{index}.json").json()
    url = urls.effect(model, SAE, index)
    part = client.post(url, data={"text": "", "mode": "zero"},
                       headers={"HX-Request": "true", "HX-Target": "effect-result"})
    assert part.status_code == 200 and part.text.lstrip().startswith('<div id="effect-result"')
    blocks = part.text.split('<div class="ex effect">')[1:]
    assert len(blocks) == min(3, len(page["top"])) >= 1
    deltas, shown = [], []
    for ex, block in zip(page["top"], blocks, strict=False):
        # the example's sequence up to the end of its window, shown from the window's start
        prefix = world.ds.tokens[ex["seq_idx"], :ex["start"] + len(ex["acts"])].tolist()
        assert prefix[ex["start"]:] == ex["token_ids"]
        out = _post(client, "/api/v1/ablate", {
            "model": model, "features": [{"source": SAE, "index": index}], "tokens": prefix})
        want = out["delta"][ex["start"]:]
        deltas += [d for d in want if d is not None]
        spans = re.findall(r'<span class="(t[^"]*)"(?: title="loss ([^"]+)")?>', block)
        assert len(spans) == len(ex["acts"])
        shown.append((spans, want))
        mean = np.mean([d for d in want if d is not None])
        assert f'<span class="exv" title="mean change of the loss over the shown tokens">' \
            f'{fmt(mean, 3)}</span>' in block
    scale = max(abs(d) for d in deltas)
    assert f"(full colour at {fmt(scale, 3)})" in part.text
    for spans, want in shown:
        for (cls, tip), d in zip(spans, want, strict=True):
            if d is None:
                assert tip == "" and cls == "t"
            else:  # the examples' hue where the loss rose, the other where it fell
                assert tip == ("+" if d >= 0 else "") + fmt(d, 4)
                k = min(100, int(abs(d) * 100 / scale + 0.5))
                want_cls = "t" if k == 0 else ("t " if d > 0 else "t n ") + f"a{k}" + (
                    " s" if k >= 60 else "")
                assert cls == want_cls, (cls, d, scale)
    full = client.post(url, data={"text": "x = 1 + 2", "mode": "mean"})
    assert full.status_code == 200 and 'id="feature"' in full.text and "your text" in full.text
    assert f"held at its mean ({fmt(page['stats']['mean_act'], 4)})" in full.text


def test_the_effect_box_without_live_says_how_to_enable_it(off_client, world):
    r = off_client.post(urls.effect(world.lm.slug, SAE, 2), data={"mode": "zero"})
    assert r.status_code == 503 and "serve --live" in r.text and 'id="feature"' in r.text
    page = off_client.get(f"/{world.lm.slug}/{SAE}/2").text
    assert re.search(r'<textarea id="effect-text"[^>]* disabled', page)


# ------------------------------------------------------------------ patching


def _ioi_body(world, **more):
    return {"model": world.lm.slug, **IOI, **more}


def test_patch_answers_the_workers_sweep(client, world):
    out = _post(client, "/api/v1/patch", _ioi_body(world))
    clean, corrupted = world.ids(IOI["clean"]), world.ids(IOI["corrupted"])
    a, w = world.ids(" Mary")[-1], world.ids(" John")[-1]
    sw = sweep(world.lm, clean, corrupted, a, w, kinds=["resid", "heads", "mlp"],
               batch_size=2 + 64)
    assert out["clean_ids"] == clean and out["corrupted_ids"] == corrupted
    assert out["answer"] == {"id": a, "text": " Mary"} and out["wrong"] == {"id": w,
                                                                          "text": " John"}
    np.testing.assert_array_equal(out["resid"], sw.resid)
    np.testing.assert_array_equal(out["heads"], sw.heads)
    np.testing.assert_array_equal(out["mlp"], sw.mlp)
    assert (out["logit_diff_clean"], out["logit_diff_corrupted"]) == (sw.logit_diff_clean,
                                                                      sw.logit_diff_corrupted)
    assert out["first_diff"] == sw.first_diff and out["runs"] == sw.runs
    assert out["passes"] == math.ceil(sw.runs / 64)
    only = _post(client, "/api/v1/patch", _ioi_body(world, kinds=["mlp"]))
    assert only["resid"] is None and only["heads"] is None and len(only["mlp"]) == 2
    assert parse_qs(urlsplit(only["url"]).query)["kinds"] == ["mlp"]


@pytest.mark.parametrize("change, status, words", [
    ({"corrupted": "When John went to the store"}, 422, "same length"),
    ({"answer": " Maryland's"}, 422, "must be one token"),
    ({"kinds": ["embed"]}, 422, "kinds"),
    ({"model": "nope"}, 404, "unknown model"),
])
def test_patch_refusals_are_the_envelope(client, world, change, status, words):
    out = _post(client, "/api/v1/patch", _ioi_body(world, **change), status)
    assert out["status"] == status and words in out["error"]


def test_a_sweep_over_the_limit_is_413(client, world, monkeypatch):
    monkeypatch.setattr(patch_routes, "MAX_PATCH_RUNS", 10)
    out = _post(client, "/api/v1/patch", _ioi_body(world), 413)
    assert "at most 10" in out["error"]


def test_the_patch_page_opens_with_the_ioi_example_and_runs_only_on_post(client, world, busy):
    view = client.get("/patch.json").json()
    assert view["request"] == {"model": world.lm.slug, **IOI, "kinds": ["resid", "heads", "mlp"]}
    assert view["result"] is None
    page = client.get("/patch")
    assert page.status_code == 200 and 'id="hm-resid"' not in page.text
    assert 'value="When John and Mary went to the store, John gave the bag to"' in page.text
    assert client.post("/patch", data=view["request"]).status_code == 503


def test_the_patch_page_draws_heatmaps_with_escaped_tokens(client, world):
    body = _ioi_body(world, clean="<b>John</b> gave the bag to",
                     corrupted="<b>Mary</b> gave the bag to")
    api = _post(client, "/api/v1/patch", body)
    part = client.post("/patch", data=body, headers={"HX-Request": "true"})
    assert part.status_code == 200 and part.headers["hx-push-url"] == api["url"]
    assert "<b>" not in part.text and "&lt;" in part.text
    resid = part.text.split('id="hm-resid"')[1].split("</svg>")[0]
    titles = re.findall(r"<title>layer (\d+) · position (\d+) [^:]*: ([^<]+)</title>", resid)
    n = len(api["clean_ids"])
    assert len(titles) == 2 * n
    for layer, pos, value in titles:
        assert value == fmt(api["resid"][int(layer)][int(pos)], 4)
    labels = re.findall(r'<text class="cl"[^>]*>([^<]*)</text>', resid)
    want = [html.escape(a if a == b else f"{a}/{b}", quote=False)
            for a, b in zip(api["clean_tokens"], api["corrupted_tokens"], strict=True)]
    assert labels == want and "John/Mary" in labels and "&lt;" in labels
    heads = re.findall(r"<title>layer (\d+) · head (\d+): ([^<]+)</title>", part.text)
    assert [(int(L), int(h)) for L, h, _ in heads] == [(L, h) for L in range(2)
                                                       for h in range(world.lm.n_heads)]
    for layer, head, value in heads:
        assert value == fmt(api["heads"][int(layer)][int(head)], 4)
    rects = re.findall(r'<rect class="([^"]*)"[^>]*><title>layer (\d+) · position (\d+)', resid)
    for cls, layer, pos in rects:  # colour: |value| in steps of 1%, clean's hue above 0
        v = api["resid"][int(layer)][int(pos)]
        k = min(100, int(abs(v) * 100 + 0.5))
        assert cls == ("" if k == 0 else f"{'p' if v > 0 else 'n'} a{k}" + (" s" if k >= 60
                                                                             else ""))
    assert f'clean <span class="num" id="ld-clean">{fmt(api["logit_diff_clean"], 5)}</span>' \
        in part.text
    assert f'corrupted <span class="num" id="ld-corrupted">' \
        f'{fmt(api["logit_diff_corrupted"], 5)}</span>' in part.text
    assert f"{api['runs']} patched runs in {api['passes']} forward passes" in part.text
    whole = client.post("/patch", data=body)
    assert whole.status_code == 200 and 'id="hm-mlp"' in whole.text
    assert f'href="{html.escape(api["url"])}">link to this request' in whole.text


# ------------------------------------------------------------------ in a browser


@pytest.fixture(scope="module")
def live_url(client):
    with serve_in_thread(client.app) as url:
        yield url


@pytest.mark.browser
def test_browser_steer_from_a_feature_page_and_patch_the_ioi_example(browser, live_url, world,
                                                                       artifacts):
    ctx = browser.new_context(base_url=live_url, viewport={"width": 1360, "height": 900})
    ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_url)
    page = ctx.new_page()
    problems = []
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(f"/{world.lm.slug}/{SAE}/3")
    page.click("#steer")
    page.wait_for_selector("#prompt")
    assert "/steer?" in page.url and page.locator("#steer-result .steer-out").count() == 0
    page.click("#run")
    page.wait_for_selector("#steered .t.gen")
    texts = {n: page.locator(f"#{n} .text-out").text_content() for n in ("default", "steered")}
    assert texts["default"] and texts["steered"] and texts["default"] != texts["steered"]
    page.click("#copy")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == page.url and "prompt=" in copied and f"f={SAE}%3A3%3A" in copied
    page.screenshot(path=str(artifacts / "steer.png"), full_page=True)
    other = ctx.new_page()
    other.goto(copied)  # the shared link: the same request, not run until asked
    assert other.locator("#steer-result .steer-out").count() == 0
    assert other.input_value("#prompt") == page.input_value("#prompt")
    other.click("#run")
    other.wait_for_selector("#steered .t.gen")
    assert {n: other.locator(f"#{n} .text-out").text_content()
            for n in ("default", "steered")} == texts

    page.goto("/patch")
    assert page.input_value("#clean") == IOI["clean"]
    page.click("#run")
    page.wait_for_selector("#hm-resid svg rect", timeout=60_000)
    n = len(world.ids(IOI["clean"]))
    assert page.locator("#hm-resid svg rect").count() == 2 * n
    assert page.locator("#hm-heads svg rect").count() == 2 * world.lm.n_heads
    shared = page.url
    assert "/patch?" in shared and "clean=" in shared
    page.screenshot(path=str(artifacts / "patch.png"), full_page=True)
    other.goto(shared)
    assert other.input_value("#clean") == IOI["clean"]
    assert other.input_value("#answer") == IOI["answer"]
    assert other.locator("#hm-resid").count() == 0
    other.click("#run")
    other.wait_for_selector("#hm-resid svg rect", timeout=60_000)
    assert other.locator("#hm-resid svg rect").count() == 2 * n
    assert not problems, problems
    ctx.close()
