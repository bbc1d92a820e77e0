"""The pure parts of explanations: a scorer's judgement against its controls (on fixed numbers,
against numpy's definitions), the order of a feature's explanations, reciprocal-rank fusion,
and the translation of web-search queries into FTS5 (which must never be FTS5 syntax)."""

from __future__ import annotations

import datetime as dt
import math
import sqlite3
from types import SimpleNamespace

import numpy as np
import pytest

from app.db.explanations import fts5_query, wanted_words
from app.explanation_search import RRF_K, fuse
from app.explanations import MIN_PAIRS, judge, ordered


def judged(values, controls, scorer="detection", model="m"):
    v, c = np.asarray(values, float), np.asarray(controls, float)
    d = v - c
    return judge(scorer, model, n=len(d), sum_value=float(v.sum()), sum_control=float(c.sum()),
                 sum_diff=float(d.sum()), sum_diff2=float((d * d).sum()))


def definition(values, controls) -> str:
    """The rule, spelled with numpy: the mean paired difference against two standard errors."""
    d = np.asarray(values, float) - np.asarray(controls, float)
    if len(d) < MIN_PAIRS:
        return "too-few"
    se = d.std(ddof=1) / math.sqrt(len(d))
    return "informative" if d.mean() > 2 * se else "uninformative"


CASES = {
    "clearly better": ([0.9, 0.8, 0.85, 0.95, 0.7, 0.88, 0.91, 0.83, 0.79, 0.9, 0.86, 0.92],
                       [0.5, 0.55, 0.45, 0.6, 0.5, 0.52, 0.48, 0.5, 0.51, 0.49, 0.5, 0.47]),
    "no better": ([0.6, 0.62, 0.58, 0.61, 0.59, 0.6, 0.63, 0.57, 0.6, 0.61],
                  [0.61, 0.6, 0.59, 0.6, 0.6, 0.61, 0.6, 0.58, 0.62, 0.6]),
    "worse": ([0.4] * 12, [0.6] * 12),
    "equal": ([0.7] * 10, [0.7] * 10),
    "better, no spread": ([0.7] * 10, [0.6] * 10),
    # mean difference 0.1, sd 0.5 over 10 pairs: se 0.158, below two of them
    "noisy": ([1.1, -0.3, 0.9, -0.4, 0.8, -0.2, 1.0, -0.5, 0.6, 0.0], [0.0] * 10),
    "too few": ([0.9] * 9, [0.1] * 9),
}


@pytest.mark.parametrize("case", list(CASES))
def test_judgement_follows_its_definition(case):
    values, controls = CASES[case]
    j = judged(values, controls)
    assert j.verdict == definition(values, controls)
    d = np.asarray(values) - np.asarray(controls)
    assert j.n_pairs == len(d)
    assert j.mean_value == pytest.approx(np.mean(values))
    assert j.mean_control == pytest.approx(np.mean(controls))
    assert j.mean_difference == pytest.approx(d.mean())
    assert j.standard_error == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)), rel=1e-9,
                                             abs=1e-12)


def test_judgement_verdicts_of_the_fixed_cases():
    verdicts = {case: judged(*CASES[case]).verdict for case in CASES}
    assert verdicts == {"clearly better": "informative", "no better": "uninformative",
                        "worse": "uninformative", "equal": "uninformative",
                        "better, no spread": "informative", "noisy": "uninformative",
                        "too few": "too-few"}
    assert "not enough scores to judge" in judged(*CASES["too few"]).message
    assert "uninformative" in judged(*CASES["no better"]).message


def test_judgement_of_no_pairs_and_bad_input():
    j = judge("fuzzing", "", n=0, sum_value=0, sum_control=0, sum_diff=0, sum_diff2=0)
    assert j.verdict == "too-few" and j.mean_value is None and j.standard_error is None
    assert "no model" in j.message
    with pytest.raises(ValueError):
        judge("fuzzing", "", n=-1, sum_value=0, sum_control=0, sum_diff=0, sum_diff2=0)


def _row(**kw):
    return SimpleNamespace(**kw)


def test_explanations_are_ordered_by_scores_a_scorer_can_back():
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def expl(i):
        return _row(id=i, text=f"e{i}", explainer="tokens", explainer_model="",
                    prompt_version="v1", author=None, tokens_used=None, created_at=when)

    def sc(e, scorer, value):
        return _row(explanation_id=e, scorer=scorer, scorer_model="m", value=value,
                    control=0.5, details={}, created_at=when)

    good = judged(*CASES["clearly better"], scorer="detection")
    bad = judged(*CASES["no better"], scorer="fuzzing")
    judgements = {("detection", "m"): good, ("fuzzing", "m"): bad}
    exs = [expl(1), expl(2), expl(3), expl(4), expl(5)]
    scores = [sc(1, "detection", 0.6), sc(1, "fuzzing", 0.99),  # high only where it is noise
              sc(2, "detection", 0.8), sc(3, "fuzzing", 0.95), sc(4, "simulation", 0.1)]
    out, used = ordered(exs, scores, judgements)
    # trusted scores first (detection 0.8, then 0.6; simulation has no judgement: too few),
    # then those with untrusted scores only, then the unscored (newest first)
    assert [e.id for e in out] == [2, 1, 4, 3, 5]
    assert [s.value for s in out[1].scores] == [0.99, 0.6]
    assert [s.verdict for s in out[1].scores] == ["uninformative", "informative"]
    assert [(j.scorer, j.verdict) for j in used] == [
        ("detection", "informative"), ("fuzzing", "uninformative"), ("simulation", "too-few")]


