"""Read queries of the explorer: SQLAlchemy 2.0 `select()` on sync sessions.

Functions take the session first and keyword-only arguments, return plain rows, and cap the
rows they read. Nothing here imports torch or `workers`.
"""

from __future__ import annotations

import json
import math
import random
import struct
import threading
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np
from sqlalchemy import Row, bindparam, select, tuple_
from sqlalchemy.orm import Session

from app.db.tables import (
    SEQUENCE_TOKENS,
    AttentionRows,
    Dataset,
    ExampleBlock,
    ExampleGroup,
    Feature,
    Model,
    PeakToken,
    Sequence,
    Source,
    StoredExample,
    Vocabulary,
    unpack_examples,
)

MAX_ROWS = 500
"""The most rows one page of a list reads."""
PAGE_SIZE = 100
"""The rows of one page of a list whose URL names no limit."""
MAX_SOURCES = 2000

SORT_COLUMNS = {"index": Feature.idx, "max_act": Feature.max_act,
                "frac_active": Feature.frac_active}


def default_order(sort: str) -> str:
    """The order of a feature list whose URL names none: by index ascending, by a measure
    highest first."""
    return "asc" if sort == "index" else "desc"


_SOURCE_COLUMNS = (
    Source.id, Source.slug, Source.kind, Source.hook_name, Source.layer, Source.n_features,
    Source.status, Source.progress_tokens, Source.total_tokens, Source.error,
    Source.version_hash, Source.model_id, Source.dataset_id,
    Dataset.slug.label("dataset_slug"), Dataset.bos_policy.label("bos_policy"),
)


def models(session: Session) -> Seq[Row]:
    return session.execute(select(Model).order_by(Model.slug).limit(MAX_SOURCES)).scalars().all()


def model_by_slug(session: Session, *, slug: str) -> Model | None:
    return session.scalar(select(Model).where(Model.slug == slug))


def sources(session: Session, *, model_id: int | None = None) -> Seq[Row]:
    """Sources with their dataset slug, by model, layer and slug; all models' when model_id is None."""
    q = (select(*_SOURCE_COLUMNS).join(Dataset, Dataset.id == Source.dataset_id)
         .order_by(Source.model_id, Source.layer, Source.slug).limit(MAX_SOURCES))
    if model_id is not None:
        q = q.where(Source.model_id == model_id)
    return session.execute(q).all()


# The statements of the feature page are built once: it is the page that must be fast.
_SOURCE_BY_SLUG = (
    select(*_SOURCE_COLUMNS, Source.sae_config, Source.harvest_config, Source.created_at,
           Source.finished_at, Model.slug.label("model_slug"),
           Model.tokenizer_hash.label("tokenizer_hash"))
    .join(Model, Model.id == Source.model_id)
    .join(Dataset, Dataset.id == Source.dataset_id)
    .where(Model.slug == bindparam("model"), Source.slug == bindparam("source")))
_FEATURE = select(Feature.__table__).where(Feature.source_id == bindparam("source_id"),
                                           Feature.idx == bindparam("index"))
_BLOCKS = (
    select(ExampleBlock.group, ExampleBlock.n, ExampleBlock.window, ExampleBlock.data)
    .where(ExampleBlock.source_id == bindparam("source_id"),
           ExampleBlock.feature_idx == bindparam("index"))
    .order_by(ExampleBlock.group).limit(MAX_ROWS))
_SHOWN_BLOCKS = _BLOCKS.where(ExampleBlock.group >= 0)  # `zero` (-1) is for scorers only
_SEQUENCES = select(Sequence.idx, Sequence.tokens).where(
    Sequence.dataset_id == bindparam("dataset_id"),
    Sequence.idx.in_(bindparam("seqs", expanding=True)))


def source_by_slug(session: Session, *, model: str, source: str) -> Row | None:
    """One source with what its pages need of its model and dataset, or None."""
    return session.connection().execute(
        _SOURCE_BY_SLUG, {"model": model, "source": source}).first()


