"""Export of one source: Neuronpedia's bulk layout (batches of gzipped JSON lines of features,
activations and explanations, with the column names of Neuronpedia's tables) and parquet (one
table per kind, for pandas, polars and DuckDB).

Neuronpedia's layout, under OUT/{model}/{source}/:
    features/batch-N.jsonl.gz      one Neuron row per feature
    activations/batch-N.jsonl.gz   one Activation row per stored example
    explanations/batch-N.jsonl.gz  one Explanation row per explanation
    model.jsonl, source.jsonl      the Model and Source rows

Every row is made from the feature page's own context (`build_feature`), so the files say what
the pages say. What the layout cannot carry is listed in the README ("Export and import").
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from app.db import queries
from app.db.tables import Feature
from app.schemas import ExampleOut, FeaturePage

FORMATS = ("neuronpedia", "parquet")
BATCH = 1024
"""Features per batch file."""
CREATOR = "featurescope"
GROUP_TAG = "featurescope:"
"""Activation.dataSource of an exported example: this prefix and its group (top, bottom,
quantile-N), so an import puts it back in its group."""


class ExportError(ValueError):
    pass


def _iso(t: dt.datetime | None) -> str:
    return (t or dt.datetime.now(dt.UTC)).isoformat()


def _activation(fp: FeaturePage, group: str, ex: ExampleOut, lo: float | None = None,
                hi: float | None = None) -> dict:
    """An example as Neuronpedia's Activation row."""
    return {
        "id": f"{fp.model}/{fp.source}/{fp.index}/{group}/{ex.rank}",
        "tokens": ex.tokens, "modelId": fp.model, "layer": fp.source, "index": str(fp.index),
        "maxValue": ex.peak_value, "maxValueTokenIndex": ex.peak_index,
        "minValue": min(ex.acts, default=0.0), "values": ex.acts,
        "creatorId": CREATOR, "createdAt": None,
        "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None, "lossValues": [],
        "logitContributions": None, "binMin": lo, "binMax": hi, "binContains": None,
        "qualifyingTokenIndex": ex.peak_index, "dataIndex": str(ex.seq_idx),
        "dataSource": GROUP_TAG + group}


def _feature(fp: FeaturePage, created: str) -> dict:
    """A feature as Neuronpedia's Neuron row."""
    centers = [(lo + hi) / 2 if hi is not None else lo * 2
               for lo, hi in zip(fp.histogram.edges[:-1], fp.histogram.edges[1:], strict=True)]
    bars = [(c, n) for c, n in zip(centers, fp.histogram.counts, strict=True) if n]
    rel = fp.related
    return {
        "modelId": fp.model, "layer": fp.source, "index": str(fp.index),
        "creatorId": CREATOR, "createdAt": created,
        "maxActApprox": fp.stats.max_act, "hasVector": False, "vector": [], "vectorLabel": None,
        "hookName": fp.hook_name,
        "topkCosSimIndices": [r.index for r in rel.cosine],
        "topkCosSimValues": [r.value for r in rel.cosine],
        "neuron_alignment_indices": [], "neuron_alignment_values": [],
        "neuron_alignment_l1": [], "correlated_neurons_indices": [],
        "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
        "correlated_features_indices": [r.index for r in rel.pearson],
        "correlated_features_pearson": [r.value for r in rel.pearson],
        "correlated_features_l1": [],
        "neg_str": [t.text for t in fp.bottom_logits], "neg_values": [t.value for t in fp.bottom_logits],
        "pos_str": [t.text for t in fp.top_logits], "pos_values": [t.value for t in fp.top_logits],
        "frac_nonzero": fp.stats.frac_active,
        "freq_hist_data_bar_heights": [n for _, n in bars],
        "freq_hist_data_bar_values": [c for c, _ in bars],
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "decoder_weights_dist": []}


def _explanations(fp: FeaturePage) -> list[dict]:
    return [{"id": str(e.id), "modelId": fp.model, "layer": fp.source, "index": str(fp.index),
             "description": e.text, "authorId": e.author or CREATOR, "typeName": e.explainer,
             "explanationModelName": e.explainer_model, "createdAt": _iso(e.created_at)}
            for e in fp.explanations]