def test_fusion_adds_reciprocal_ranks():
    fused = dict(fuse([10, 20, 30], [30, 40, 10]))
    assert fused[10] == pytest.approx(1 / (RRF_K + 1) + 1 / (RRF_K + 3))
    assert fused[30] == pytest.approx(1 / (RRF_K + 3) + 1 / (RRF_K + 1))
    assert fused[20] == pytest.approx(1 / (RRF_K + 2))
    assert fused[40] == pytest.approx(1 / (RRF_K + 2))
    order = [i for i, _ in fuse([10, 20, 30], [30, 40, 10])]
    # 10 and 30 tie: the better full-text rank first; 20 and 40 tie likewise
    assert order == [10, 30, 20, 40]
    # a full-text match at rank 1 without an embedding still beats the best match by meaning
    assert [i for i, _ in fuse([7], [8, 9])][0] == 7


@pytest.mark.parametrize("query,expected", [
    ("closing parenthesis", '("closing" AND "parenthesis")'),
    ('"closing parenthesis" call', '("closing parenthesis" AND "call")'),
    ("python -snake", '("python" NOT "snake")'),
    ("cats or dogs", '("cats") OR ("dogs")'),
    ("don't", None),  # stop words, as PostgreSQL's websearch_to_tsquery drops them
    ("the end of a line", '("end" AND "line")'),
    ('"the end of a line"', '("the end of a line")'),
    ("won't-stop", '("won t stop")'),
    ("-only", None),
    ('""', None),
    ("   ", None),
    ('a" OR b*: NEAR(', '("b" AND "NEAR")'),
    ('x" OR b*: NEAR(', '("x") OR ("b" AND "NEAR")'),
])
def test_fts5_query(query, expected):
    assert fts5_query(query) == expected


def test_fts5_queries_of_any_input_run():
    """Whatever the text, the FTS5 query is valid: it runs on a real FTS5 table."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(text, tokenize='porter unicode61')")
    conn.executemany("INSERT INTO t(text) VALUES (?)",
                     [("closing parenthesis",), ("python snake",), ("cats and dogs",)])
    rng = np.random.default_rng(0)
    alphabet = list('abc "-*():^+{}[]~OR AND NOT NEAR éü_0') + ["OR", "NOT", "NEAR", "AND"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=rng.integers(0, 12)))
        for any_word in (False, True):
            q = fts5_query(text, any_word=any_word)
            if q is not None:
                conn.execute("SELECT rowid FROM t WHERE t MATCH ?", (q,)).fetchall()
    found = conn.execute("SELECT text FROM t WHERE t MATCH ?",
                         (fts5_query("closing parenthes"),)).fetchall()
    assert found == []  # whole words (stemmed), not prefixes
    found = conn.execute("SELECT text FROM t WHERE t MATCH ?",
                         (fts5_query("python -cats"),)).fetchall()
    assert found == [("python snake",)]
    assert wanted_words("cats -dogs or \"big birds\"") == ["cats", "big", "birds"]
    assert fts5_query("cats -dogs birds", any_word=True) == '"cats" OR "birds"'


def _index(vectors: np.ndarray, sources: np.ndarray, exact_up_to: int):
    from app.explanation_search import VectorIndex

    return VectorIndex.of(np.arange(1, len(vectors) + 1), sources, vectors,
                          exact_up_to=exact_up_to)


def test_nearest_vectors_are_the_exact_top_k():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((500, 256)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[7] = v[3]  # a tie: the smaller id first
    sources = np.arange(500) % 3
    q = v[3] + 0.1 * rng.standard_normal(256).astype(np.float32)
    q /= np.linalg.norm(q)
    index = _index(v, sources, exact_up_to=10_000)
    ids, sims = index.nearest(q, source_ids=None, k=20)
    cos = v @ q
    want = sorted(range(500), key=lambda i: (-cos[i], i))[:20]
    assert ids.tolist() == [i + 1 for i in want]
    np.testing.assert_allclose(sims, cos[want], rtol=1e-5)
    assert ids[:2].tolist() == [4, 8]
    ids, _ = index.nearest(q, source_ids=[1, 2], k=20)
    assert ids.tolist() == [i + 1 for i in sorted((i for i in range(500) if sources[i]),
                                                  key=lambda i: (-cos[i], i))[:20]]
    assert index.nearest(q, source_ids=[9], k=5)[0].tolist() == []


def test_the_coarse_pass_keeps_the_nearest_when_the_leading_dimensions_carry_them():
    from app.explanation_search import COARSE_DIM

    rng = np.random.default_rng(1)
    n = 30_000
    v = rng.standard_normal((n, 256)).astype(np.float32)
    v[:, COARSE_DIM:] *= 0.05  # as the embedding model puts most of a text in its first dims
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    sources = np.arange(n) % 2
    coarse, exact = _index(v, sources, exact_up_to=1000), _index(v, sources, exact_up_to=n)
    for q in v[rng.integers(0, n, 20)] + 0.05 * rng.standard_normal((20, 256)).astype(
            np.float32):
        q = q / np.linalg.norm(q)
        for src in (None, [0]):
            a, sa = coarse.nearest(q, source_ids=src, k=50)
            b, sb = exact.nearest(q, source_ids=src, k=50)
            assert a.tolist() == b.tolist()
            np.testing.assert_allclose(sa, sb, rtol=1e-6)