def head_metrics(session: Session, *, source_id: int) -> dict | None:
    """A heads source's metrics JSON (workers/head_metrics.py), or None."""
    return session.scalar(select(Source.head_metrics).where(Source.id == source_id))


def attention_rows(session: Session, *, source_id: int, index: int) -> dict[int, list[Seq[float]]]:
    """A head's stored attention rows by top-example rank: per window token, its query's
    weights on the window's keys (decoded as decode_acts decodes)."""
    out = {}
    for rank, window, data in session.execute(
            select(AttentionRows.rank, AttentionRows.window, AttentionRows.data).where(
                AttentionRows.source_id == source_id, AttentionRows.feature_idx == index)):
        flat = decode_acts(data, window * window)
        out[rank] = [flat[i * window:(i + 1) * window] for i in range(window)]
    return out


def dataset(session: Session, *, dataset_id: int) -> Dataset | None:
    return session.get(Dataset, dataset_id)


def feature(session: Session, *, source_id: int, index: int) -> Row | None:
    return session.connection().execute(
        _FEATURE, {"source_id": source_id, "index": index}).first()


def examples(session: Session, *, source_id: int, dataset_id: int, index: int,
             with_zero: bool = False) -> list[StoredExample]:
    """The examples of one feature with the token blob of their sequence, by group and rank:
    those pages show, and with `with_zero` the non-activating ones too."""
    conn = session.connection()
    blocks = _BLOCKS if with_zero else _SHOWN_BLOCKS
    stored = [ex for b in conn.execute(blocks, {"source_id": source_id, "index": index})
              for ex in unpack_examples(b.group, b.n, b.window, b.data)]
    if not stored:
        return []
    seqs = dict(conn.execute(_SEQUENCES, {"dataset_id": dataset_id,
                                          "seqs": sorted({e.seq_idx for e in stored})}).all())
    return [e._replace(tokens=seqs[e.seq_idx]) for e in stored if e.seq_idx in seqs]


def features_page(session: Session, *, source_id: int, sort: str, desc: bool,
                  after: tuple[float, int] | None, limit: int, within=None) -> Seq[Row]:
    """One keyset page of a source's features, ordered by (sort column, index), both ascending
    or both descending so that the (source_id, column) index serves the seek. `after` is the
    (value, index) of the last row of the previous page; `within`, a subquery of the feature
    indices to keep (None: all)."""
    col = SORT_COLUMNS[sort]
    limit = max(1, min(limit, MAX_ROWS))
    q = select(Feature.idx, Feature.max_act, Feature.frac_active, Feature.top_tokens).where(
        Feature.source_id == source_id)
    if within is not None:
        q = q.where(Feature.idx.in_(within))
    if after is not None:
        if sort == "index":
            q = q.where(Feature.idx < after[1] if desc else Feature.idx > after[1])
        else:
            key, last = tuple_(col, Feature.idx), tuple_(after[0], after[1])
            q = q.where(key < last if desc else key > last)
    order = [col.desc(), Feature.idx.desc()] if desc else [col.asc(), Feature.idx.asc()]
    if sort == "index":
        order = order[1:]
    return session.execute(q.order_by(*order).limit(limit)).all()


def peak_token_features(session: Session, *, source_ids: Seq[int], token_ids: Seq[int],
                        limit: int) -> Seq[Row]:
    """Features whose top examples peak on one of the tokens: (source_id, feature_idx, token_id,
    count, max_act, frac_active), by count, then max activation, highest first."""
    if not source_ids or not token_ids:
        return []
    q = (select(PeakToken.source_id, PeakToken.feature_idx, PeakToken.token_id, PeakToken.count,
                Feature.max_act, Feature.frac_active)
         .join(Feature, (Feature.source_id == PeakToken.source_id)
               & (Feature.idx == PeakToken.feature_idx))
         .where(PeakToken.source_id.in_(list(source_ids)),
                PeakToken.token_id.in_(list(token_ids)))
         .order_by(PeakToken.count.desc(), Feature.max_act.desc(), PeakToken.source_id,
                   PeakToken.feature_idx)
         .limit(min(limit, MAX_ROWS)))
    return session.execute(q).all()


