"""Neuronpedia's own Python client (PyPI `neuronpedia`, in the `compat` extra), unmodified, with
its base URL pointed at a served harvest over real HTTP: every call of it that reads features,
activations, searches and source sets (lists: test_web_lists.py), its results checked against the stored rows and
against the model run by hand. Where the client is missing the module skips (in CI: fails)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import numpy as np
import pytest
import requests
from sqlalchemy import select
from support import LiveWorld, serve_in_thread, skip_or_fail, stored_examples

try:
    from neuronpedia import ActivationRequest, FeatureRequest, SAEFeatureRequest
    from neuronpedia.np_feature import Feature, SteerFeature
    from neuronpedia.np_sae_feature import SAEFeature
    from neuronpedia.np_source_set import SourceSet
    from neuronpedia.requests.base_request import NPRequest
    from neuronpedia.requests.source_activation_request import SourceActivationRequest
    from neuronpedia.requests.steer_request import SteerCompletionRequest
    from neuronpedia.requests.topk_by_token_request import TopKByTokenRequest
except ImportError as exc:  # pragma: no cover - depends on the environment
    skip_or_fail(f"the neuronpedia client is not installed ({exc}); pip install -e "
                 "'.[compat]'", module=True)

from app.config import Settings
from app.db.tables import ExampleGroup, Sequence, Source, Vocabulary
from app.db.tables import Feature as FeatureRow
from app.main import create_app
from app.model_queue import InferenceLimits, ModelQueue

SAE = "1-res-sae-48"
TEXTS = ["def add(a, b):\n    return a + b", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def world(tiny_llama_dir, tmp_path_factory) -> LiveWorld:
    tmp = tmp_path_factory.mktemp("np-client")
    return LiveWorld(tiny_llama_dir, tmp, f"sqlite:///{tmp / 'np.db'}")


@pytest.fixture(scope="module")
def base(world) -> Iterator[str]:
    live = ModelQueue(world.models, InferenceLimits(max_tokens=64, max_texts=4, max_wait=30))
    app = create_app(Settings(database_url=world.url), engine=world.engine, live=live)
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(autouse=True)
def pointed_here(base, monkeypatch):
    """What a script does to use the client elsewhere: the base URL, and some API key."""
    monkeypatch.setattr(NPRequest, "BASE_URL", f"{base}/api")
    monkeypatch.setenv("NEURONPEDIA_API_KEY", "unused")


def stored_activations(world, source: str, index: int) -> list[dict]:
    """What the client should read of a feature's activations, from the stored rows: each
    example's window and values (float16, the peak's exact float32), by peak value, highest
    first, with its group's range and the fraction of the sampled firing sequences in it."""
    with world.engine.connect() as conn:
        src = conn.execute(select(Source).where(Source.slug == source)).one()
        vocab = conn.scalar(select(Vocabulary.tokens))
        rows = stored_examples(conn, src.id, index)
        seqs = dict(conn.execute(select(Sequence.idx, Sequence.tokens)).all())
    top = [r for r in rows if r.group == ExampleGroup.top]
    quantile = sorted((r for r in rows if r.group >= ExampleGroup.quantile),
                      key=lambda r: (-r.group, -r.peak_value))
    sample = [r.peak_value for r in quantile]
    out = []
    for r in sorted(top + quantile, key=lambda r: -r.peak_value):
        window = np.frombuffer(r.acts, dtype="<f2").copy()
        window[r.peak_pos - r.start] = r.peak_value
        ids = struct.unpack(f"<{len(seqs[r.seq_idx]) // 4}i", seqs[r.seq_idx])
        group = [x.peak_value for x in rows if x.group == r.group]  # (bottom: not shown)
        lo, hi = min(group), max(group)
        out.append({"tokens": [vocab[t] for t in ids[r.start:r.start + len(window)]],
                    "values": window.tobytes(), "peak": (r.peak_pos - r.start, r.peak_value),
                    "quantileMin": lo, "quantileMax": hi,
                    "quantileFraction": sum(lo <= p <= hi for p in sample) / len(sample)})
    return out


