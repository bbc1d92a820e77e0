"""Writes a harvest into the database; computes nothing.

`begin` registers the model, the dataset (its sequences stored once) and the sources as
`building`, so a server can show progress; `write` writes what workers/finalize.py made of
every source (features, examples) and flips them to `ready` in one transaction, so a source is
visible only when whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import Engine, delete, insert, select, update

from app.db.bulk import bulk_insert, copy_columns
from app.db.engine import transaction
from app.db.tables import (
    SEQUENCE_TOKENS,
    AttentionRows,
    Dataset,
    ExampleBlock,
    Feature,
    Model,
    PeakToken,
    Relation,
    Sequence,
    Source,
    SourceStatus,
    Vocabulary,
    utcnow,
)
from workers.corpus import tokenizer_hash

if TYPE_CHECKING:
    from workers.harvest import HarvestConfig, SourceSpec

log = logging.getLogger(__name__)

INSERT_CHUNK = 20_000


class StoreError(RuntimeError):
    pass


@dataclass
class Registered:
    model_id: int
    dataset_id: int
    source_ids: dict[str, int]


def _model_row(session, lm) -> Model:
    row = session.scalar(select(Model).where(Model.slug == lm.slug))
    thash = tokenizer_hash(lm.tokenizer)
    if row is not None:
        if row.tokenizer_hash != thash or row.d_mlp != lm.d_mlp or row.n_layers != lm.n_layers:
            raise StoreError(
                f"model {lm.slug!r} is already in the database with a different tokenizer or "
                f"shape (from {row.hub_id}); load this one under another name")
        return row
    row = Model(slug=lm.slug, hub_id=lm.source, revision=lm.revision, arch=lm.arch,
                n_layers=lm.n_layers, d_model=lm.d_model, d_mlp=lm.d_mlp,
                vocab_size=lm.vocab_size, tokenizer_hash=thash)
    session.add(row)
    session.flush()
    session.add(Vocabulary(model_id=row.id, tokens=lm.token_strings()))
    return row


def _dataset_row(session, dataset) -> Dataset:
    row = session.scalar(select(Dataset).where(Dataset.slug == dataset.slug))
    if row is not None:
        return row
    row = Dataset(slug=dataset.slug, name=dataset.name, source=dataset.source,
                  slice=dataset.slice, n_sequences=dataset.n_sequences, seq_len=dataset.seq_len,
                  bos_policy=dataset.bos_policy, tokenizer_hash=dataset.tokenizer_hash)
    session.add(row)
    session.flush()
    toks = dataset.tokens.numpy().astype(SEQUENCE_TOKENS)
    rows = [{"dataset_id": row.id, "idx": i, "tokens": toks[i].tobytes()} for i in range(len(toks))]
    for i in range(0, len(rows), INSERT_CHUNK):
        session.execute(insert(Sequence), rows[i:i + INSERT_CHUNK])
    return row


def begin(engine: Engine, lm, dataset, specs: list[SourceSpec], cfg: HarvestConfig,
          *, replace: bool = False) -> Registered:
    """Register everything and mark the sources `building`. A ready source of the same name is
    refused unless `replace`; a building or failed one (an earlier, interrupted run) is reused."""
    with transaction(engine) as session:
        model = _model_row(session, lm)
        ds = _dataset_row(session, dataset)
        ids = {}
        for spec in specs:
            src = session.scalar(select(Source).where(Source.model_id == model.id,
                                                      Source.slug == spec.slug))
            if src is not None and src.status == SourceStatus.ready and not replace:
                raise StoreError(
                    f"source {lm.slug}/{spec.slug} is already harvested; pass --replace to "
                    "harvest it again")
            if src is None:
                src = Source(model_id=model.id, slug=spec.slug)
                session.add(src)
            src.dataset_id = ds.id
            src.kind = spec.kind
            src.hook_name = spec.hook_name
            src.layer = spec.layer
            src.n_features = spec.n_features
            src.sae_config = spec.sae_config
            src.harvest_config = cfg.to_dict()
            src.status = SourceStatus.building
            src.progress_tokens = 0
            src.total_tokens = dataset.n_tokens
            src.error = None
            session.flush()
            ids[spec.slug] = src.id
        return Registered(model.id, ds.id, ids)


def ready_sources(engine: Engine, model_slug: str) -> set[str]:
    """Slugs of the model's sources that are finished."""
    with transaction(engine) as session:
        return set(session.scalars(
            select(Source.slug).join(Model, Model.id == Source.model_id)
            .where(Model.slug == model_slug, Source.status == SourceStatus.ready)))


