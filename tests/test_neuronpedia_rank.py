"""app.neuronpedia_rank against the definitions written out by hand, ties included: an earlier
source first, then a lower index (Neuronpedia leaves ties to torch)."""

from __future__ import annotations

import numpy as np

from app.neuronpedia_rank import active_features, ranked_features, top_by_token


def test_ranked_features_by_max_or_sum_with_ties():
    a = np.array([[9, 0, 0, 0], [1, 2, 2, 0], [0, 3, 1, -1]], dtype=np.float32)  # [T=3, F=4]
    b = np.array([[0, 0], [3, 0], [0, 2]], dtype=np.float32)
    acts = {"0-x": a, "1-x": b}
    got = ranked_features(acts, ["0-x", "1-x"], zero_first=False, sort_indexes=[], n=3)
    assert [(r.source, r.index, r.key) for r in got] == [("0-x", 0, 9), ("0-x", 1, 3),
                                                         ("1-x", 0, 3)]
    got = ranked_features(acts, ["0-x", "1-x"], zero_first=True, sort_indexes=[], n=4)
    assert [(r.source, r.index) for r in got] == [("0-x", 1), ("1-x", 0), ("0-x", 2),
                                                  ("1-x", 1)]
    assert got[0].values == [0, 2, 3] and (got[0].max_value, got[0].max_index) == (3, 2)
    got = ranked_features(acts, ["1-x", "0-x"], zero_first=False, sort_indexes=[1, 2], n=2)
    assert [(r.source, r.index, r.key) for r in got] == [("0-x", 1, 5), ("1-x", 0, 3)]


def test_top_by_token_takes_the_lower_index_among_equal_values():
    acts = np.array([[5, 5, 5, 5], [0, 1, 0, 0], [-1, -2, 0, -3]], dtype=np.float32)
    assert top_by_token(acts, 2, first=0) == [[(0, 5.0), (1, 5.0)], [(1, 1.0), (0, 0.0)],
                                              [(2, 0.0), (0, -1.0)]]
    assert top_by_token(acts, 9, first=2) == [[(2, 0.0), (0, -1.0), (1, -2.0), (3, -3.0)]]


def test_active_features_are_the_non_zero_values_after_first():
    acts = np.array([[7, 7], [0, 0.5], [-2, 0], [0, 1]], dtype=np.float32)
    assert active_features(acts, first=1) == {"0": [(2, -2.0)], "1": [(1, 0.5), (3, 1.0)]}
    assert active_features(acts, first=0)["0"] == [(0, 7.0), (2, -2.0)]
