"""`featurescope import` on SQLite and PostgreSQL: a source exported to Neuronpedia's layout and
imported into an empty database has every feature's JSON equal to the original's, up to the
fields the layout cannot carry (README, "Export and import"); a Neuronpedia-layout fixture
written by hand from Neuronpedia's documented columns imports and renders."""

from __future__ import annotations

import gzip
import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.cli import main
from app.config import Settings
from app.db.engine import make_engine
from app.db.tables import Model, Source
from app.main import create_app

NOT_CARRIED_STATS = ("min_act", "mean_act", "std_act", "n_active", "n_tokens")
SCRIPT_TOKEN = "<script>window.__pwned = 1</script>"


def comparable(doc: dict) -> dict:
    """A feature's JSON without the fields Neuronpedia's layout cannot carry: token ids, where
    an example sits in its sequence, the dataset, statistics other than max and density,
    scores and the relations other than cosine and Pearson (lists in the README)."""
    doc = json.loads(json.dumps(doc))
    for k in ("dataset", "bos_first", "scorers"):
        doc.pop(k)
    for k in NOT_CARRIED_STATS:
        doc["stats"].pop(k)
    for k in ("top_logits", "bottom_logits"):
        for t in doc[k]:
            t.pop("id")
    doc["top_tokens"] = [t["count"] for t in doc["top_tokens"]]  # among ties: lowest id first
    examples = doc["top"] + doc["bottom"] + [e for g in doc["quantiles"] for e in g["examples"]]
    for e in examples:
        for k in ("token_ids", "seq_idx", "start", "peak_pos"):
            e.pop(k)
    for e in doc["explanations"]:
        for k in ("id", "scores", "tokens_used", "prompt_version"):
            e.pop(k)
    for k in ("jaccard", "cosine_across", "match"):
        doc["related"].pop(k)
    return doc


@pytest.fixture(scope="module")
def original(llama_db):
    app = create_app(Settings(database_url=llama_db.url), engine=llama_db.engine)
    with TestClient(app) as c:
        yield c


def test_export_then_import_gives_the_same_features(original, llama_db, db_url, tmp_path):
    model = llama_db.llama
    for source in ("1-mlp", "1-res-sae-48"):
        assert main(["export", "--model", model, "--source", source, "--out",
                     str(tmp_path / "out"), "--db", llama_db.url]) == 0
    assert main(["import", str(tmp_path / "out"), "--db", db_url]) == 0
    engine = make_engine(db_url)
    app = create_app(Settings(database_url=db_url), engine=engine)
    n = 0
    with TestClient(app) as copy:
        for source, n_features in (("1-mlp", 96), ("1-res-sae-48", 48)):
            for i in range(n_features):
                want = original.get(f"/{model}/{source}/{i}.json").json()
                got = copy.get(f"/{model}/{source}/{i}.json").json()
                assert comparable(got) == comparable(want), (source, i)
                n += 1
        html = copy.get(f"/{model}/1-mlp/3").text
        assert 'id="related"' in html and "<script>window.__pwned" not in html
    assert n == 144
    engine.dispose()


