"""Tables (SQLAlchemy 2.0). Every change goes through an Alembic migration in migrations/."""

from __future__ import annotations

import datetime as dt
import enum
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class SourceStatus(enum.StrEnum):
    building = "building"
    ready = "ready"
    failed = "failed"


class BosPolicy(enum.StrEnum):
    """How the sequences of a dataset start: with the tokenizer's BOS token (never an example's
    peak nor counted in the statistics), or with corpus text where the tokenizer has none."""

    prepended = "bos-prepended"
    none = "none"


class SourceKind(enum.StrEnum):
    neurons = "neurons"
    sae = "sae"
    heads = "heads"


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(128), unique=True)
    hub_id: Mapped[str] = mapped_column(Text, doc="hub id, local path or package file it was loaded from")
    revision: Mapped[str | None] = mapped_column(String(64))
    arch: Mapped[str] = mapped_column(String(64))
    n_layers: Mapped[int] = mapped_column(Integer)
    d_model: Mapped[int] = mapped_column(Integer)
    d_mlp: Mapped[int] = mapped_column(Integer)
    vocab_size: Mapped[int] = mapped_column(Integer)
    tokenizer_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Vocabulary(Base):
    """Display text of every token id of a model's tokenizer, as one JSON array."""

    __tablename__ = "vocabularies"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    tokens: Mapped[list[str]] = mapped_column(JSON)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(160), unique=True)
    name: Mapped[str] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(Text, doc="provenance: where the text came from")
    slice: Mapped[str] = mapped_column(String(128))
    n_sequences: Mapped[int] = mapped_column(Integer)
    seq_len: Mapped[int] = mapped_column(Integer)
    bos_policy: Mapped[str] = mapped_column(String(32))
    tokenizer_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


SEQUENCE_TOKENS = np.dtype("<i4")
"""The token ids of a stored sequence (`sequences.tokens`): little-endian int32."""


class Sequence(Base):
    """One tokenized sequence, stored once and shared by every example that points into it."""

    __tablename__ = "sequences"
    __table_args__ = {"sqlite_with_rowid": False}

    dataset_id: Mapped[int] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True
    )
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    tokens: Mapped[bytes] = mapped_column(LargeBinary, doc="token ids as SEQUENCE_TOKENS")