@pytest.mark.parametrize("source,index", [("0-mlp", 4), ("1-mlp", 17), (SAE, 7), (SAE, 31)])
def test_feature_reads(world, base, source, index):
    model = world.lm.slug
    with world.engine.connect() as conn:
        src_id = conn.scalar(select(Source.id).where(Source.slug == source))
        row = conn.execute(select(FeatureRow).where(FeatureRow.source_id == src_id,
                                                    FeatureRow.idx == index)).one()
    want = stored_activations(world, source, index)
    assert len(want) >= 3  # a feature that fired
    for feature in (FeatureRequest().get(model, source, index), Feature.get(model, source, index)):
        assert (feature.modelId, feature.source, int(feature.index)) == (model, source, index)
        assert feature.density == row.frac_active
        assert feature.explanations == []
        got = [{"tokens": a.tokens, "values": np.asarray(a.values, dtype="<f2").tobytes(),
                "peak": (a.values.index(max(a.values)), max(a.values)),
                "quantileMin": a.quantileMin, "quantileMax": a.quantileMax,
                "quantileFraction": a.quantileFraction} for a in feature.activations]
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g == w, (i, {k: (g[k], w[k]) for k in g if g[k] != w[k]})
        assert {(a.modelId, a.source, a.index) for a in feature.activations} == {
            (model, source, index)}
        assert feature.activations[0].quantileMax == row.max_act
    raw = requests.get(f"{base}/api/feature/{model}/{source}/{index}").json()
    for sae_feature in (SAEFeatureRequest().get(model, source, str(index)),
                        SAEFeature.get(model, source, str(index))):
        assert (sae_feature.modelId, sae_feature.source) == (model, source)
        assert json.loads(sae_feature.jsonData) == raw


def test_activation_for_text_and_texts(world):
    model = world.lm.slug
    one = ActivationRequest().compute_activation_for_text(model, SAE, 7, TEXTS[0])
    many = ActivationRequest().compute_activation_for_texts(model, "0-mlp", "3", TEXTS)
    for act, text, source, index in [(one, TEXTS[0], SAE, 7), (many[0], TEXTS[0], "0-mlp", 3),
                                     (many[1], TEXTS[1], "0-mlp", 3)]:
        ids = world.ids(text)
        assert act.tokens == [world.lm.tokenizer.decode([i]) for i in ids]  # the BOS first
        np.testing.assert_allclose(act.values, world.brute(ids)[source][:, index],
                                   rtol=1e-5, atol=1e-6)
    assert len(many) == 2


def test_all_source_activations_for_text(world):
    results = ActivationRequest().compute_all_source_activations_for_text(
        world.lm.slug, SAE, TEXTS)
    assert len(results) == 2
    for res, text in zip(results, TEXTS, strict=True):
        ids = world.ids(text)
        acts = world.brute(ids)[SAE]
        assert res["tokens"] == [world.lm.tokenizer.decode([i]) for i in ids]
        want = {str(f): [[t, float(acts[t, f])] for t in range(1, len(ids)) if acts[t, f] != 0]
                for f in range(acts.shape[1])}
        assert res["activeFeatures"] == {f: pairs for f, pairs in want.items() if pairs}


def brute_search(world, ids, sources, n, sort_indexes=()):
    """search-all by hand: each feature's max over the text (or its sum at sort_indexes), the
    BOS position counted as 0, the top n with a positive key."""
    acts = world.brute(ids)
    cands = []
    for order, s in enumerate(sorted(sources)):
        a = acts[s].copy()
        a[0] = 0
        key = a[list(sort_indexes)].sum(0) if sort_indexes else a.max(0)
        cands += [(-float(key[f]), order, s, f, a[:, f]) for f in range(a.shape[1])]
    cands.sort(key=lambda c: c[:2] + (c[3],))
    return [(s, f, col) for k, _, s, f, col in cands[:n] if -k > 0]


def test_top_features_for_text_and_texts(world):
    model = world.lm.slug
    req = SourceActivationRequest()
    got = req.compute_top_features_for_text(model, SAE, TEXTS[0], num_results=12)
    want = brute_search(world, world.ids(TEXTS[0]), [SAE], 12)
    assert 5 < len(want) < 12  # the ones that never fire are left out
    assert [(a.source, int(a.index)) for a in got] == [(s, f) for s, f, _ in want]
    for a, (_, _, col) in zip(got, want, strict=True):
        np.testing.assert_allclose(a.values, col, rtol=1e-5, atol=1e-6)
        assert a.tokens == [world.lm.tokenizer.decode([i]) for i in world.ids(TEXTS[0])]
    both = req.compute_top_features_for_texts(model, ["1-mlp", "0-mlp"], TEXTS, num_results=7,
                                              sort_results_by_activations_at_token_indexes=[2, 3])
    assert len(both) == 2
    for acts, text in zip(both, TEXTS, strict=True):
        want = brute_search(world, world.ids(text), ["0-mlp", "1-mlp"], 7, [2, 3])
        assert len(want) == 7 and {s for s, _, _ in want} == {"0-mlp", "1-mlp"}
        assert [(a.source, int(a.index)) for a in acts] == [(s, f) for s, f, _ in want]