def write_fixture(root, *, model="np-tiny", source="3-res-jb"):
    """A Neuronpedia export of two features, written from Neuronpedia's documented columns."""
    folder = root / model / source
    for d in ("features", "activations", "explanations"):
        (folder / d).mkdir(parents=True)
    feats = [{"modelId": model, "layer": source, "index": str(i), "maxActApprox": 4.5 + i,
              "hookName": "blocks.3.hook_resid_pre", "frac_nonzero": 0.01 * (i + 1),
              "pos_str": [" cat", " dog"], "pos_values": [1.5, 1.25],
              "neg_str": [" the"], "neg_values": [-0.75],
              "freq_hist_data_bar_heights": [3, 1], "freq_hist_data_bar_values": [0.5, 4.0],
              "topkCosSimIndices": [1 - i], "topkCosSimValues": [0.25]} for i in range(2)]
    acts = [{"id": "a0", "modelId": model, "layer": source, "index": "0",
             "tokens": ["The", " cat", SCRIPT_TOKEN, " sat"], "values": [0, 4.5, 0.5, 0],
             "maxValue": 4.5, "maxValueTokenIndex": 1, "minValue": 0, "binMin": -1},
            {"id": "a1", "modelId": model, "layer": source, "index": "0",
             "tokens": ["A", " cat"], "values": [0.25, 2.0], "maxValue": 2.0,
             "maxValueTokenIndex": 1, "minValue": 0.25, "binMin": 1.0, "binMax": 2.5},
            {"id": "a2", "modelId": model, "layer": source, "index": "1",
             "tokens": [" dog", "!"], "values": [5.5, 0], "maxValue": 5.5,
             "maxValueTokenIndex": 0, "minValue": 0, "binMin": None}]
    expl = [{"id": "e0", "modelId": model, "layer": source, "index": "1",
             "description": "dogs <b>barking</b>", "authorId": "someone",
             "typeName": "oai_token-act-pair", "explanationModelName": "gpt-4o-mini",
             "createdAt": "2025-01-02T03:04:05.000Z"}]
    for d, rows in (("features", feats), ("activations", acts), ("explanations", expl)):
        with gzip.open(folder / d / "batch-0.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


def test_a_neuronpedia_export_imports_and_renders(db_url, tmp_path):
    write_fixture(tmp_path)
    assert main(["import", str(tmp_path), "--db", db_url]) == 0
    engine = make_engine(db_url)
    with TestClient(create_app(Settings(database_url=db_url), engine=engine)) as c:
        f0 = c.get("/np-tiny/3-res-jb/0.json").json()
        assert (f0["kind"], f0["layer"], f0["hook_name"]) == ("sae", 3, "blocks.3.hook_resid_pre")
        assert f0["stats"]["max_act"] == 4.5 and f0["stats"]["frac_active"] == 0.01
        assert [(t["text"], t["value"]) for t in f0["top_logits"]] == [(" cat", 1.5),
                                                                        (" dog", 1.25)]
        (top,) = f0["top"]
        assert top["tokens"] == ["The", " cat", SCRIPT_TOKEN, " sat"]
        assert top["acts"] == [0, 4.5, 0.5, 0] and top["peak_index"] == 1
        assert [g["examples"][0]["tokens"] for g in f0["quantiles"]] == [["A", " cat"]]
        assert f0["top_tokens"] == [{"id": 1, "text": " cat", "count": 1}]
        assert sum(f0["histogram"]["counts"]) == 4
        assert [(r["index"], r["value"]) for r in f0["related"]["cosine"]] == [(1, 0.25)]
        f1 = c.get("/np-tiny/3-res-jb/1.json").json()
        (e,) = f1["explanations"]
        assert (e["text"], e["explainer"], e["author"]) == ("dogs <b>barking</b>",
                                                            "oai_token-act-pair", "someone")
        html = c.get("/np-tiny/3-res-jb/0").text
        assert "&lt;script&gt;window.__pwned" in html and SCRIPT_TOKEN not in html
        assert "dogs &lt;b&gt;barking&lt;/b&gt;" in c.get("/np-tiny/3-res-jb/1").text
    engine.dispose()


def test_bad_imports_get_one_error_and_write_nothing(db_url, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no Neuronpedia export"):
        main(["import", str(tmp_path / "empty"), "--db", db_url])
    write_fixture(tmp_path / "a")
    write_fixture(tmp_path / "b", source="4-res-jb")
    assert main(["import", str(tmp_path / "a"), "--db", db_url]) == 0
    with pytest.raises(SystemExit, match="already has a model 'np-tiny'"):
        main(["import", str(tmp_path / "b"), "--db", db_url])
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Source)) == 1
        assert conn.scalar(select(func.count()).select_from(Model)) == 1
    engine.dispose()
