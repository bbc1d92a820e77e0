"""Explanation reads use indexes on PostgreSQL: full-text search goes through the GIN index on
to_tsvector('english', text) (migration 0004), a feature's explanations and their scores through
their own indexes. The SQL really sent is captured and EXPLAINed over 30,000 explanations."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from sqlalchemy import insert
from sqlalchemy.orm import Session
from test_explain import assert_indexed, plans_of

from app.db import explanations as db
from app.db import queries
from app.db.bulk import bulk_insert
from app.db.engine import make_engine, upgrade
from app.db.tables import Dataset, Explanation, ExplanationScore, Feature, Model, Source

N_EXPLANATIONS, N_WORDS = 30_000, 2_000
TEXT_INDEX = "ix_explanations_text_search"


@pytest.fixture(scope="module")
def pg_explained():
    from support import fresh_pg_url, needs_postgres

    needs_postgres()
    engine = make_engine(fresh_pg_url("fs_test_explanation_plans"))
    upgrade(engine)
    rng = np.random.default_rng(0)
    words = [f"w{i}x" for i in range(N_WORDS)]
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with Session(engine) as session, session.begin():
        mid = session.execute(insert(Model).values(
            slug="m", hub_id="synthetic", arch="gpt2", n_layers=1, d_model=8, d_mlp=8,
            vocab_size=10, tokenizer_hash="t")).inserted_primary_key[0]
        did = session.execute(insert(Dataset).values(
            slug="d", name="d", source="synthetic", slice="all", n_sequences=1, seq_len=4,
            bos_policy="none", tokenizer_hash="t")).inserted_primary_key[0]
        sids = [session.execute(insert(Source).values(
            model_id=mid, dataset_id=did, slug=slug, kind="neurons", hook_name="h", layer=0,
            n_features=N_EXPLANATIONS, harvest_config={}, status="ready")).inserted_primary_key[0]
            for slug in ("0-other", "0-mlp")]
        for sid in sids:
            maxes = rng.random(N_EXPLANATIONS // 2)
            bulk_insert(session, Feature.__table__, (
                "source_id", "idx", "max_act", "min_act", "mean_act", "std_act", "frac_active",
                "n_active", "n_tokens", "histogram", "top_logits", "bottom_logits",
                "top_tokens"), ((sid, i, float(m), 0.0, 0.0, 0.0, float(m) / 7, 1, 10, "[]",
                                 "[]", "[]", "[]") for i, m in enumerate(maxes)))
        picks = rng.integers(0, N_WORDS, size=(N_EXPLANATIONS, 4))
        bulk_insert(session, Explanation.__table__, (
            "source_id", "feature_idx", "text", "explainer", "explainer_model",
            "prompt_version", "created_at"),
            ((sids[i % 2], i // 2, " ".join(words[w] for w in picks[i]), "tokens", "", "v1",
              when) for i in range(N_EXPLANATIONS)))
        first = session.scalar(insert(Explanation).values(
            source_id=sids[1], feature_idx=0, text="w1x w2x", explainer="tokens",
            created_at=when).returning(Explanation.id))
        bulk_insert(session, ExplanationScore.__table__, (
            "explanation_id", "scorer", "scorer_model", "value", "control", "details",
            "created_at"), ((first - 1 - i, "detection", "m", 0.8, 0.5, "{}", when)
                            for i in range(N_EXPLANATIONS)))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE")
    yield engine, sids
    engine.dispose()


@pytest.mark.parametrize("any_word", [False, True])
@pytest.mark.parametrize("some_sources", [False, True])
def test_text_search_reads_the_text_index(pg_explained, any_word, some_sources):
    engine, sids = pg_explained

    def run(s):
        found = db.text_matches(s, query="w17x w423x", source_ids=sids[1:] if some_sources
                                else None, any_word=any_word, limit=200)
        assert found or not any_word

    for plan in plans_of(engine, run):
        assert TEXT_INDEX in plan, plan
        assert "Seq Scan" not in plan, plan


def test_the_filtered_feature_list_reads_the_text_index(pg_explained):
    engine, sids = pg_explained

    def run(s):
        within = db.matching_features(dialect="postgresql", query="w17x", source_id=sids[1])
        rows = queries.features_page(s, source_id=sids[1], sort="max_act", desc=True,
                                     after=None, limit=50, within=within)
        assert rows

    plans = plans_of(engine, run)
    assert any(TEXT_INDEX in p for p in plans), plans


def test_a_features_explanations_and_scores_are_index_lookups(pg_explained):
    engine, sids = pg_explained

    def run(s):
        rows = db.of_features(s, source_id=sids[1], indices=[123, 4567])
        assert len(rows) == 2
        db.scores_of(s, explanation_ids=[r.id for r in rows])

    for plan in plans_of(engine, run):
        assert_indexed(plan)