def top_counts(session: Session, *, source_id: int, indices: Seq[int]) -> dict[int, int]:
    """How many top examples each of these features has."""
    if not indices:
        return {}
    q = (select(ExampleBlock.feature_idx, ExampleBlock.n)
         .where(ExampleBlock.source_id == source_id, ExampleBlock.group == ExampleGroup.top,
                ExampleBlock.feature_idx.in_(list(indices))))
    return dict(session.execute(q).all())


def max_acts(session: Session, *, source_id: int, indices: Seq[int]) -> dict[int, float]:
    if not indices:
        return {}
    q = select(Feature.idx, Feature.max_act).where(Feature.source_id == source_id,
                                                   Feature.idx.in_(list(indices)))
    return dict(session.execute(q).all())


def feature_stats(session: Session, *, source_id: int, indices: Seq[int]
                  ) -> dict[int, tuple[float, float]]:
    """(max_act, frac_active) of each of these features of a source (read MAX_ROWS at a
    time)."""
    wanted, out = sorted(set(indices)), {}
    for i in range(0, len(wanted), MAX_ROWS):
        q = (select(Feature.idx, Feature.max_act, Feature.frac_active)
             .where(Feature.source_id == source_id, Feature.idx.in_(wanted[i:i + MAX_ROWS])))
        out.update({idx: (mx, frac) for idx, mx, frac in session.execute(q)})
    return out


def random_index(session: Session, *, source_id: int, n_features: int,
                 rng: random.Random | None = None) -> int | None:
    """A random feature that fired somewhere (max_act > 0), or any feature if none did."""
    if n_features <= 0:
        return None
    start = (rng or random).randrange(n_features)
    base = select(Feature.idx).where(Feature.source_id == source_id)
    for q in (base.where(Feature.idx >= start, Feature.max_act > 0).order_by(Feature.idx),
              base.where(Feature.idx < start, Feature.max_act > 0).order_by(Feature.idx),
              base.order_by(Feature.idx)):
        idx = session.scalar(q.limit(1))
        if idx is not None:
            return idx
    return None


# ------------------------------------------------------------------ stored blobs


def shortest_decimal(value: float, fmt: str = "<e") -> str:
    """The shortest decimal that reads back to the same float16 ('<e') or float32 ('<f')."""
    if not math.isfinite(value):
        return repr(value)
    packed = struct.pack(fmt, value)
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        try:
            if struct.pack(fmt, float(text)) == packed:
                return text
        except OverflowError:
            continue
    return repr(value)


_HALVES: list[float] = []


def half_table() -> list[float]:
    """Every float16 bit pattern as the float of its shortest decimal (built once, ~0.2 s)."""
    if not _HALVES:
        codes = struct.pack("<65536H", *range(65536))
        table = [float(shortest_decimal(v)) if math.isfinite(v) else v
                 for v in struct.unpack("<65536e", codes)]
        _HALVES[:] = table
    return _HALVES


def decode_acts(blob: bytes, n: int) -> Seq[float]:
    """The first n float16 LE activations of a blob, each as the shortest decimal that reads
    back to the stored float16 (what the JSON carries and the page shows)."""
    table = half_table()
    codes = struct.unpack_from(f"<{n}H", blob)
    return itemgetter(*codes)(table) if n > 1 else [table[c] for c in codes]


_HALF_JSON: list[bytes] = []


def half_json_table() -> list[bytes]:
    """Every float16 bit pattern as the JSON text (UTF-8) of its shortest decimal, null for inf
    and NaN as pydantic writes them: a window of activations is then written by one join."""
    if not _HALF_JSON:
        _HALF_JSON[:] = [repr(v).encode() if math.isfinite(v) else b"null" for v in half_table()]
    return _HALF_JSON


