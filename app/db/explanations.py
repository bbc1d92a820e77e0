"""Read queries of explanations, their scores and vectors, and full-text search over their text.

Like `app.db.queries`: the session first, keyword-only arguments, plain rows, a cap on rows.
Full-text search is FTS5 (bm25) on SQLite and `to_tsvector('english', text)` with
`websearch_to_tsquery` and `ts_rank` on PostgreSQL, spelled like the GIN index of migration
0004 so that the index serves it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence as Seq

from sqlalchemy import Row, bindparam, column, func, select, table
from sqlalchemy.orm import Session

from app.db.tables import (
    Explanation,
    ExplanationScore,
    ExplanationsVersion,
    ExplanationVector,
    Feature,
    Model,
    Source,
)

MAX_EXPLANATIONS = 100
"""The most explanations read for one feature."""
MAX_MATCHES = 1000
"""The most full-text matches one search returns."""
RANK_BUDGET = 2000
"""The most matches one full-text search ranks (bm25 or ts_rank cost a few microseconds per
row): where more explanations have the words, the best of the first RANK_BUDGET are returned."""
TS_CONFIG = "english"
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she
her hers herself it its itself they them their theirs themselves what which who whom this that
these those am is are was were be been being have has had having do does did doing a an the and
but if or because as until while of at by for with about against between into through during
before after above below to from up down in out on off over under again further then once here
there when where why how all any both each few more most other some such no nor not only own
same so than too very s t can will just don should now""".split())
"""PostgreSQL's English stop words (tsearch_data/english.stop), which websearch_to_tsquery
leaves out; SQLite's searches leave them out of unquoted terms too."""
_FTS = table("explanations_fts", column("rowid"), column("explanations_fts"))
"""SQLite's FTS5 index of explanations.text (migration 0004); rowid is the explanation's id."""


# The statements of the feature page are built once: it is the page that must be fast.
_VERSION = select(ExplanationsVersion.version).where(ExplanationsVersion.id == 1)
_OF_FEATURE = (select(Explanation.__table__)
               .where(Explanation.source_id == bindparam("source_id"),
                      Explanation.feature_idx == bindparam("index"))
               .order_by(Explanation.id).limit(MAX_EXPLANATIONS))


def version(session: Session) -> int:
    """The counter that every write to explanations, scores or vectors moves (migration 0004)."""
    return session.connection().execute(_VERSION).scalar() or 0


def of_features(session: Session, *, source_id: int, indices: Seq[int]) -> Seq[Row]:
    """The explanations of some features of a source, by feature, oldest first (at most
    MAX_EXPLANATIONS per feature asked for)."""
    if not indices:
        return []
    conn = session.connection()
    if len(indices) == 1:
        return conn.execute(_OF_FEATURE, {"source_id": source_id, "index": indices[0]}).all()
    q = (select(Explanation.__table__).where(Explanation.source_id == source_id,
                                             Explanation.feature_idx.in_(list(indices)))
         .order_by(Explanation.feature_idx, Explanation.id)
         .limit(MAX_EXPLANATIONS * len(indices)))
    return conn.execute(q).all()


def scores_of(session: Session, *, explanation_ids: Seq[int]) -> Seq[Row]:
    """The scores of these explanations, oldest first."""
    if not explanation_ids:
        return []
    q = (select(ExplanationScore.__table__)
         .where(ExplanationScore.explanation_id.in_(list(explanation_ids)))
         .order_by(ExplanationScore.explanation_id, ExplanationScore.id)
         .limit(20 * MAX_EXPLANATIONS * max(1, len(explanation_ids))))
    return session.connection().execute(q).all()