def test_top_features_by_token(world):
    model = world.lm.slug
    req = TopKByTokenRequest()
    single = req.compute_top_features_by_token_for_text(model, SAE, TEXTS[1], num_results=4)
    batch = req.compute_top_features_by_token_for_texts(model, "1-mlp", TEXTS, num_results=3)
    for rows, text, source, k in [(single, TEXTS[1], SAE, 4), (batch[0], TEXTS[0], "1-mlp", 3),
                                  (batch[1], TEXTS[1], "1-mlp", 3)]:
        ids = world.ids(text)
        acts = world.brute(ids)[source]
        assert [r.position for r in rows] == list(range(1, len(ids)))  # the BOS left out
        for r in rows:
            assert r.token == world.lm.tokenizer.decode([ids[r.position]])
            row = acts[r.position]
            order = sorted(range(len(row)), key=lambda f: (-row[f], f))[:k]
            assert [f.feature.index for f in r.topFeatures] == order
            assert [f.feature.source for f in r.topFeatures] == [source] * k
            np.testing.assert_allclose([f.activationValue for f in r.topFeatures], row[order],
                                       rtol=1e-5, atol=1e-6)


def test_source_sets(world):
    for s in (SourceSet.get(world.lm.slug, "mlp"),):
        assert (s.name, s.model_id, s.url) == ("mlp", world.lm.slug, None)
        assert [x.id for x in s.sources] == ["0-mlp", "1-mlp"]
        assert s.get_source_for_layer_number(1).id == "1-mlp"
    sae = SourceSet.get(world.lm.slug, "res-sae-48")
    assert [(x.id, x.set_name) for x in sae.sources] == [(SAE, "res-sae-48")]
    with pytest.raises(requests.HTTPError, match="404"):
        SourceSet.get(world.lm.slug, "res-sae-49")


def test_steer_features(world, base):
    """The client's steered completion: its strengths times its multiplier, the prompt before
    each text, the same texts as featurescope's own /api/v1/steer on the same request."""
    prompt = "The meaning of life is"
    out = SteerCompletionRequest().steer_features(
        world.lm.slug, [SteerFeature(modelId=world.lm.slug, source=SAE, index=3, strength=3)],
        prompt, temperature=0.8, n_tokens=8, freq_penalty=0.5, seed=7, strength_multiplier=4)
    ours = _post(base, "/api/v1/steer", {
        "model": world.lm.slug, "prompt": prompt, "n_tokens": 8, "temperature": 0.8,
        "freq_penalty": 0.5, "seed": 7, "features": [{"source": SAE, "index": 3, "strength": 12}]})
    assert out["STEERED"] == prompt + ours["steered"]["text"]
    assert out["DEFAULT"] == prompt + ours["default"]["text"]
    assert out["STEERED"] != out["DEFAULT"]


# ------------------------------------------------------------------ what the client never sends


def _post(base, path, body, status=200):
    r = requests.post(f"{base}{path}", json=body, allow_redirects=False)
    assert r.status_code == status, r.text
    return r.json()


def _fracs(world, source: str) -> dict[int, float]:
    with world.engine.connect() as conn:
        sid = conn.scalar(select(Source.id).where(Source.slug == source))
        return dict(conn.execute(select(FeatureRow.idx, FeatureRow.frac_active)
                                 .where(FeatureRow.source_id == sid)).all())


def test_activation_new_is_the_activation_record_and_follows_ignore_bos(world, base):
    model, ids = world.lm.slug, world.ids(TEXTS[0])
    col = world.brute(ids)[SAE][:, 7]
    tokens = [world.lm.tokenizer.decode([i]) for i in ids]
    out = _post(base, "/api/activation/new", {"feature": {"modelId": model, "source": SAE,
                                                          "index": 7}, "customText": TEXTS[0]})
    np.testing.assert_allclose(out.pop("values"), col, rtol=1e-5, atol=1e-6)
    assert out == {"modelId": model, "layer": SAE, "source": SAE, "index": "7",
                   "tokens": tokens, "maxValue": pytest.approx(float(col.max()), rel=1e-6),
                   "maxValueTokenIndex": int(np.argmax(col)),
                   "minValue": pytest.approx(float(col.min()), rel=1e-6), "dataIndex": None,
                   "dataSource": "featurescope"}
    # `neuron` before `feature`, `layer` before `source`; ignoreBos leaves the BOS out
    out = _post(base, "/api/activation/new/", {
        "neuron": {"modelId": model, "layer": SAE, "source": "0-mlp", "index": "7"},
        "feature": {"modelId": model, "layer": "0-mlp", "index": "1"},
        "customText": [TEXTS[0]], "ignoreBos": True})
    (one,) = out
    assert (one["layer"], one["index"], one["tokens"]) == (SAE, "7", tokens[1:])
    np.testing.assert_allclose(one["values"], col[1:], rtol=1e-5, atol=1e-6)
    assert one["maxValueTokenIndex"] == int(np.argmax(col[1:]))
    feature = {"modelId": model, "source": SAE, "index": "x"}
    assert "index" in _post(base, "/api/activation/new", {"feature": feature,
                                                          "customText": "a"}, 422)["error"]
    feature = {"modelId": model, "source": "5-mlp", "index": 1}
    assert "5-mlp" in _post(base, "/api/activation/new", {"feature": feature,
                                                          "customText": "a"}, 404)["error"]