def acts_json(blob: bytes, n: int) -> bytes:
    """The first n float16 LE activations of a blob as the items of a JSON array (no brackets)
    of their shortest decimals: what `json.dumps(decode_acts(blob, n))` writes, without making
    a float per value."""
    if n <= 0:
        return b""
    table = half_json_table()
    codes = struct.unpack_from(f"<{n}H", blob)
    return b",".join(itemgetter(*codes)(table)) if n > 1 else table[codes[0]]


def decode_tokens(blob: bytes, start: int, n: int) -> Seq[int]:
    """Token ids start .. start+n of a sequence blob (SEQUENCE_TOKENS)."""
    return np.frombuffer(blob, SEQUENCE_TOKENS, n, start * SEQUENCE_TOKENS.itemsize).tolist()


@dataclass(frozen=True)
class Vocab:
    """The display text of every token id of a model; ids out of range read ''."""

    texts: list[str]
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    def text(self, token_id: int) -> str:
        return self.texts[token_id] if 0 <= token_id < len(self.texts) else ""

    def many(self, ids: Seq[int]) -> Seq[str]:
        """The texts of many ids (token ids are never negative)."""
        if len(ids) < 2:
            return [self.text(i) for i in ids]
        try:
            return itemgetter(*ids)(self.texts)
        except IndexError:
            return [self.text(i) for i in ids]

    def json_items(self, ids: Seq[int]) -> tuple[bytes, bytes]:
        """(ids, texts) of many token ids as the items of two JSON arrays, without brackets,
        from the UTF-8 JSON text of each id and token made once per vocabulary."""
        if not ids:
            return b"", b""
        texts = self.derived("json", json_string)
        numbers = self.derived("ids", None)
        try:
            if len(ids) > 1:
                get = itemgetter(*ids)
                return b",".join(get(numbers)), b",".join(get(texts))
            return numbers[ids[0]], texts[ids[0]]
        except IndexError:
            return (b",".join(str(i).encode() for i in ids),
                    b",".join(texts[i] if 0 <= i < len(texts) else b'""' for i in ids))

    def ids_of(self, text: str) -> list[int]:
        """Every token id whose display text is exactly `text`."""
        index = self._derived.get("index")
        if index is None:
            index = {}
            for i, t in enumerate(self.texts):
                index.setdefault(t, []).append(i)
            self._derived["index"] = index
        return index.get(text, [])

    def derived(self, name: str, fn: Callable[[str], object] | None) -> list:
        """fn applied to every token text, computed once (e.g. the display form of tokens);
        fn None: the decimal text (UTF-8) of every token id."""
        table = self._derived.get(name)
        if table is None:
            table = self._derived[name] = (
                [str(i).encode() for i in range(len(self.texts))] if fn is None
                else [fn(t) for t in self.texts])
        return table


def json_string(text: str) -> bytes:
    """A string as JSON text in UTF-8, non-ASCII kept as is (like pydantic); one with lone
    surrogates, which UTF-8 cannot carry, with \\u escapes."""
    try:
        return json.dumps(text, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(text).encode()


class VocabCache:
    """Token display strings per model, read once per (model id, tokenizer hash) and kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vocabs: dict[tuple[int, str], Vocab] = {}

    def get(self, session: Session, *, model_id: int, tokenizer_hash: str) -> Vocab:
        key = (model_id, tokenizer_hash)
        vocab = self._vocabs.get(key)
        if vocab is None:
            with self._lock:
                vocab = self._vocabs.get(key)
                if vocab is None:
                    texts = session.scalar(
                        select(Vocabulary.tokens).where(Vocabulary.model_id == model_id))
                    vocab = self._vocabs[key] = Vocab(list(texts or []))
        return vocab
