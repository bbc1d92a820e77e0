"""app/histogram.py: the histogram's edges, and the bit-pattern binning against them."""

from __future__ import annotations

import math

import numpy as np

from app.histogram import (
    HIST_BASE,
    HIST_BINS,
    HIST_MAX_EXP,
    HIST_MIN_EXP,
    HIST_PER_OCTAVE,
    HIST_SHIFT,
    histogram_edges,
)


def test_the_edges_are_four_per_octave_from_2_to_the_minus_10_to_2_to_the_10():
    edges = histogram_edges()
    assert (HIST_MIN_EXP, HIST_MAX_EXP, HIST_PER_OCTAVE, HIST_BINS) == (-10, 10, 4, 82)
    assert len(edges) == HIST_BINS + 1
    assert edges[:3] == [0.0, 2.0**-10, 1.25 * 2.0**-10]
    assert edges[-2:] == [2.0**10, math.inf]
    assert all(a < b for a, b in zip(edges, edges[1:], strict=False))
    for k in range(HIST_MAX_EXP - HIST_MIN_EXP + 1):  # every fourth edge is a power of two
        assert edges[1 + HIST_PER_OCTAVE * k] == 2.0 ** (HIST_MIN_EXP + k)
    for e in range(HIST_MIN_EXP, HIST_MAX_EXP):
        octave = edges[1 + HIST_PER_OCTAVE * (e - HIST_MIN_EXP):][:HIST_PER_OCTAVE + 1]
        assert octave == [2.0**e * (1 + q / 4) for q in range(5)]


def _bins(values: np.ndarray) -> np.ndarray:
    """The bin of each float32 from its bits, as the harvest computes it."""
    bits = values.astype(np.float32).view(np.int32)
    return np.clip((bits >> HIST_SHIFT) - HIST_BASE, 0, HIST_BINS - 1)


def test_the_bin_read_off_the_bits_is_the_bin_between_the_edges():
    edges = np.array(histogram_edges())
    inner = edges[1:-1].astype(np.float32)
    # each edge opens its bin; the float32 just below it is still in the bin before
    assert np.array_equal(_bins(inner), np.arange(1, HIST_BINS))
    below = np.nextafter(inner, np.float32(0))
    assert np.array_equal(_bins(below), np.arange(0, HIST_BINS - 1))
    rng = np.random.default_rng(0)
    values = np.concatenate([
        np.exp2(rng.uniform(-14, 14, 100_000)).astype(np.float32),
        -np.exp2(rng.uniform(-14, 14, 1000)).astype(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, np.finfo(np.float32).max], dtype=np.float32)])
    want = np.searchsorted(edges[1:-1], values.astype(np.float64), side="right")
    assert np.array_equal(_bins(values), want)
