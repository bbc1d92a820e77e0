"""Search explanations by meaning: a hybrid of full-text search (FTS5 bm25 on SQLite, ts_rank of
`websearch_to_tsquery` on PostgreSQL) and embedding similarity, fused by reciprocal rank.

The embeddings of the stored explanations are held in memory (`VectorIndex`, one float32
matrix) and brought up to date when the explanations version moves: only the vectors added
since are read. Without the embedding model (`app.embedding`) search is text-only and says so;
then explanations with all the query's words come first and those with some of them after.

A result is a feature: the best-ranked of its explanations stands for it."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Row
from sqlalchemy.orm import Session

from app import embedding
from app.db import explanations as db

RRF_K = 60
"""The k of reciprocal-rank fusion: a list's item at rank r (from 1) adds 1 / (k + r)."""
CANDIDATES = 200
"""How many explanations each list (full text, meaning) contributes to the fusion."""
PAGE = 20
MIN_SIMILARITY = 0.25
"""Explanations less similar than this to the query are left out of the meaning list. With the
embedding model of `app.embedding`, related phrase pairs measured 0.3 to 1.0 and unrelated ones
at most 0.22 (tests/test_embedding.py has some)."""


EXACT_UP_TO = 20_000
"""Up to this many vectors the meaning list compares the query with each of them in full;
beyond, a first pass over their first COARSE_DIM dimensions picks COARSE_KEEP candidates that
are compared in full. (The embedding model is trained so that its leading dimensions are an
embedding of their own: on 100,000 phrases of Python's documentation, 98.3% of the full
comparison's top 20 were found, for a quarter of the memory read: bench/explain_search.py.)"""
COARSE_DIM = 64
COARSE_KEEP = 2000


@dataclass(frozen=True)
class _Vectors:
    ids: np.ndarray  # int64 [n], ascending
    sources: np.ndarray  # int64 [n]
    matrix: np.ndarray  # float32 [n, DIM], unit rows
    coarse: np.ndarray  # float32 [n, COARSE_DIM]: the leading dimensions, unit rows


def _vectors(ids: np.ndarray, sources: np.ndarray, matrix: np.ndarray) -> _Vectors:
    coarse = np.ascontiguousarray(matrix[:, :COARSE_DIM])
    norms = np.linalg.norm(coarse, axis=1, keepdims=True)
    np.divide(coarse, norms, out=coarse, where=norms > 0)
    return _Vectors(ids, sources, matrix, coarse)


