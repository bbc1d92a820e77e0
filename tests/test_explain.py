"""The explorer's read queries use indexes on PostgreSQL: the SQL they really send, captured,
then EXPLAINed on a source of 30,000 features (analyzed, so the planner sees real sizes)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from sqlalchemy import event, insert
from sqlalchemy.orm import Session

from app.db import queries
from app.db.bulk import bulk_insert
from app.db.engine import make_engine, upgrade
from app.db.tables import (
    Dataset,
    ExampleBlock,
    Feature,
    Model,
    PeakToken,
    Sequence,
    Source,
    example_record,
)

N_FEATURES, N_SEQ, SEQ_LEN = 30_000, 2_000, 64


def _block(seqs: list[int], window: int = 16) -> bytes:
    """An example block of one record per sequence: window start 0, peak at 3 of value 1."""
    rec = np.zeros(len(seqs), dtype=example_record(window))
    rec["seq_idx"], rec["peak_pos"], rec["peak_value"] = seqs, 3, 1.0
    return rec.tobytes()


@pytest.fixture(scope="module")
def pg_engine(request):
    from support import fresh_pg_url, needs_postgres

    needs_postgres()
    engine = make_engine(fresh_pg_url("fs_test_explain"))
    upgrade(engine)
    rng = np.random.default_rng(0)
    with Session(engine) as session, session.begin():
        mid = session.execute(insert(Model).values(
            slug="m", hub_id="synthetic", arch="gpt2", n_layers=1, d_model=8, d_mlp=N_FEATURES,
            vocab_size=100, tokenizer_hash="t")).inserted_primary_key[0]
        did = session.execute(insert(Dataset).values(
            slug="d", name="d", source="synthetic", slice="all", n_sequences=N_SEQ,
            seq_len=SEQ_LEN, bos_policy="none", tokenizer_hash="t")).inserted_primary_key[0]
        for other in ("0-other", "0-mlp"):  # two sources, so a source_id filter selects half
            sid = session.execute(insert(Source).values(
                model_id=mid, dataset_id=did, slug=other, kind="neurons", hook_name="h", layer=0,
                n_features=N_FEATURES, harvest_config={}, status="ready", progress_tokens=0,
                total_tokens=0)).inserted_primary_key[0]
            maxes = rng.random(N_FEATURES)
            bulk_insert(session, Feature.__table__, (
                "source_id", "idx", "max_act", "min_act", "mean_act", "std_act", "frac_active",
                "n_active", "n_tokens", "histogram", "top_logits", "bottom_logits", "top_tokens"),
                ((sid, i, float(maxes[i]), 0.0, 0.0, 0.0, float(maxes[i]) / 7, 1, 10, "[]",
                  "[]", "[]", json.dumps([[1, 2]])) for i in range(N_FEATURES)))
            bulk_insert(session, ExampleBlock.__table__, (
                "source_id", "feature_idx", "group", "n", "window", "data"),
                ((sid, i, 0, 4, 16, _block([(i * 7 + r) % N_SEQ for r in range(4)]))
                 for i in range(N_FEATURES)))
            bulk_insert(session, PeakToken.__table__,
                        ("source_id", "token_id", "feature_idx", "count"),
                        ((sid, (i * 13 + j) % 5000, i, 4 - j) for i in range(N_FEATURES)
                         for j in range(4)))
        bulk_insert(session, Sequence.__table__, ("dataset_id", "idx", "tokens"),
                    ((did, i, b"\0\0\0\0" * SEQ_LEN) for i in range(N_SEQ)))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE")
    yield engine, sid, did
    engine.dispose()


def plans_of(engine, run) -> list[str]:
    """Run `run(session)` and EXPLAIN every SELECT it sent, with its real parameters."""
    sent = []

    def capture(conn, cursor, statement, params, context, executemany):
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append((statement, params))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with Session(engine) as session:
            run(session)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert sent, "no query was sent"
    out = []
    with engine.connect() as conn:
        for statement, params in sent:
            rows = conn.exec_driver_sql("EXPLAIN " + statement, params).all()
            out.append("\n".join(r[0] for r in rows))
    return out


def assert_indexed(plan: str) -> None:
    assert "Seq Scan" not in plan, plan
    assert "Index" in plan, plan


def test_feature_and_its_examples_are_index_lookups(pg_engine):
    engine, sid, did = pg_engine
    for plan in plans_of(engine, lambda s: (
            queries.feature(s, source_id=sid, index=12345),
            queries.examples(s, source_id=sid, dataset_id=did, index=12345))):
        assert_indexed(plan)


@pytest.mark.parametrize("sort", ["index", "max_act", "frac_active"])
@pytest.mark.parametrize("desc", [False, True])
def test_keyset_pages_are_index_scans(pg_engine, sort, desc):
    engine, sid, _ = pg_engine

    def run(s):
        first = queries.features_page(s, source_id=sid, sort=sort, desc=desc, after=None,
                                      limit=50)
        last = first[-1]
        value = last.idx if sort == "index" else getattr(last, sort)
        queries.features_page(s, source_id=sid, sort=sort, desc=desc, after=(value, last.idx),
                              limit=50)

    for plan in plans_of(engine, run):
        assert_indexed(plan)
        assert "Sort" not in plan.split("Limit", 1)[-1] or "Incremental" in plan, plan


def test_random_feature_is_an_index_lookup(pg_engine):
    engine, sid, _ = pg_engine
    for plan in plans_of(engine, lambda s: queries.random_index(
            s, source_id=sid, n_features=N_FEATURES, rng=random.Random(3))):
        assert_indexed(plan)


def test_token_search_reads_a_range_of_peak_tokens(pg_engine):
    engine, sid, _ = pg_engine

    def run(s):
        found = queries.peak_token_features(s, source_ids=[sid, sid - 1], token_ids=[17, 4017],
                                            limit=50)
        assert found
        queries.top_counts(s, source_id=sid, indices=[r.feature_idx for r in found])

    for plan in plans_of(engine, run):
        assert_indexed(plan)
