"""Attention heads on the web: the head page (a heads source's feature page, served by the
feature route) and the head map on the model page (`/{model}?metric=induction`): layers x heads
coloured by one metric, each cell a link to its head page."""

from __future__ import annotations

from sqlalchemy import Row
from sqlalchemy.orm import Session

from app import urls
from app.db import queries
from app.db.tables import SourceKind
from app.explanation_schemas import FeatureExplanations
from app.head_schemas import HeadPage
from app.routes.deps import not_found
from app.routes.present import _POS, half, shown
from app.schemas import HeadMap

METRICS = ("induction", "previous-token", "duplicate-token", "self", "bos-sink", "distance",
           "entropy", "copying")
"""The head metrics, in the order pages show them (workers/head_metrics.py defines them)."""


def build_head(session: Session, vocabs: queries.VocabCache, src: Row, index: int,
               explains: FeatureExplanations) -> HeadPage:
    """A heads source's feature page with the head's metrics, its attention-distance histogram
    and, per top example, the BOS weight and the most attended key of its peak query."""
    from app.routes.features import build_feature

    base = build_feature(session, vocabs, src, index, explains).model_dump()
    hm = queries.head_metrics(session, source_id=src.id) or {}
    extras = hm.get("top_examples", [])
    extras = extras[index] if index < len(extras) else []
    rows = queries.attention_rows(session, source_id=src.id, index=index)
    base["top"] = [{**ex, "bos_weight": e[0] if e else None, "key_pos": e[1] if e else None,
                    "rows": _cut_rows(rows.get(ex["rank"]), len(ex["acts"]))}
                   for ex, e in zip(base["top"], [*extras, *[None] * len(base["top"])],
                                    strict=False)]
    metrics, controls = hm.get("metrics", {}), hm.get("controls", {})
    hist = hm.get("distance_hist") or []
    bins = [{"lo": lo, "hi": None if hi < 0 else hi, "mass": mass} for (lo, hi), mass in zip(
        hm.get("distance_bins", []), hist[index] if index < len(hist) else [], strict=False)]
    while len(bins) > 1 and bins[-1]["mass"] == 0:  # distances the sequences are too short for
        bins.pop()
    base["head"] = {
        "head": index,
        "metrics": [{"name": m, "value": metrics[m][index], "control": controls[m]}
                    for m in METRICS if m in metrics],
        "distance": bins}
    return HeadPage.model_validate(base)


def _cut_rows(rows: list | None, n: int) -> list | None:
    """The stored rows of an example whose window the sequence cut to n tokens."""
    return None if rows is None else [list(r[:n]) for r in rows[:n]]


def row_text(row) -> str:
    """A token's attention row as the data attribute the page's script reads: the weights,
    space separated."""
    return " ".join(map(str, row))


def head_cells(ex, bos_first: bool) -> list[tuple[str, str, str]]:
    """Per window token of a head example: (text, its attention weight from the peak query,
    CSS classes). Weights are probabilities, so the colour is absolute (1 = full colour); the
    peak query is marked `q`, the key it attends to most `pk`, a leading BOS `bos`."""
    out = []
    for i, (text, w) in enumerate(zip(ex.tokens, ex.acts, strict=True)):
        k = int(w * 100 + 0.5)
        cls = _POS[k if k < 100 else 100] if w > 0 else "t"
        pos = ex.start + i
        if pos == ex.peak_pos:
            cls += " q"
        if pos == getattr(ex, "key_pos", None):
            cls += " pk"
        if bos_first and pos == 0:
            cls += " bos"
        out.append((shown(text), half(w), cls))
    return out


def build_head_map(session: Session, model_row, metric: str) -> HeadMap | None:
    """The head map of a model for one metric, or None where it has no heads source."""
    if metric not in METRICS:
        raise not_found(f"unknown head metric {metric!r}: one of {', '.join(METRICS)}")
    layers = []
    for src in queries.sources(session, model_id=model_row.id):
        if src.kind != SourceKind.heads or src.status != "ready":
            continue
        hm = queries.head_metrics(session, source_id=src.id) or {}
        values = hm.get("metrics", {}).get(metric, [])
        layers.append({"layer": src.layer, "source": src.slug,
                       "control": hm.get("controls", {}).get(metric),
                       "heads": [{"head": h, "value": v,
                                  "url": urls.feature(model_row.slug, src.slug, h)}
                                 for h, v in enumerate(values)]})
    if not layers:
        return None
    values = [c["value"] for layer in layers for c in layer["heads"]]
    return HeadMap(metric=metric, metrics=[{"name": m, "url": urls.model(model_row.slug, m)}
                                           for m in METRICS],
                   layers=layers, lo=min(values), hi=max(values))