class Source(Base):
    __tablename__ = "sources"
    __table_args__ = (UniqueConstraint("model_id", "slug"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    slug: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    hook_name: Mapped[str] = mapped_column(String(128))
    layer: Mapped[int] = mapped_column(Integer)
    n_features: Mapped[int] = mapped_column(Integer)
    sae_config: Mapped[dict | None] = mapped_column(JSON)
    harvest_config: Mapped[dict] = mapped_column(JSON)
    head_metrics: Mapped[dict | None] = mapped_column(JSON, doc="heads sources: every head's "
                                                      "metrics and their controls (migration 0006)")
    status: Mapped[str] = mapped_column(String(16), default=SourceStatus.building)
    progress_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    total_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    version_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Feature(Base):
    __tablename__ = "features"
    __table_args__ = (
        Index("ix_features_source_max", "source_id", "max_act", "idx"),
        Index("ix_features_source_density", "source_id", "frac_active", "idx"),
        {"sqlite_with_rowid": False},
    )

    source_id: Mapped[int] = mapped_column(
        ForeignKey("sources.id", ondelete="CASCADE"), primary_key=True
    )
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    max_act: Mapped[float] = mapped_column(Float)
    min_act: Mapped[float] = mapped_column(Float)
    mean_act: Mapped[float] = mapped_column(Float)
    std_act: Mapped[float] = mapped_column(Float)
    frac_active: Mapped[float] = mapped_column(Float, doc="fraction of tokens with activation > 0")
    n_active: Mapped[int] = mapped_column(BigInteger)
    n_tokens: Mapped[int] = mapped_column(BigInteger)
    histogram: Mapped[list[int]] = mapped_column(JSON, doc="token counts per histogram bin")
    top_logits: Mapped[list] = mapped_column(JSON, doc="[[token_id, value], ...] highest first")
    bottom_logits: Mapped[list] = mapped_column(JSON, doc="[[token_id, value], ...] lowest first")
    top_tokens: Mapped[list] = mapped_column(JSON, doc="[[token_id, count], ...] peak tokens of top examples")


class ExampleGroup(enum.IntEnum):
    """Stored as a small integer; quantile-N is QUANTILE + N. `zero` holds a sample of the
    sequences where the feature never fired (the non-activating examples of scorers)."""

    zero = -1
    top = 0
    bottom = 1
    quantile = 2

    @staticmethod
    def name_of(code: int) -> str:
        if code == ExampleGroup.top:
            return "top"
        if code == ExampleGroup.bottom:
            return "bottom"
        if code == ExampleGroup.zero:
            return "zero"
        return f"quantile-{code - ExampleGroup.quantile}"

    @staticmethod
    def code_of(name: str) -> int:
        if name == "top":
            return ExampleGroup.top
        if name == "bottom":
            return ExampleGroup.bottom
        if name == "zero":
            return ExampleGroup.zero
        if name.startswith("quantile-") and name[9:].isdigit():
            return ExampleGroup.quantile + int(name[9:])
        raise ValueError(f"unknown example group {name!r}")


EXAMPLE_HEAD = np.dtype([("seq_idx", "<i4"), ("start", "<i2"), ("peak_pos", "<i2"),
                         ("peak_value", "<f4")])
"""The head of each example record in `example_blocks.data`: the sequence, the window's start
and the peak's position in the sequence, and the exact peak activation. Little-endian, packed."""


@lru_cache(maxsize=64)
def example_record(window: int) -> np.dtype:
    """One record of `example_blocks.data`: EXAMPLE_HEAD, then the activation at each of the
    `window` tokens of the window as little-endian float16 (`acts`). The harvest's store writes
    these and the server reads them; nothing else spells the layout."""
    if window < 1:
        raise ValueError(f"an example window holds at least one token, not {window}")
    return np.dtype([*EXAMPLE_HEAD.descr, ("acts", "<f2", (window,))])


class ExampleBlock(Base):
    """The examples of one feature in one group (top, bottom, quantile-N), in rank order, as
    `n` packed records of `example_record(window)`: each a window of one sequence around where
    the feature peaked, with its activation at every token.

    One row per group rather than per example: a source of 100,000 features is 700,000 rows
    instead of 6.5 million, and a feature page reads at most a handful of them.

    A rowid table on SQLite (the primary key is a separate index): a WITHOUT ROWID table is a
    b-tree index, whose cells keep only about 1 kB on the page and move the rest of a top
    block (20 records, 2.8 kB) to a mostly empty overflow page."""

    __tablename__ = "example_blocks"

    source_id: Mapped[int] = mapped_column(
        ForeignKey("sources.id", ondelete="CASCADE"), primary_key=True
    )
    feature_idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    group: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    n: Mapped[int] = mapped_column(SmallInteger, doc="how many examples")
    window: Mapped[int] = mapped_column(SmallInteger, doc="tokens per example window")
    data: Mapped[bytes] = mapped_column(LargeBinary, doc="n packed example records")


class StoredExample(NamedTuple):
    """One example of a block, unpacked; acts is its window's float16 LE bytes, tokens (where a
    reader filled it) its sequence's token ids as SEQUENCE_TOKENS bytes."""

    group: int
    rank: int
    seq_idx: int
    start: int
    peak_pos: int
    peak_value: float
    acts: bytes
    tokens: bytes = b""


def unpack_examples(group: int, n: int, window: int, data: bytes) -> list[StoredExample]:
    """The `n` records of an example block, in rank order."""
    heads = _example_heads(window)
    size, head = heads.itemsize, EXAMPLE_HEAD.itemsize
    if len(data) != n * size:
        raise ValueError(f"an example block of {n} records of {size} bytes holds {len(data)} bytes")
    return [StoredExample(group, rank, *h, data[rank * size + head:(rank + 1) * size])
            for rank, h in enumerate(np.frombuffer(data, dtype=heads, count=n).tolist())]


@lru_cache(maxsize=64)
def _example_heads(window: int) -> np.dtype:
    """The head fields of `example_record(window)`, stepping over the acts."""
    return example_record(window)[list(EXAMPLE_HEAD.names)]


class AttentionRows(Base):
    """For a head's first top examples (heads sources only): the attention row of every query
    of the example's window over the window's keys, so that a page shows where each token
    looked. `data`: [window, window] little-endian float16, row i the query at start + i."""

    __tablename__ = "attention_rows"
    __table_args__ = {"sqlite_with_rowid": False}

    source_id: Mapped[int] = mapped_column(
        ForeignKey("sources.id", ondelete="CASCADE"), primary_key=True
    )
    feature_idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(SmallInteger, primary_key=True, doc="the top example's")
    window: Mapped[int] = mapped_column(SmallInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class PeakToken(Base):
    """How many of a feature's top examples peak on a token: `features.top_tokens` indexed by
    token, so a search by token reads a range instead of every feature."""

    __tablename__ = "peak_tokens"
    __table_args__ = {"sqlite_with_rowid": False}

    source_id: Mapped[int] = mapped_column(
        ForeignKey("sources.id", ondelete="CASCADE"), primary_key=True
    )
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    feature_idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    count: Mapped[int] = mapped_column(SmallInteger)


class RelationKind(enum.StrEnum):
    """How two features are related: their output directions' cosine similarity, how often
    they are active on the same tokens (Jaccard), how their activations correlate over all
    tokens (Pearson), or the best match of one source's feature in another source (`match`)."""

    cosine = "cosine"
    jaccard = "jaccard"
    pearson = "pearson"
    match = "match"


MATCH_BEST, MATCH_ONE_TO_ONE, MATCH_CONTROL = 0, 1, 2
"""The ranks of a feature's `match` relations to one compared source: its best match by
activation correlation, its partner in the one-to-one matching of the two sources, and the
control: its best match against the other source's activations on other sequences (what a best
match reaches by chance)."""


class Relation(Base):
    """One entry of a feature's list of related features: (source, feature) -> (other source,
    other feature) with a kind, a rank within its list (0 first) and a value. A list is keyed
    by (source, feature, kind, whether the other source is the same one)."""

    __tablename__ = "relations"
    __table_args__ = (
        Index("ix_relations_other_source", "other_source_id"),
        {"sqlite_with_rowid": False},
    )

    source_id: Mapped[int] = mapped_column(
        ForeignKey("sources.id", ondelete="CASCADE"), primary_key=True)
    feature_idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    other_source_id: Mapped[int] = mapped_column(
        ForeignKey("sources.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    other_idx: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)


class Explanation(Base):
    """A short text saying what a feature responds to, with who or what wrote it: the
    explainer (`tokens`, `local`, `openai`, `human`), its model and its prompt's version.

    Full-text search indexes `text`: an FTS5 table `explanations_fts` kept by triggers on
    SQLite, a GIN index on `to_tsvector('english', text)` on PostgreSQL (migration 0004)."""

    __tablename__ = "explanations"
    __table_args__ = (Index("ix_explanations_feature", "source_id", "feature_idx"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"))
    feature_idx: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    explainer: Mapped[str] = mapped_column(String(32))
    explainer_model: Mapped[str] = mapped_column(String(200), default="",
                                                 doc="empty where no language model wrote it")
    prompt_version: Mapped[str] = mapped_column(String(32), default="")
    author: Mapped[str | None] = mapped_column(String(128))
    tokens_used: Mapped[int | None] = mapped_column(Integer, doc="prompt + completion tokens")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ExplanationScore(Base):
    """How well an explanation predicts where its feature fires, by one scorer (`detection`,
    `fuzzing`, `simulation`) and scorer model, beside its control: the same scorer on the same
    examples with the explanation of another feature."""

    __tablename__ = "explanation_scores"
    __table_args__ = (Index("ix_explanation_scores_explanation", "explanation_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    explanation_id: Mapped[int] = mapped_column(
        ForeignKey("explanations.id", ondelete="CASCADE"))
    scorer: Mapped[str] = mapped_column(String(32))
    scorer_model: Mapped[str] = mapped_column(String(200), default="")
    value: Mapped[float] = mapped_column(Float)
    control: Mapped[float | None] = mapped_column(Float, doc="the score of the control explanation")
    details: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ExplanationVector(Base):
    """An explanation's text embedding (float32 little-endian, unit length), for search by
    meaning; `embedder` names the embedding model."""

    __tablename__ = "explanation_vectors"
    __table_args__ = {"sqlite_with_rowid": False}

    explanation_id: Mapped[int] = mapped_column(
        ForeignKey("explanations.id", ondelete="CASCADE"), primary_key=True)
    embedder: Mapped[str] = mapped_column(String(100))
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class ExplanationsVersion(Base):
    """One row (id 1) whose `version` triggers move on every write to explanations, their
    scores and their vectors (migration 0004): pages that show explanations carry it in their
    ETag, and the server's search index and scorer judgements reload when it moves."""

    __tablename__ = "explanations_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class ApiKey(Base):
    """An API key with its scope (`read`, `live`, `write` or `admin`, each including the ones
    before it), stored as the sha256 of the key: the key itself is shown once, when made."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    scope: Mapped[str] = mapped_column(String(16))
    prefix: Mapped[str] = mapped_column(String(16), doc="the key's first characters, to tell "
                                        "keys apart in listings")
    digest: Mapped[str] = mapped_column(String(64), unique=True, doc="sha256 of the key, hex")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class FeatureList(Base):
    """A named, shareable list of features (`/lists/{id}`); `key_id` is the key that made it
    (null when made without one), which with an admin key may change it."""

    __tablename__ = "lists"
    __table_args__ = (Index("ix_lists_created_at", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, doc="random, URL-safe")
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ListFeature(Base):
    """A feature on a list, with a note. Features are named by model, source and index (not by
    row ids), so a list outlives a source harvested again."""

    __tablename__ = "list_features"

    list_id: Mapped[str] = mapped_column(ForeignKey("lists.id", ondelete="CASCADE"),
                                         primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    source: Mapped[str] = mapped_column(String(128), primary_key=True)
    feature_idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, doc="order of addition, from 0")
    note: Mapped[str] = mapped_column(Text, default="")
    added_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