def control_sums(session: Session, *, source_id: int) -> Seq[Row]:
    """Per (scorer, scorer model), over the scores of a source's explanations that have a
    control: n, the sums of value, control, their difference and its square."""
    diff = ExplanationScore.value - ExplanationScore.control
    q = (select(ExplanationScore.scorer, ExplanationScore.scorer_model,
                func.count().label("n"), func.sum(ExplanationScore.value).label("sum_value"),
                func.sum(ExplanationScore.control).label("sum_control"),
                func.sum(diff).label("sum_diff"), func.sum(diff * diff).label("sum_diff2"))
         .join(Explanation, Explanation.id == ExplanationScore.explanation_id)
         .where(Explanation.source_id == source_id, ExplanationScore.control.is_not(None))
         .group_by(ExplanationScore.scorer, ExplanationScore.scorer_model)
         .order_by(ExplanationScore.scorer, ExplanationScore.scorer_model))
    return session.execute(q).all()


def hits(session: Session, *, ids: Seq[int]) -> Seq[Row]:
    """What a search result shows of each explanation: its text and authorship, its feature's
    model, source and statistics."""
    if not ids:
        return []
    q = (select(Explanation.id, Explanation.source_id, Explanation.feature_idx, Explanation.text,
                Explanation.explainer, Explanation.explainer_model, Explanation.author,
                Explanation.created_at, Source.slug.label("source"),
                Source.hook_name, Model.slug.label("model"), Feature.max_act,
                Feature.frac_active)
         .join(Source, Source.id == Explanation.source_id)
         .join(Model, Model.id == Source.model_id)
         .outerjoin(Feature, (Feature.source_id == Explanation.source_id)
                    & (Feature.idx == Explanation.feature_idx))
         .where(Explanation.id.in_(list(ids))).limit(len(ids)))
    return session.execute(q).all()


def vectors_after(session: Session, *, embedder: str, after: int, limit: int = 20_000
                  ) -> Seq[Row]:
    """(explanation id, source id, vector) of the stored vectors of one embedder whose id is
    above `after`, by id: the whole table a page at a time."""
    q = (select(ExplanationVector.explanation_id, Explanation.source_id,
                ExplanationVector.vector)
         .join(Explanation, Explanation.id == ExplanationVector.explanation_id)
         .where(ExplanationVector.embedder == embedder,
                ExplanationVector.explanation_id > after)
         .order_by(ExplanationVector.explanation_id).limit(limit))
    return session.execute(q).all()


def vectors_of(session: Session, *, embedder: str, ids: Seq[int]) -> Seq[Row]:
    """(explanation id, source id, vector) of these explanations' vectors of one embedder."""
    if not ids:
        return []
    q = (select(ExplanationVector.explanation_id, Explanation.source_id,
                ExplanationVector.vector)
         .join(Explanation, Explanation.id == ExplanationVector.explanation_id)
         .where(ExplanationVector.embedder == embedder,
                ExplanationVector.explanation_id.in_(list(ids)))
         .limit(len(ids)))
    return session.execute(q).all()


def vector_ids(session: Session, *, embedder: str) -> list[int]:
    """The ids of the explanations that have a vector of this embedder."""
    return list(session.scalars(select(ExplanationVector.explanation_id)
                                .where(ExplanationVector.embedder == embedder)))


def counts(session: Session, *, source_ids: Seq[int] | None, embedder: str) -> tuple[int, int]:
    """(explanations, of which with a vector of this embedder) of these sources (None: all)."""
    if source_ids is not None and not source_ids:
        return 0, 0
    q = (select(func.count(Explanation.id), func.count(ExplanationVector.explanation_id))
         .outerjoin(ExplanationVector, (ExplanationVector.explanation_id == Explanation.id)
                    & (ExplanationVector.embedder == embedder)))
    if source_ids is not None:
        q = q.where(Explanation.source_id.in_(list(source_ids)))
    n, with_vector = session.execute(q).one()
    return n, with_vector


# ------------------------------------------------------------------ full-text search

_TERM = re.compile(r'"([^"]*)"?|(\S+)')
_WORD = re.compile(r"\w+")