def test_search_all_density_threshold_bos_and_refusals(world, base):
    model, ids = world.lm.slug, world.ids(TEXTS[1])
    body = {"modelId": model, "sourceSet": "mlp", "text": TEXTS[1], "selectedLayers": [],
            "numResults": 30}
    every = _post(base, "/api/search-all", body)["result"]
    fracs = {s: _fracs(world, s) for s in ("0-mlp", "1-mlp")}
    frac = {(h["layer"], h["index"]): fracs[h["layer"]][int(h["index"])] for h in every}
    cut = float(np.median(list(frac.values())))
    dense = _post(base, "/api/search-all", {**body, "densityThreshold": cut})["result"]
    assert 0 < len(dense) < len(every)
    assert dense == [h for h in every if frac[(h["layer"], h["index"])] <= cut]
    assert all(h["neuron"]["frac_nonzero"] == frac[(h["layer"], h["index"])] for h in every)
    with_bos = _post(base, "/api/search-all", {**body, "ignoreBos": False})["result"]
    acts = world.brute(ids)
    for h in with_bos[:5]:
        col = acts[h["layer"]][:, int(h["index"])]
        np.testing.assert_allclose(h["values"], col, rtol=1e-5, atol=1e-6)
        assert h["maxValue"] == pytest.approx(float(col.max()), rel=1e-5)
    for extra, status, words in [({"sortIndexes": [len(ids)]}, 422, "out of range"),
                                 ({"selectedLayers": ["1-res-sae-48"]}, 404, "no harvested"),
                                 ({"numResults": 101}, 422, "numResults"),
                                 ({"densityThreshold": 1.5}, 422, "densityThreshold"),
                                 ({"sourceSet": "res"}, 404, "in the set 'res'")]:
        assert words in _post(base, "/api/search-all/", {**body, **extra}, status)["error"]


def test_topk_by_token_density_threshold(world, base):
    body = {"modelId": world.lm.slug, "source": "0-mlp", "text": TEXTS[0], "numResults": 6,
            "densityThreshold": 0}
    every = _post(base, "/api/search-topk-by-token", body)
    frac = _fracs(world, "0-mlp")
    cut = float(np.median(list(frac.values())))
    dense = _post(base, "/api/search-topk-by-token/", {**body, "densityThreshold": cut})
    assert every["source"] == dense["source"] == "0-mlp"
    kept = 0
    for a, b in zip(every["results"], dense["results"], strict=True):
        want = [f for f in a["topFeatures"] if 0 < frac[f["featureIndex"]] <= cut]
        assert b["topFeatures"] == want
        kept += len(want)
    assert 0 < kept < sum(len(a["topFeatures"]) for a in every["results"])


def test_activation_source_over_the_limits(world, base):
    body = {"modelId": world.lm.slug, "source": SAE, "customText": ["a b"] * 5}
    assert "at most 4" in _post(base, "/api/activation/source", body, 413)["error"]
    body["customText"] = " word" * 80
    assert "64 tokens" in _post(base, "/api/activation/source/", body, 413)["error"]


def test_the_client_sends_its_key_where_the_server_needs_one(world, monkeypatch):
    """Served on every interface, running the model needs a key: the client's own
    (NEURONPEDIA_API_KEY, sent as X-Api-Key) lets it through with the live scope only."""
    from neuronpedia.requests.base_request import NPUnauthorizedError
    from sqlalchemy.orm import Session

    from app.keys import create_key

    with Session(world.engine) as session:
        keys = {s: create_key(session, name=f"client {s}", scope=s)[1] for s in ("read", "live")}
    live = ModelQueue(world.models, InferenceLimits(max_tokens=64, max_texts=4, max_wait=30))
    app = create_app(Settings(database_url=world.url, host="0.0.0.0"), engine=world.engine,
                     live=live)

    def ask():
        return ActivationRequest().compute_activation_for_text(world.lm.slug, SAE, 7, TEXTS[1])

    with serve_in_thread(app) as url:
        monkeypatch.setattr(NPRequest, "BASE_URL", f"{url}/api")
        with pytest.raises(NPUnauthorizedError):  # "unused": no such key
            ask()
        monkeypatch.setenv("NEURONPEDIA_API_KEY", keys["read"])
        with pytest.raises(requests.HTTPError, match="403"):
            ask()
        monkeypatch.setenv("NEURONPEDIA_API_KEY", keys["live"])
        act = ask()
    ids = world.ids(TEXTS[1])
    np.testing.assert_allclose(act.values, world.brute(ids)[SAE][:, 7], rtol=1e-5, atol=1e-6)
