"""GET /api/feature/{model}/{source}/{index} and /api/source-set/{model}/{name}: Neuronpedia's
fields, checked one by one against the stored rows; a script written for Neuronpedia run
against them; an unknown list's 404. (Its own client runs in test_web_neuronpedia_client.py.)"""

from __future__ import annotations

import json
import math
import struct
import urllib.request

import pytest
from sqlalchemy import select
from support import stored_examples

from app.db.tables import Dataset, ExampleGroup, Feature, Model, Sequence, Source, Vocabulary
from app.histogram import histogram_edges
from app.neuronpedia_schemas import NpFeature


def stored(engine, model: str, source: str, index: int):
    with engine.connect() as conn:
        src = conn.execute(select(Source).join(Model, Model.id == Source.model_id)
                           .where(Model.slug == model, Source.slug == source)).one()
        vocab = conn.scalar(select(Vocabulary.tokens).where(Vocabulary.model_id == src.model_id))
        feat = conn.execute(select(Feature).where(Feature.source_id == src.id,
                                                  Feature.idx == index)).one()
        rows = stored_examples(conn, src.id, index)
        seqs = dict(conn.execute(select(Sequence.idx, Sequence.tokens).where(
            Sequence.dataset_id == src.dataset_id)).all())
    return src, vocab, feat, rows, seqs


@pytest.mark.parametrize("source,index", [("1-mlp", 5), ("0-mlp", 0), ("1-res-sae-48", 7)])
def test_fields_match_the_stored_feature(client, web_db, source, index):
    src, vocab, feat, rows, seqs = stored(web_db.engine, web_db.llama, source, index)
    r = client.get(f"/api/feature/{web_db.llama}/{source}/{index}")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    np = NpFeature.model_validate_json(r.content)
    data = r.json()

    assert (data["modelId"], data["layer"], data["index"]) == (web_db.llama, source, str(index))
    assert data["hookName"] == src.hook_name
    assert data["sourceSetName"] == source.split("-", 1)[1]
    assert data["maxActApprox"] == feat.max_act
    assert data["frac_nonzero"] == feat.frac_active
    assert data["pos_str"] == [vocab[t] for t, _ in feat.top_logits]
    assert data["pos_values"] == [v for _, v in feat.top_logits]
    assert data["neg_str"] == [vocab[t] for t, _ in feat.bottom_logits]
    assert data["neg_values"] == [v for _, v in feat.bottom_logits]
    assert data["neg_values"] == sorted(data["neg_values"])  # most negative first

    heights, values = data["freq_hist_data_bar_heights"], data["freq_hist_data_bar_values"]
    assert len(heights) == len(values) > 0
    used = [i for i in range(1, len(feat.histogram)) if feat.histogram[i]]
    span = range(used[0], used[-1] + 1)
    assert heights == [float(feat.histogram[i]) for i in span]
    edges = histogram_edges()
    for v, i in zip(values, span, strict=True):
        assert edges[i] <= v < edges[i + 1]
    assert values == sorted(values)
    assert sum(heights) == sum(feat.histogram[1:])

    acts = data["activations"]
    top = [r for r in rows if r.group == ExampleGroup.top]
    quantile = sorted((r for r in rows if r.group >= ExampleGroup.quantile),
                      key=lambda r: (-r.group, -r.peak_value))
    # Neuronpedia orders a feature's activations by maxValue, highest first
    ordered = sorted(top + quantile, key=lambda r: -r.peak_value)
    sample = [r.peak_value for r in quantile]  # every sampled sequence where it fired
    assert len(acts) == len(ordered) and sample
    for a, row in zip(acts, ordered, strict=True):
        window = struct.unpack(f"<{len(row.acts) // 2}e", row.acts)
        ids = struct.unpack(f"<{len(seqs[row.seq_idx]) // 4}i", seqs[row.seq_idx])
        assert a["tokens"] == [vocab[t] for t in ids[row.start:row.start + len(window)]]
        peak = row.peak_pos - row.start
        assert a["maxValueTokenIndex"] == peak
        assert a["maxValue"] == row.peak_value == a["values"][peak]
        values = [v for i, v in enumerate(a["values"]) if i != peak]  # the stored float16s
        assert struct.pack(f"<{len(values)}e", *values) == struct.pack(
            f"<{len(values)}e", *[v for i, v in enumerate(window) if i != peak])
        assert a["minValue"] == min(a["values"])
        assert a["dataIndex"] == str(row.seq_idx)
        assert (a["modelId"], a["layer"], a["source"], a["index"]) == (
            web_db.llama, source, source, str(index))
        group = [r.peak_value for r in rows if r.group == row.group]
        assert (a["binMin"], a["binMax"]) == (min(group), max(group))
        assert a["binContains"] == sum(min(group) <= p <= max(group) for p in sample) / len(
            sample)
        assert 0 < a["binContains"] <= 1 if row.group != ExampleGroup.top else (
            0 <= a["binContains"] <= 1)  # the sample may hold none of the top range
    assert [a["maxValue"] for a in acts] == sorted((a["maxValue"] for a in acts), reverse=True)
    assert acts[0]["binMax"] == feat.max_act
    if len(quantile) == len(top):  # it fired in so few sequences that they are all in both
        assert acts[0]["binContains"] == 1.0

    with web_db.engine.connect() as conn:
        ds = conn.execute(select(Dataset).where(Dataset.id == src.dataset_id)).one()
        m = conn.execute(select(Model).where(Model.slug == web_db.llama)).one()
    assert data["model"] == {"id": m.slug, "displayName": m.slug, "layers": m.n_layers,
                             "dimension": m.d_model, "neuronsPerLayer": m.d_mlp}
    assert data["source"] == {
        "id": source, "modelId": web_db.llama, "setName": source.split("-", 1)[1],
        "hookName": src.hook_name, "hasDashboards": True, "inferenceEnabled": False,
        "dataset": ds.slug, "num_prompts": ds.n_sequences, "num_tokens_in_prompt": ds.seq_len}
    assert np.explanations == [] and np.activations[0].id.startswith(web_db.llama)