def _parse(query: str) -> list[tuple[list[list[str]], list[list[str]]]]:
    """A web-search query as groups joined by `or`, each (wanted, excluded) phrases of words:
    words, "quoted phrases", -excluded; a term like a-b is the phrase of its words. Unquoted
    stop words are left out."""
    groups: list[tuple[list[list[str]], list[list[str]]]] = [([], [])]
    for m in _TERM.finditer(query):
        phrase, bare = m.group(1), m.group(2)
        if bare is not None and bare.lower() == "or":
            groups.append(([], []))
            continue
        negative = bare is not None and bare.startswith("-") and len(bare) > 1
        words = _WORD.findall(phrase if phrase is not None else bare)
        if words and (phrase is not None or not all(w.lower() in STOPWORDS for w in words)):
            groups[-1][1 if negative else 0].append(words)
    return [g for g in groups if g[0]]


def wanted_words(query: str) -> list[str]:
    """The words a query looks for (not those it excludes), each once, in order."""
    return list(dict.fromkeys(w for pos, _ in _parse(query) for p in pos for w in p))


def fts5_query(query: str, *, any_word: bool = False) -> str | None:
    """A web-search query as an FTS5 query, every word a quoted string so that no input is
    FTS5 syntax; `any_word`: any of its wanted words instead. None when it names no word."""
    if any_word:
        return " OR ".join(f'"{w}"' for w in wanted_words(query)) or None

    def quoted(words: list[str]) -> str:
        return '"' + " ".join(words) + '"'

    parts = ["(" + " AND ".join(quoted(p) for p in pos)
             + "".join(f" NOT {quoted(n)}" for n in neg) + ")" for pos, neg in _parse(query)]
    return " OR ".join(parts) or None


def text_matches(session: Session, *, query: str, source_ids: Seq[int] | None,
                 any_word: bool = False, limit: int = MAX_MATCHES) -> list[int]:
    """Ids of the explanations whose text matches a web-search query, best first (bm25 on
    SQLite, ts_rank on PostgreSQL), among these sources (None: all); `any_word`: those with
    any of its words. Ranks at most RANK_BUDGET matches (the first ones the index yields)."""
    limit = max(1, min(limit, MAX_MATCHES))
    if session.get_bind().dialect.name == "sqlite":
        match = fts5_query(query, any_word=any_word)
        if match is None:
            return []
        # The inner query has no ORDER BY: bm25 is computed only for the rows it reads, at most
        # RANK_BUDGET; the outer one sorts those.
        inner = select(_FTS.c.rowid.label("id"),
                       func.bm25(_FTS.c.explanations_fts).label("rank")).where(
            _FTS.c.explanations_fts.op("MATCH")(match))
        if source_ids is not None:
            inner = inner.join(Explanation, Explanation.id == _FTS.c.rowid).where(
                Explanation.source_id.in_(list(source_ids)))
        inner = inner.limit(RANK_BUDGET).subquery()
        return list(session.scalars(select(inner.c.id).order_by(inner.c.rank, inner.c.id)
                                    .limit(limit)))
    if not wanted_words(query):
        return []
    tsq = func.websearch_to_tsquery(
        TS_CONFIG, " or ".join(wanted_words(query)) if any_word else query)
    vec = func.to_tsvector(TS_CONFIG, Explanation.text)
    inner = select(Explanation.id, func.ts_rank(vec, tsq).label("rank")).where(vec.op("@@")(tsq))
    if source_ids is not None:
        inner = inner.where(Explanation.source_id.in_(list(source_ids)))
    inner = inner.limit(RANK_BUDGET).subquery()
    return list(session.scalars(select(inner.c.id).order_by(inner.c.rank.desc(), inner.c.id)
                                .limit(limit)))


def matching_features(*, dialect: str, query: str, source_id: int):
    """A subquery of the feature indices of a source with an explanation that matches the
    query, or None when it names no word (filters a feature list)."""
    if dialect == "sqlite":
        match = fts5_query(query)
        if match is None:
            return None
        cond = Explanation.id.in_(
            select(_FTS.c.rowid).where(_FTS.c.explanations_fts.op("MATCH")(match)))
    else:
        if not wanted_words(query):
            return None
        cond = func.to_tsvector(TS_CONFIG, Explanation.text).op("@@")(
            func.websearch_to_tsquery(TS_CONFIG, query))
    return select(Explanation.feature_idx).where(Explanation.source_id == source_id, cond)
