"""GET /api/feature/{model}/{source}/{index}: Neuronpedia's fields, checked one by one against
the stored rows, and a script written for Neuronpedia run against it."""

from __future__ import annotations

import json
import math
import struct
import urllib.request

import pytest
from sqlalchemy import select
from support import stored_examples

from app.db.tables import ExampleGroup, Feature, Model, Sequence, Source, Vocabulary
from app.histogram import histogram_edges
from app.schemas import NpFeature


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
    assert len(acts) == len(top) + len(quantile)
    for a, row in zip(acts, top + quantile, strict=True):
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
        assert (a["modelId"], a["layer"], a["index"]) == (web_db.llama, source, str(index))
        if row.group == ExampleGroup.top:
            assert (a["binMin"], a["binMax"], a["binContains"]) == (-1, -1, -1)
        else:
            assert a["binMin"] <= a["maxValue"] <= a["binMax"]
            assert 0 < a["binContains"] <= 1
    assert [a["maxValue"] for a in acts[:len(top)]] == sorted(
        (a["maxValue"] for a in acts[:len(top)]), reverse=True)
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