def test_a_neuronpedia_script_runs_with_another_base_url(live_server, client, web_db):
    """The gist of scripts people run against neuronpedia.org/api/feature/..., with the base URL
    changed to this server's: over real HTTP, what the script reads is the feature's own data."""

    def fetch(base, model, source, index):
        with urllib.request.urlopen(f"{base}/api/feature/{model}/{source}/{index}") as r:
            return json.load(r)

    f = fetch(live_server, web_db.llama, "1-mlp", 11)
    best = max(f["activations"], key=lambda a: a["maxValue"])
    peak_token = best["tokens"][best["maxValueTokenIndex"]]
    density = f["frac_nonzero"]
    top_logit = f["pos_str"][0]
    mids, heights = f["freq_hist_data_bar_values"], f["freq_hist_data_bar_heights"]

    page = client.get(f"/{web_db.llama}/1-mlp/11.json").json()  # the feature page's JSON
    top = page["top"][0]
    assert (best["maxValue"], best["dataIndex"]) == (top["peak_value"], str(top["seq_idx"]))
    assert best["maxValue"] == page["stats"]["max_act"] and math.isfinite(best["maxValue"])
    assert peak_token == top["tokens"][top["peak_index"]]
    assert density == page["stats"]["frac_active"]
    assert top_logit == page["top_logits"][0]["text"]
    assert len(mids) == len(heights) > 0 and sum(heights) == sum(page["histogram"]["counts"][1:])


def test_source_set_lists_the_sources_of_the_set(client, web_db):
    with web_db.engine.connect() as conn:
        model = conn.execute(select(Model).where(Model.slug == web_db.llama)).one()
        rows = conn.execute(select(Source).where(Source.model_id == model.id)
                            .order_by(Source.layer, Source.slug)).all()
    for name in ("mlp", "res-sae-48"):
        r = client.get(f"/api/source-set/{web_db.llama}/{name}")
        assert r.status_code == 200, r.text
        data = r.json()
        assert (data["name"], data["modelId"], data["urls"]) == (name, web_db.llama, [])
        want = [s for s in rows if s.slug.split("-", 1)[1] == name]
        assert [s["id"] for s in data["sources"]] == [s.slug for s in want]
        assert [s["hookName"] for s in data["sources"]] == [s.hook_name for s in want]
        assert {s["setName"] for s in data["sources"]} == {name}
    r = client.get(f"/api/source-set/{web_db.llama}/res-sae-7")
    assert r.status_code == 404 and "res-sae-48" in r.json()["error"]
    assert client.get("/api/source-set/nope/mlp").json()["status"] == 404


@pytest.mark.parametrize("path", ["/api/list/get", "/api/list/get/"])
def test_an_unknown_list_is_404_in_the_envelope(client, path):
    r = client.post(path, json={"listId": "x"}, follow_redirects=False)
    assert r.status_code == 404
    assert r.json() == {"ok": False, "status": 404, "error": "no list 'x'"}


@pytest.mark.parametrize("path", ["/api/activation/new", "/api/activation/source",
                                  "/api/search-all", "/api/search-topk-by-token"])
@pytest.mark.parametrize("slash", ["", "/"])
def test_live_endpoints_answer_with_and_without_the_slash(local, web_db, path, slash):
    """Found, with or without the slash Neuronpedia's client adds, never redirected: on a
    server without --live, the 503 that says how to enable it (asked from loopback, which
    needs no key)."""
    body = {"modelId": web_db.llama, "source": "1-mlp", "sourceSet": "mlp", "text": "hi",
            "customText": "hi", "feature": {"modelId": web_db.llama, "layer": "1-mlp",
                                            "index": "3"}}
    r = local.post(path + slash, json=body, follow_redirects=False)
    assert r.status_code == 503, r.text
    assert "serve --live" in r.json()["error"]
