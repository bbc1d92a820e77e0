"""`featurescope export` on SQLite and PostgreSQL: Neuronpedia's bulk layout (gzipped JSON lines
in batches, with the column names of Neuronpedia's Neuron, Activation and Explanation tables),
holding what every feature's JSON holds, and parquet tables with the same rows."""

from __future__ import annotations

import gzip
import json

import pytest
from explanation_data import SCRIPT, _explanation, source_id
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.cli import main
from app.config import Settings
from app.main import create_app
from app.schemas import FeaturePage

# Neuronpedia's columns, from its Prisma schema (apps/webapp/prisma/schema.prisma) and its
# exports' documentation (docs.neuronpedia.org/api-and-data/exports); written here, not
# taken from the exporter.
NEURON = {"modelId", "layer", "index", "creatorId", "createdAt", "maxActApprox", "hasVector",
          "vector", "vectorLabel", "hookName", "topkCosSimIndices", "topkCosSimValues",
          "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
          "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
          "correlated_features_indices", "correlated_features_pearson",
          "correlated_features_l1", "neg_str", "neg_values", "pos_str", "pos_values",
          "frac_nonzero", "freq_hist_data_bar_heights", "freq_hist_data_bar_values",
          "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
          "decoder_weights_dist"}
ACTIVATION = {"id", "tokens", "modelId", "layer", "index", "maxValue", "maxValueTokenIndex",
              "minValue", "values", "creatorId", "createdAt", "dfaValues", "dfaTargetIndex",
              "dfaMaxValue", "lossValues", "logitContributions", "binMin", "binMax",
              "binContains", "qualifyingTokenIndex", "dataIndex", "dataSource"}
EXPLANATION = {"id", "modelId", "layer", "index", "description", "authorId", "typeName",
               "explanationModelName", "createdAt"}


@pytest.fixture(scope="module")
def client(llama_db):
    with Session(llama_db.engine) as session, session.begin():
        _explanation(session, source_id(session, llama_db.llama, "1-mlp"), 4, SCRIPT, "human")
    app = create_app(Settings(database_url=llama_db.url), engine=llama_db.engine)
    with TestClient(app) as c:
        yield c


def read_batches(folder, kind: str) -> list[list[dict]]:
    files = sorted(folder.glob(f"{kind}/batch-*.jsonl.gz"), key=lambda p: int(p.name[6:-9]))
    return [[json.loads(line) for line in gzip.open(f, "rt", encoding="utf-8")] for f in files]


def test_neuronpedia_layout_holds_every_feature(client, llama_db, tmp_path, capsys):
    model = llama_db.llama
    assert main(["export", "--model", model, "--source", "1-mlp", "--out", str(tmp_path),
                 "--batch-size", "40", "--db", llama_db.url]) == 0
    folder = tmp_path / model / "1-mlp"
    assert str(folder) in capsys.readouterr().out
    feats = read_batches(folder, "features")
    assert [len(b) for b in feats] == [40, 40, 16]  # 96 neurons
    acts = [a for b in read_batches(folder, "activations") for a in b]
    expl = [e for b in read_batches(folder, "explanations") for e in b]
    assert json.loads((folder / "model.jsonl").read_text())["id"] == model
    assert json.loads((folder / "source.jsonl").read_text())["id"] == "1-mlp"
    by_feature: dict[str, list[dict]] = {}
    for a in acts:
        assert set(a) == ACTIVATION
        by_feature.setdefault(a["index"], []).append(a)
    for i, row in enumerate(r for b in feats for r in b):
        assert set(row) == NEURON and row["index"] == str(i)
        fp = FeaturePage.model_validate_json(client.get(f"/{model}/1-mlp/{i}.json").content)
        assert (row["modelId"], row["layer"], row["hookName"]) == (model, "1-mlp", fp.hook_name)
        assert row["maxActApprox"] == fp.stats.max_act
        assert row["frac_nonzero"] == fp.stats.frac_active
        assert row["pos_str"] == [t.text for t in fp.top_logits]
        assert row["neg_values"] == [t.value for t in fp.bottom_logits]
        assert sum(row["freq_hist_data_bar_heights"]) == sum(fp.histogram.counts)
        assert row["topkCosSimIndices"] == [r.index for r in fp.related.cosine]
        assert row["correlated_features_pearson"] == [r.value for r in fp.related.pearson]
        examples = [("top", e, None) for e in fp.top] + [("bottom", e, None) for e in fp.bottom]
        examples += [(g.name, e, g) for g in fp.quantiles
                     for e in sorted(g.examples, key=lambda e: e.rank)]
        got = by_feature.get(str(i), [])
        assert len(got) == len(examples)
        for a, (group, ex, g) in zip(got, examples, strict=True):
            assert a["dataSource"] == f"featurescope:{group}"
            assert (a["tokens"], a["values"]) == (ex.tokens, ex.acts)
            assert a["tokens"][a["maxValueTokenIndex"]] == ex.tokens[ex.peak_index]
            assert a["maxValue"] == ex.peak_value and a["dataIndex"] == str(ex.seq_idx)
            assert (a["binMin"], a["binMax"]) == ((g.lo, g.hi) if g else (None, None))
    assert [(e["index"], e["description"], e["typeName"]) for e in expl] == [
        ("4", SCRIPT, "human")]
    assert all(set(e) == EXPLANATION for e in expl)


def test_parquet_tables_hold_the_same_rows(client, llama_db, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    model = llama_db.llama
    for fmt in ("neuronpedia", "parquet"):
        assert main(["export", "--model", model, "--source", "1-res-sae-48", "--format", fmt,
                     "--out", str(tmp_path / fmt), "--db", llama_db.url]) == 0
    nfolder = tmp_path / "neuronpedia" / model / "1-res-sae-48"
    pfolder = tmp_path / "parquet" / model / "1-res-sae-48"
    for kind in ("features", "activations"):
        want = [r for b in read_batches(nfolder, kind) for r in b]
        got = pq.read_table(pfolder / f"{kind}.parquet").to_pylist()
        assert len(got) == len(want) > 0
        assert [r["index"] for r in got] == [r["index"] for r in want]
        assert [r.get("maxActApprox", r.get("maxValue")) for r in got] == [
            r.get("maxActApprox", r.get("maxValue")) for r in want]


def test_bad_exports_get_one_error_and_write_nothing(client, llama_db, tmp_path):
    model = llama_db.llama
    with pytest.raises(SystemExit, match="no source"):
        main(["export", "--model", model, "--source", "9-mlp", "--out", str(tmp_path),
              "--db", llama_db.url])
    with pytest.raises(SystemExit, match="not ready"):
        main(["export", "--model", model, "--source", "0-res-sae-32", "--out", str(tmp_path),
              "--db", llama_db.url])
    assert not any(tmp_path.iterdir())
    (tmp_path / model / "0-mlp").mkdir(parents=True)
    (tmp_path / model / "0-mlp" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        main(["export", "--model", model, "--source", "0-mlp", "--out", str(tmp_path),
              "--db", llama_db.url])
    assert [p.name for p in (tmp_path / model / "0-mlp").iterdir()] == ["keep.txt"]
