"""`/{model}/{source}/{index}`: one feature, its statistics and examples.

`build_feature` makes the one context object; the page, its htmx partial, its JSON and the
Neuronpedia-compatible answer are all made from it."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Row
from sqlalchemy.orm import Session

from app import explanations, urls
from app.db import explanations as explanation_db
from app.db import queries
from app.db.tables import BosPolicy, ExampleGroup, SourceKind
from app.explanation_schemas import FeatureExplanations
from app.histogram import histogram_edges
from app.related import related_of
from app.relation_schemas import FeatureRelated
from app.routes.deps import FeatureIndex, ModelSlug, SessionDep, SourceSlug, load_source, not_found
from app.routes.present import pct, progress
from app.routes.render import etag, json_headers, not_modified, page, render, wants_json
from app.schemas import FeaturePage

router = APIRouter()

_EDGES = [e if math.isfinite(e) else None for e in histogram_edges()]


def example_out(row: Row, vocab: queries.Vocab) -> dict:
    """One stored example (an ExampleOut once validated): acts are float16 LE per window
    token, the window is tokens[start : start + len(acts)] of its int32 LE sequence."""
    _, rank, seq_idx, start, peak_pos, peak_value, blob, seq = row
    n = min(len(blob) // 2, max(len(seq) // 4 - start, 0))
    ids = queries.decode_tokens(seq, start, n)
    return {"rank": rank, "seq_idx": seq_idx, "start": start, "peak_pos": peak_pos,
            "peak_index": peak_pos - start, "peak_value": peak_value, "token_ids": ids,
            "tokens": vocab.many(ids), "acts": queries.decode_acts(blob, n)}


def _missing(src: Row, index: int) -> Exception:
    name = f"{src.model_slug}/{src.slug}"
    if src.status == "building":
        done = pct(progress(src.progress_tokens, src.total_tokens))
        return not_found(f"{name} is still being harvested ({done}); feature {index} is not there yet")
    if src.status == "failed":
        return not_found(f"the harvest of {name} failed; it has no features")
    return not_found(f"{name} has no feature {index}: it has features 0 to {src.n_features - 1}")


def _read_feature(session: Session, vocabs: queries.VocabCache, src: Row, index: int,
                  make: Callable[[Row, queries.Vocab], object]) -> tuple:
    """(row, vocab, top, bottom, groups): the feature's row and vocabulary, its top and bottom
    examples made by make(example row, vocab) in rank order, and its quantile groups, the
    highest range first, as (group code, [(peak value, example), ...] highest first)."""
    row = queries.feature(session, source_id=src.id, index=index)
    if row is None:
        raise _missing(src, index)
    vocab = vocabs.get(session, model_id=src.model_id, tokenizer_hash=src.tokenizer_hash)
    top, bottom, quantiles = [], [], {}
    for e in queries.examples(session, source_id=src.id, dataset_id=src.dataset_id, index=index):
        ex = make(e, vocab)
        if e.group == ExampleGroup.top:
            top.append(ex)
        elif e.group == ExampleGroup.bottom:
            bottom.append(ex)
        else:
            quantiles.setdefault(e.group, []).append((e.peak_value, ex))
    groups = [(code, sorted(quantiles[code], key=lambda pe: -pe[0]))
              for code in sorted(quantiles, reverse=True)]
    return row, vocab, top, bottom, groups


def _head(src: Row, index: int, row: Row, texts, num: Callable[[float], object]) -> dict:
    """The fields of a feature page before its examples; num writes each float statistic."""
    return {
        "ok": True, "model": src.model_slug, "source": src.slug, "kind": src.kind,
        "hook_name": src.hook_name, "layer": src.layer, "n_features": src.n_features,
        "dataset": src.dataset_slug, "bos_first": src.bos_policy == BosPolicy.prepended,
        "index": index,
        "stats": {"max_act": num(row.max_act), "min_act": num(row.min_act),
                  "mean_act": num(row.mean_act), "std_act": num(row.std_act),
                  "frac_active": num(row.frac_active), "n_active": row.n_active,
                  "n_tokens": row.n_tokens},
        "histogram": {"edges": _EDGES, "counts": row.histogram},
        "top_logits": _token_values(row.top_logits, texts, num),
        "bottom_logits": _token_values(row.bottom_logits, texts, num),
        "top_tokens": [{"id": t, "text": x, "count": c} for (t, c), x in zip(
            row.top_tokens, texts([t for t, _ in row.top_tokens]), strict=True)]}


def _links(src: Row, index: int) -> dict:
    m, s = src.model_slug, src.slug
    url = urls.feature(m, s, index)
    return {"page": url, "json_url": urls.json(url), "source": urls.source(m, s),
            "prev": urls.feature(m, s, index - 1) if index > 0 else None,
            "next": urls.feature(m, s, index + 1) if index + 1 < src.n_features else None,
            "random": urls.random_feature(m, s),
            "neuronpedia": urls.neuronpedia_feature(m, s, index)}


def explained(session: Session, cache: explanations.ExplanationCache | None, src: Row,
              index: int, version: int | None = None) -> FeatureExplanations:
    """The feature's explanations, best first, with its scorers' judgements (a cache of its
    own when none is given, the explanations version read when not given)."""
    if version is None:
        version = explanation_db.version(session)
    return explanations.of_feature(session, cache or explanations.ExplanationCache(),
                                   source_id=src.id, index=index, version=version)


def related(session: Session, cache: explanations.ExplanationCache | None, src: Row,
            index: int, version: int | None = None) -> FeatureRelated:
    """The feature's lists of related features (a cache of its own when none is given)."""
    if version is None:
        version = explanation_db.version(session)
    return related_of(session, cache or explanations.ExplanationCache(), source_id=src.id,
                      index=index, version=version)