def _dot(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """matrix @ vector in numpy's own single-threaded loop: for one query vector it is as fast
    as BLAS and leaves no BLAS threads spinning on the server's cores."""
    return np.einsum("ij,j->i", matrix, vector)


_EMPTY = _vectors(np.zeros(0, np.int64), np.zeros(0, np.int64),
                  np.zeros((0, embedding.DIM), np.float32))


class VectorIndex:
    """The stored vectors of one embedder, in memory; `refresh` reads what changed."""

    def __init__(self, embedder: str, *, exact_up_to: int = EXACT_UP_TO) -> None:
        self.embedder = embedder
        self.exact_up_to = exact_up_to
        self._lock = threading.Lock()
        self._version: int | None = None
        self._data = _EMPTY

    @classmethod
    def of(cls, ids: np.ndarray, sources: np.ndarray, matrix: np.ndarray, *,
           exact_up_to: int = EXACT_UP_TO) -> VectorIndex:
        """An index of given vectors (ids ascending, unit rows), apart from any database."""
        index = cls("", exact_up_to=exact_up_to)
        index._data = _vectors(np.asarray(ids, np.int64), np.asarray(sources, np.int64),
                               np.ascontiguousarray(matrix, dtype=np.float32))
        return index

    def __len__(self) -> int:
        return len(self._data.ids)

    def refresh(self, session: Session, version: int) -> None:
        """Bring the index to the database's vectors when the explanations version moved:
        drop the vectors that are gone, read the new ones."""
        if self._version == version:
            return
        with self._lock:
            if self._version == version:
                return
            data = self._data
            stored = np.asarray(db.vector_ids(session, embedder=self.embedder), dtype=np.int64)
            stored.sort()
            keep = np.isin(data.ids, stored)
            new = np.setdiff1d(stored, data.ids[keep], assume_unique=True)
            ids, sources, blobs = [data.ids[keep]], [data.sources[keep]], [data.matrix[keep]]
            for rows in self._read(session, new, whole=len(new) > len(stored) // 2):
                ids.append(np.array([r.explanation_id for r in rows], np.int64))
                sources.append(np.array([r.source_id for r in rows], np.int64))
                blobs.append(np.frombuffer(b"".join(r.vector for r in rows), embedding.VECTOR)
                             .reshape(len(rows), -1).astype(np.float32))
            all_ids = np.concatenate(ids)
            order = np.argsort(all_ids, kind="stable")
            self._data = _vectors(all_ids[order], np.concatenate(sources)[order],
                                  np.ascontiguousarray(np.concatenate(blobs)[order]))
            self._version = version

    def _read(self, session: Session, new: np.ndarray, *, whole: bool):
        """The rows of the vectors with these ids, in chunks: by id lists, or (whole) by
        reading the table a page at a time, which is quicker when most of it is new."""
        if not whole:
            for start in range(0, len(new), 5000):
                yield db.vectors_of(session, embedder=self.embedder,
                                    ids=new[start:start + 5000].tolist())
            return
        wanted, after = set(new.tolist()), 0
        while rows := db.vectors_after(session, embedder=self.embedder, after=after):
            after = rows[-1].explanation_id
            yield [r for r in rows if r.explanation_id in wanted]

    def nearest(self, query: np.ndarray, *, source_ids: Sequence[int] | None, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, cosines) of the k vectors nearest the unit vector `query` among these
        sources (None: all), most similar first (ties by id); over `exact_up_to` vectors, the
        nearest of the COARSE_KEEP candidates of a first pass on the leading dimensions."""
        data = self._data
        if not len(data.ids):
            return data.ids, np.zeros(0, np.float32)
        query = query.astype(np.float32, copy=False)
        excluded = None if source_ids is None else ~np.isin(
            data.sources, np.asarray(list(source_ids), np.int64))
        if len(data.ids) > self.exact_up_to:
            head = query[:COARSE_DIM]
            first = _dot(data.coarse, head / max(float(np.linalg.norm(head)), 1e-12))
            if excluded is not None:
                first[excluded] = -np.inf
            keep = max(COARSE_KEEP, k)
            rows = np.argpartition(first, -keep)[-keep:] if len(first) > keep else \
                np.arange(len(first))
            rows = rows[np.isfinite(first[rows])]
            sims = _dot(data.matrix[rows], query)
        else:
            sims = _dot(data.matrix, query)
            if excluded is not None:
                sims[excluded] = -np.inf
            rows = np.arange(len(sims))
        best = np.argpartition(sims, -k)[-k:] if len(sims) > k else np.arange(len(sims))
        best = best[np.isfinite(sims[best])]
        best = best[np.lexsort((data.ids[rows[best]], -sims[best]))]
        return data.ids[rows[best]], sims[best]


class SearchIndex:
    """Per server: the embedding model (loaded at the first search, or why it is missing)
    and the vector index of its stored vectors."""

    def __init__(self, *, use_embedder: bool = True) -> None:
        self._use = use_embedder
        self._lock = threading.Lock()
        self._embedder: embedding.Embedder | None = None
        self._missing: str | None = None if use_embedder else "search by meaning is off"
        self.vectors = VectorIndex(embedding.EMBEDDER)
        self._counts: dict[tuple, tuple[int, int]] = {}

    def embedder(self) -> embedding.Embedder | None:
        if self._embedder is None and self._missing is None:
            with self._lock:
                if self._embedder is None and self._missing is None:
                    try:
                        self._embedder = embedding.load_embedder()
                    except embedding.EmbedderMissing as exc:
                        self._missing = str(exc)
        return self._embedder

    @property
    def missing(self) -> str | None:
        """Why search is text-only, when it is."""
        self.embedder()
        return self._missing

    def counts(self, session: Session, *, source_ids: Sequence[int] | None
               ) -> tuple[int, int]:
        """(explanations, of which with a stored vector) among these sources (None: all),
        counted once per explanations version."""
        version = db.version(session)
        key = (version, None if source_ids is None else tuple(sorted(source_ids)))
        found = self._counts.get(key)
        if found is None:
            found = db.counts(session, source_ids=source_ids, embedder=self.vectors.embedder)
            with self._lock:
                if len(self._counts) > 256 or any(k[0] != version for k in self._counts):
                    self._counts.clear()
                self._counts[key] = found
        return found


@dataclass
class Hit:
    row: Row
    score: float
    text_rank: int | None
    meaning_rank: int | None
    similarity: float | None


@dataclass
class Found:
    hits: list[Hit]
    more: bool
    mode: str
    note: str | None


def fuse(text_ids: Sequence[int], meaning_ids: Sequence[int]) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion of two ranked lists of ids: (id, sum of 1 / (RRF_K + rank)),
    best first; ties go to the better full-text rank, then the better meaning rank, then the
    smaller id."""
    text_rank = {i: r for r, i in enumerate(text_ids, 1)}
    meaning_rank = {i: r for r, i in enumerate(meaning_ids, 1)}
    none = len(text_ids) + len(meaning_ids) + 1
    scores = {i: sum(1 / (RRF_K + ranks[i]) for ranks in (text_rank, meaning_rank)
                     if i in ranks) for i in {*text_rank, *meaning_rank}}
    return sorted(scores.items(), key=lambda kv: (
        -kv[1], text_rank.get(kv[0], none), meaning_rank.get(kv[0], none), kv[0]))


def search(session: Session, index: SearchIndex, *, query: str,
           source_ids: Sequence[int] | None, offset: int = 0, limit: int = PAGE) -> Found:
    """The features whose explanations match the query, best first, one per feature, from
    `offset`; `source_ids` None searches every source."""
    version = db.version(session)
    text_ids = db.text_matches(session, query=query, source_ids=source_ids, limit=CANDIDATES)
    meaning_ids, sims = [], {}
    embedder = index.embedder()
    note = index.missing
    if embedder is not None:
        index.vectors.refresh(session, version)
        if not len(index.vectors):
            note = ("search by meaning found no stored embedding: run "
                    "`featurescope embed-explanations`; explanations are searched by their "
                    "words only")
        else:
            q = embedder.embed([query])[0]
            if q.any():
                ids, cos = index.vectors.nearest(q, source_ids=source_ids, k=CANDIDATES)
                close = cos >= MIN_SIMILARITY
                ids, cos = ids[close], cos[close]
                meaning_ids = ids.tolist()
                sims = dict(zip(meaning_ids, cos.tolist(), strict=True))
    mode = "hybrid" if embedder is not None and len(index.vectors) else "text"
    if mode == "text" and len(text_ids) < CANDIDATES and len(db.wanted_words(query)) > 1:
        seen = set(text_ids)
        text_ids += [i for i in db.text_matches(session, query=query, source_ids=source_ids,
                                                any_word=True, limit=CANDIDATES)
                     if i not in seen][:CANDIDATES - len(text_ids)]
    ranked = fuse(text_ids, meaning_ids)
    fused, scores = [i for i, _ in ranked], dict(ranked)
    text_rank = {i: r for r, i in enumerate(text_ids, 1)}
    meaning_rank = {i: r for r, i in enumerate(meaning_ids, 1)}
    # Read the rows of the fused list a chunk at a time, until the page and one more feature
    # are there: one result per feature, the best-ranked of its explanations.
    wanted, seen_features, hits, start = offset + limit + 1, set(), [], 0
    while len(hits) < wanted and start < len(fused):
        chunk = fused[start:start + max(2 * wanted, 40)]
        start += len(chunk)
        rows = {r.id: r for r in db.hits(session, ids=chunk)}
        for i in chunk:
            row = rows.get(i)
            if row is None or (row.source_id, row.feature_idx) in seen_features:
                continue
            seen_features.add((row.source_id, row.feature_idx))
            hits.append(Hit(row, scores[i], text_rank.get(i), meaning_rank.get(i), sims.get(i)))
    return Found(hits[offset:offset + limit], len(hits) > offset + limit, mode, note)
