"""The explanation tables of migration 0004 on SQLite and PostgreSQL: the full-text index kept
by triggers, the explanations version moved by every write, downgrade and upgrade again, and the
stored embeddings (`store_missing_vectors`)."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import delete, insert, inspect, select, update
from sqlalchemy.orm import Session
from support import needs_embedder

from app import embedding
from app.db import explanations as db
from app.db.engine import make_engine, upgrade
from app.db.tables import (
    Dataset,
    Explanation,
    ExplanationScore,
    ExplanationVector,
    Model,
    Source,
)

TABLES = {"explanations", "explanation_scores", "explanation_vectors", "explanations_version"}


def _source(session: Session, slug: str = "0-mlp") -> int:
    mid = session.scalar(select(Model.id)) or session.execute(insert(Model).values(
        slug="m", hub_id="synthetic", arch="gpt2", n_layers=1, d_model=4, d_mlp=8,
        vocab_size=10, tokenizer_hash="t")).inserted_primary_key[0]
    did = session.scalar(select(Dataset.id)) or session.execute(insert(Dataset).values(
        slug="d", name="d", source="synthetic", slice="all", n_sequences=1, seq_len=4,
        bos_policy="none", tokenizer_hash="t")).inserted_primary_key[0]
    return session.execute(insert(Source).values(
        model_id=mid, dataset_id=did, slug=slug, kind="neurons", hook_name="h", layer=0,
        n_features=8, harvest_config={}, status="ready")).inserted_primary_key[0]


def _explain(session: Session, sid: int, idx: int, text: str) -> int:
    return session.execute(insert(Explanation).values(
        source_id=sid, feature_idx=idx, text=text, explainer="tokens")).inserted_primary_key[0]


def test_writes_move_the_version_and_the_text_index_follows(db_url):
    engine = make_engine(db_url)
    upgrade(engine)
    assert TABLES <= set(inspect(engine).get_table_names())
    with Session(engine) as s:
        seen = [db.version(s)]

    def step(work):
        with Session(engine) as s, s.begin():
            work(s)
        with Session(engine) as s:
            seen.append(db.version(s))
            return db.text_matches(s, query="closing parenthesis", source_ids=None)

    sid = []
    step(lambda s: sid.append(_source(s)))
    assert seen[-1] == seen[-2]  # other tables leave it alone
    ids = []
    assert step(lambda s: ids.extend([_explain(s, sid[0], 1, "closing parenthesis"),
                                      _explain(s, sid[0], 2, "opening parentheses")])) == [ids[0]]
    step(lambda s: s.execute(insert(ExplanationScore).values(
        explanation_id=ids[0], scorer="detection", value=0.9, control=0.5, details={})))
    step(lambda s: s.execute(insert(ExplanationVector).values(
        explanation_id=ids[0], embedder="e", vector=b"\0" * 16)))
    # the update moves the index with the text (stemmed: closing ~ closes)
    assert sorted(step(lambda s: s.execute(update(Explanation).where(Explanation.id == ids[1])
                                           .values(text="closes a parenthesis")))) == ids
    assert step(lambda s: s.execute(delete(Explanation).where(Explanation.id == ids[0]))) == [
        ids[1]]
    assert step(lambda s: s.execute(delete(Source))) == []  # cascades to all three tables
    assert all(b > a for a, b in zip(seen[1:], seen[2:], strict=False)), seen
    with Session(engine) as s:
        assert s.scalar(select(ExplanationScore.id)) is None
        assert s.scalar(select(ExplanationVector.explanation_id)) is None

    upgrade(engine, "0003")
    assert not TABLES & set(inspect(engine).get_table_names())
    upgrade(engine)
    with Session(engine) as s, s.begin():
        _explain(s, _source(s, "1-mlp"), 0, "closing parenthesis")
    with Session(engine) as s:
        assert db.version(s) == 1
        assert len(db.text_matches(s, query="parenthesis", source_ids=None)) == 1
    engine.dispose()


def test_text_matches_keep_to_their_sources_and_rank(db_url):
    engine = make_engine(db_url)
    upgrade(engine)
    with Session(engine) as s, s.begin():
        a, b = _source(s, "0-mlp"), _source(s, "1-mlp")
        one = _explain(s, a, 0, "closing parenthesis")
        two = _explain(s, b, 0, "nested closing parenthesis in a closing parenthesis")
        three = _explain(s, b, 1, "parenthesis")
        _explain(s, b, 2, "something else entirely")
    with Session(engine) as s:
        assert db.text_matches(s, query="closing parenthesis", source_ids=[a]) == [one]
        assert db.text_matches(s, query="closing parenthesis", source_ids=[b]) == [two]
        assert set(db.text_matches(s, query="closing parenthesis", source_ids=None)) == {one, two}
        assert db.text_matches(s, query="closing parenthesis -nested", source_ids=None) == [one]
        anyw = db.text_matches(s, query="closing parenthesis", source_ids=[b], any_word=True)
        assert anyw[0] == two and set(anyw) == {two, three}  # more matches rank higher
        assert db.text_matches(s, query="-closing", source_ids=None) == []
        assert db.text_matches(s, query="   ", source_ids=None) == []
    engine.dispose()


def test_missing_vectors_are_stored_once(db_url):
    needs_embedder()
    engine = make_engine(db_url)
    upgrade(engine)
    with Session(engine) as s, s.begin():
        a, b = _source(s, "0-mlp"), _source(s, "1-mlp")
        texts = {_explain(s, a, 0, "closing parenthesis"): "closing parenthesis",
                 _explain(s, a, 1, "female names"): "female names",
                 _explain(s, b, 0, ""): "",
                 _explain(s, b, 1, "numbers and digits"): "numbers and digits"}
        first = next(iter(texts))
        s.execute(insert(ExplanationVector).values(explanation_id=first, embedder="old",
                                                   vector=b"\0" * 8))
    assert embedding.store_missing_vectors(engine, source_id=a, batch=1) == 2
    assert embedding.store_missing_vectors(engine) == 2
    assert embedding.store_missing_vectors(engine) == 0
    with Session(engine) as s:
        rows = s.execute(select(ExplanationVector)).scalars().all()
    assert {r.explanation_id for r in rows} == set(texts)
    want = embedding.embed(list(texts.values()))
    for r in rows:
        assert r.embedder == embedding.EMBEDDER
        v = np.frombuffer(r.vector, embedding.VECTOR)
        np.testing.assert_array_equal(v, want[list(texts).index(r.explanation_id)])
        norm = np.linalg.norm(v)
        assert norm == pytest.approx(1.0, abs=1e-6) or (norm == 0 and texts[r.explanation_id]
                                                        == "")
    with pytest.raises(ValueError):
        embedding.store_missing_vectors(engine, batch=0)
    engine.dispose()