def build_feature(session: Session, vocabs: queries.VocabCache, src: Row, index: int,
                  explains: FeatureExplanations | None = None,
                  relations: FeatureRelated | None = None) -> FeaturePage:
    row, vocab, top, bottom, groups = _read_feature(session, vocabs, src, index, example_out)
    if explains is None:
        explains = explained(session, None, src, index)
    if relations is None:
        relations = related(session, None, src, index)
    quantiles = [{"group": code - ExampleGroup.quantile, "name": ExampleGroup.name_of(code),
                  "lo": min(p for p, _ in exs), "hi": max(p for p, _ in exs),
                  "examples": [ex for _, ex in exs]} for code, exs in groups]
    # One validation of the whole context (pydantic-core builds the nested models).
    return FeaturePage.model_validate({
        **_head(src, index, row, vocab.many, float), "top": top, "bottom": bottom,
        "quantiles": quantiles, "links": _links(src, index), "related": relations,
        "explanations": explains.explanations, "scorers": explains.scorers})


# ------------------------------------------------------------------ the JSON, written directly
#
# `feature_json` writes the same document as `build_feature(...).model_dump_json()` (a test
# compares the two on every feature of the test database) without building a float and a
# pydantic object per token: the activations of a window are one join of the precomputed JSON
# text of each float16 code, its tokens one join of the precomputed JSON string of each token.
# This is the hot path of the explorer's API (a feature is ~2,000 tokens).


def _num(v) -> bytes:
    """A float field as pydantic writes it (null for inf and NaN)."""
    v = float(v)
    return repr(v).encode() if math.isfinite(v) else b"null"


def _finite(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _example_json(row: Row, vocab: queries.Vocab) -> bytes:
    _, rank, seq_idx, start, peak_pos, peak_value, blob, seq = row
    n = min(len(blob) // 2, max(len(seq) // 4 - start, 0))
    ids, texts = vocab.json_items(queries.decode_tokens(seq, start, n))
    return b"".join((
        b'{"rank":%d,"seq_idx":%d,"start":%d,"peak_pos":%d,"peak_index":%d,"peak_value":%b,'
        b'"token_ids":[' % (rank, seq_idx, start, peak_pos, peak_pos - start, _num(peak_value)),
        ids, b'],"tokens":[', texts, b'],"acts":[', queries.acts_json(blob, n), b"]}"))


def feature_json(session: Session, vocabs: queries.VocabCache, src: Row, index: int,
                 explains: FeatureExplanations, relations: FeatureRelated) -> bytes:
    """The JSON of a feature page (a FeaturePage), as UTF-8 bytes."""
    row, vocab, top, bottom, groups = _read_feature(session, vocabs, src, index, _example_json)
    quantiles = [b'{"group":%d,"name":%b,"lo":%b,"hi":%b,"examples":[%b]}' % (
        code - ExampleGroup.quantile, _dumps(ExampleGroup.name_of(code)),
        _num(min(p for p, _ in exs)), _num(max(p for p, _ in exs)),
        b",".join(t for _, t in exs)) for code, exs in groups]
    head = _dumps(_head(src, index, row, vocab.many, _finite))
    return b"".join((head[:-1], b',"top":[', b",".join(top), b'],"bottom":[', b",".join(bottom),
                     b'],"quantiles":[', b",".join(quantiles), b'],"links":',
                     _dumps(_links(src, index)), b',"related":', relations.model_dump_json().encode(),
                     b",", explains.model_dump_json()[1:].encode()))


def _token_values(pairs: list, texts, value=float) -> list[dict]:
    return [{"id": t, "text": x, "value": value(v)}
            for (t, v), x in zip(pairs, texts([t for t, _ in pairs]), strict=True)]


@page(router, "/{model}/{source}/{index}", name="feature", schema=FeaturePage,
      summary="One feature: statistics, examples, histogram and logit tokens")
async def feature(request: Request, session: SessionDep, model: ModelSlug, source: SourceSlug,
                  index: FeatureIndex):
    # The explorer's hottest view. Its reads are a few indexed rows: from SQLite (memory
    # mapped) they take well under a millisecond of CPU, less than a trip through the thread
    # pool and back, so they run on the event loop; PostgreSQL's network round trips go to a
    # worker thread.
    if request.app.state.engine.dialect.name == "sqlite":
        return _feature(request, session, model, source, index)
    return await run_in_threadpool(_feature, request, session, model, source, index)


def _feature(request: Request, session: Session, model: str, source: str, index: int):
    src = load_source(session, model, source)
    version = explanation_db.version(session)
    tag = etag(request, explanations.page_version(
        src.version_hash if src.status == "ready" else None, version))
    if (cached := not_modified(request, tag)) is not None:
        return cached
    cache = request.app.state.explanations
    explains = explained(session, cache, src, index, version)
    if src.kind == SourceKind.heads:
        from app.routes.heads import build_head

        return render(request, build_head(session, request.app.state.vocabs, src, index,
                                          explains),
                      template="feature.html", partial="_head.html", tag=tag)
    relations = related(session, cache, src, index, version)
    if wants_json(request):
        body = feature_json(session, request.app.state.vocabs, src, index, explains, relations)
        return Response(body, media_type="application/json", headers=json_headers(tag))
    ctx = build_feature(session, request.app.state.vocabs, src, index, explains, relations)
    return render(request, ctx, template="feature.html", partial="_feature.html", tag=tag)
