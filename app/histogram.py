"""The activation histogram's fixed log-spaced bins: shared by the harvest and the pages.

Bin 0 holds the activations below 2**HIST_MIN_EXP (zero and negative values too), the last bin
those >= 2**HIST_MAX_EXP, and between them HIST_PER_OCTAVE bins per octave: bin i holds
edges[i] <= a < edges[i + 1], with edges 2**e * (1 + q/4) (`histogram_edges`). The bin of a
float32 is read off its bit pattern, so binning costs one shift:
`clamp((bits >> HIST_SHIFT) - HIST_BASE, 0, HIST_BINS - 1)`.
"""

from __future__ import annotations

HIST_MIN_EXP = -10
HIST_MAX_EXP = 10
HIST_PER_OCTAVE = 4
HIST_BINS = (HIST_MAX_EXP - HIST_MIN_EXP) * HIST_PER_OCTAVE + 2
HIST_SHIFT = 23 - 2
"""Right shift of a float32's bits that keeps the exponent and the top two mantissa bits."""
HIST_BASE = (127 + HIST_MIN_EXP) * HIST_PER_OCTAVE - 1
"""The shifted bits of 2**HIST_MIN_EXP, less one: bin 1 starts there."""


def histogram_edges() -> list[float]:
    """The HIST_BINS + 1 edges: [0, 2**-10, 2**-10 * 1.25, ..., 2**10, inf]."""
    inner = [
        2.0**e * (1 + q / HIST_PER_OCTAVE)
        for e in range(HIST_MIN_EXP, HIST_MAX_EXP)
        for q in range(HIST_PER_OCTAVE)
    ]
    return [0.0, *inner, 2.0**HIST_MAX_EXP, float("inf")]