def feature_rows(fp: FeaturePage, created: str) -> tuple[dict, list[dict], list[dict]]:
    """One feature's Neuron row, its Activation rows (top, bottom, then the quantile groups with
    their range as binMin and binMax; each group in rank order) and its Explanation rows."""
    acts = [_activation(fp, "top", ex) for ex in fp.top]
    acts += [_activation(fp, "bottom", ex) for ex in fp.bottom]
    acts += [_activation(fp, g.name, ex, g.lo, g.hi) for g in fp.quantiles  # in stored order
             for ex in sorted(g.examples, key=lambda e: e.rank)]
    return _feature(fp, created), acts, _explanations(fp)


def pages(engine: Engine, model: str, source: str) -> Iterator[tuple[tuple, FeaturePage]]:
    """((model row, source row), feature page) of every feature of a ready source, by index."""
    from app.routes.features import build_feature

    with Session(engine) as session:
        src = queries.source_by_slug(session, model=model, source=source)
        if src is None:
            raise ExportError(f"no source {model}/{source}")
        if src.status != "ready":
            raise ExportError(f"{model}/{source} is {src.status}, not ready")
        rows = (queries.model_by_slug(session, slug=model), src)
        vocabs = queries.VocabCache()
        indices = session.scalars(select(Feature.idx).where(Feature.source_id == src.id)
                                  .order_by(Feature.idx)).all()
        for i in indices:
            yield rows, build_feature(session, vocabs, src, i)


def _write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=5) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")


def _meta(rows: tuple, fp: FeaturePage, created: str) -> tuple[dict, dict]:
    m, src = rows
    model = {"id": fp.model, "displayName": fp.model, "displayNameShort": fp.model,
             "creatorId": CREATOR, "layers": m.n_layers, "neuronsPerLayer": m.d_mlp,
             "dimension": m.d_model, "owner": CREATOR, "visibility": "PUBLIC",
             "inferenceEnabled": False, "instruct": False, "createdAt": created,
             "updatedAt": created}
    source = {"id": fp.source, "modelId": fp.model, "setName": fp.source.partition("-")[2],
              "creatorId": CREATOR, "createdAt": created, "hasDashboards": True,
              "inferenceEnabled": False, "visibility": "PUBLIC",
              "saelensConfig": src.sae_config, "hookName": fp.hook_name,
              "dataset": fp.dataset, "numFeatures": fp.n_features}
    return model, source


def export(engine: Engine, model: str, source: str, out: Path, fmt: str,
           batch: int = BATCH) -> Path:
    """Write one source in `fmt` under out/{model}/{source}/; returns that folder. Refuses a
    folder that already holds files."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    folder = Path(out) / model / source
    if folder.exists() and any(folder.iterdir()):
        raise ExportError(f"{folder} is not empty: export into a new folder")
    created = _iso(None)
    tables: dict[str, list[dict]] = {"features": [], "activations": [], "explanations": []}
    n_batch, meta = 0, None
    for rows, fp in pages(engine, model, source):
        if meta is None:
            meta = _meta(rows, fp, created)
        feat, acts, expl = feature_rows(fp, created)
        tables["features"].append(feat)
        tables["activations"] += acts
        tables["explanations"] += expl
        if fmt == "neuronpedia" and len(tables["features"]) == batch:
            _flush(folder, n_batch, tables)
            n_batch += 1
    if meta is None:
        raise ExportError(f"{model}/{source} has no features")
    if fmt == "parquet":
        _parquet(folder, tables)
    else:
        if tables["features"]:
            _flush(folder, n_batch, tables)
        for name, row in zip(("model", "source"), meta, strict=True):
            (folder / f"{name}.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    return folder


def _flush(folder: Path, n: int, tables: dict[str, list[dict]]) -> None:
    for kind, rows in tables.items():
        if rows or kind != "explanations":
            _write_jsonl_gz(folder / kind / f"batch-{n}.jsonl.gz", rows)
        rows.clear()


def _parquet(folder: Path, tables: dict[str, list[dict]]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ExportError("--format parquet needs pyarrow (pip install pyarrow)") from exc
    folder.mkdir(parents=True, exist_ok=True)
    for kind, rows in tables.items():
        if rows:
            pq.write_table(pa.Table.from_pylist(rows), folder / f"{kind}.parquet")