def report_progress(engine: Engine, reg: Registered, n_tokens: int) -> None:
    with transaction(engine) as session:
        session.execute(update(Source).where(Source.id.in_(reg.source_ids.values()))
                        .values(progress_tokens=n_tokens))


def fail(engine: Engine, reg: Registered, error: str) -> None:
    with transaction(engine) as session:
        session.execute(update(Source).where(Source.id.in_(reg.source_ids.values()),
                                             Source.status == SourceStatus.building)
                        .values(status=SourceStatus.failed, error=error[:2000]))


BLOCK_COLUMNS = ("source_id", "feature_idx", "group", "n", "window", "data")
FEATURE_COLUMNS = ("source_id", "idx", "max_act", "min_act", "mean_act", "std_act",
                   "frac_active", "n_active", "n_tokens", "histogram", "top_logits",
                   "bottom_logits", "top_tokens")
PEAK_COLUMNS = ("source_id", "token_id", "feature_idx", "count")
RELATION_COLUMNS = ("source_id", "feature_idx", "kind", "rank", "other_source_id", "other_idx",
                    "value")
ROW_COLUMNS = ("source_id", "feature_idx", "rank", "window", "data")


@dataclass
class SourceResult:
    """One finished source as the store writes it (built by workers/finalize.py): plain rows
    and numpy columns in their stored form (JSON as text), no tensors. Every row and column
    leaves out source_id, which the store knows."""

    slug: str
    n_tokens: int
    """Tokens the harvest covered (the source's progress once written)."""
    features: list[tuple]
    """One row per feature: FEATURE_COLUMNS after source_id."""
    peaks: list[tuple]
    """PEAK_COLUMNS after source_id: (token id, feature index, count)."""
    blocks: list[list]
    """The example blocks, in chunks of features: per chunk, the columns of BLOCK_COLUMNS after
    source_id (numpy arrays, and a list of bytes for `data`)."""
    identity: list = field(default_factory=list)
    """What the source was made from (model, dataset, slug, hook, harvest config): with the
    time it is written, its version hash."""
    relations: list[tuple] = field(default_factory=list)
    """Its lists of related features (workers/relations.py): (feature index, kind, rank, other
    source's slug, other feature index, value), the other source one of the same harvest."""
    head_metrics: dict | None = None
    """A heads source's metrics per head (workers/head_metrics.py), as `sources.head_metrics`."""
    attention_rows: list[tuple] = field(default_factory=list)
    """A heads source's ROW_COLUMNS after source_id."""


def write(engine: Engine, reg: Registered, results: list[SourceResult]) -> None:
    """Write the features and examples of every source and mark them ready, in one transaction
    (replacing what an earlier harvest of the same source left)."""
    with transaction(engine) as session:
        sids = [reg.source_ids[res.slug] for res in results]
        # Lists of and lists pointing at a source written again go; all before any is written.
        session.execute(delete(Relation).where(
            Relation.source_id.in_(sids) | Relation.other_source_id.in_(sids)))
        for res in results:
            sid = reg.source_ids[res.slug]
            session.execute(delete(ExampleBlock).where(ExampleBlock.source_id == sid))
            session.execute(delete(Feature).where(Feature.source_id == sid))
            session.execute(delete(PeakToken).where(PeakToken.source_id == sid))
            session.execute(delete(AttentionRows).where(AttentionRows.source_id == sid))
            bulk_insert(session, Feature.__table__, FEATURE_COLUMNS,
                        ((sid, *row) for row in res.features))
            bulk_insert(session, PeakToken.__table__, PEAK_COLUMNS,
                        ((sid, *row) for row in res.peaks))
            bulk_insert(session, Relation.__table__, RELATION_COLUMNS,
                        ((sid, f, kind, rank, reg.source_ids[other], j, v)
                         for f, kind, rank, other, j, v in res.relations))
            bulk_insert(session, AttentionRows.__table__, ROW_COLUMNS,
                        ((sid, *row) for row in res.attention_rows))
            for cols in res.blocks:
                copy_columns(session, ExampleBlock.__table__, BLOCK_COLUMNS,
                             [np.full(len(cols[0]), sid, dtype=np.int32), *cols])
            finished = utcnow()
            version = hashlib.sha256(json.dumps([*res.identity, finished.isoformat()],
                                                default=str).encode()).hexdigest()[:20]
            session.execute(update(Source).where(Source.id == sid).values(
                status=SourceStatus.ready, progress_tokens=res.n_tokens,
                finished_at=finished, version_hash=version, error=None,
                head_metrics=res.head_metrics))
    log.info("stored %d sources", len(results))


def sequence_tokens(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=SEQUENCE_TOKENS)
