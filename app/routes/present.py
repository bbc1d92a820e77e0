"""Presentation helpers the templates call: number formats, visible whitespace, the colour of
each token and the geometry of the histogram. They return text and numbers, never HTML: the
templates write the markup and Jinja escapes every string."""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from app.db.queries import shortest_decimal
from app.histogram import HIST_MAX_EXP, histogram_edges
from app.schemas import ExampleOut, FeatureStats, Histogram

_GLYPHS = {"\n": "↵", "\t": "⇥", "\r": "␍", "\x0b": "␋", "\x0c": "␌", "\x7f": "␡"}
_EDGES = histogram_edges()


@lru_cache(maxsize=1 << 17)
def shown(text: str) -> str:
    """A token as it reads in running text: newlines, tabs and other invisible characters as
    visible glyphs (spaces stay spaces; the tooltip marks them). Empty tokens read '∅'."""
    if not text:
        return "∅"
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch in _GLYPHS:
            out.append(_GLYPHS[ch])
        elif ord(ch) < 0x20:
            out.append(chr(0x2400 + ord(ch)))
        elif ch.isprintable() or unicodedata.category(ch) == "Zs":
            out.append(ch)
        else:
            out.append(f"⟨U+{ord(ch):04X}⟩")
    return "".join(out)


@lru_cache(maxsize=1 << 16)
def half(value: float) -> str:
    """The exact value of a stored float16 activation, as its shortest decimal."""
    return shortest_decimal(value, "<e")


def single(value: float) -> str:
    """The exact value of a float32 (the peak), as its shortest decimal."""
    return shortest_decimal(value, "<f")


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    return f"{value:.{digits}g}"


def pct(frac: float | None) -> str:
    """A fraction as a percentage, with three significant digits however small."""
    if frac is None:
        return "–"
    if frac == 0:
        return "0%"
    return f"{frac * 100:.3g}%"


def count(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


def alpha(value: float, stats: FeatureStats) -> float:
    """Highlight intensity of one activation, in [0, 1], in steps of 0.01: value / max for
    positive values, and for negative ones value / min (the feature's most negative value)."""
    if value > 0 and stats.max_act > 0:
        k = int(value * 100 / stats.max_act + 0.5)
    elif value < 0 and stats.min_act < 0:
        k = int(value * 100 / stats.min_act + 0.5)
    else:
        return 0.0
    return min(k, 100) / 100


STRONG = 60
"""From this intensity (in %) on, a highlighted token is written in dark ink for contrast."""
# Classes of a token by intensity: `a{k}` sets the alpha of its background to k/100 (style.css);
# no inline style, so the Content-Security-Policy can forbid inline styles too.
_POS = ["t"] + [f"t a{k}" + (" s" if k >= STRONG else "") for k in range(1, 101)]
_NEG = ["t n"] + [f"t n a{k}" + (" s" if k >= STRONG else "") for k in range(1, 101)]


def cells(ex: ExampleOut, stats: FeatureStats, bos_first: bool = False
          ) -> list[tuple[str, str, str]]:
    """Per window token: (text, exact value or '' for zero, CSS classes). The peak shows its
    exact float32 value, the others their stored float16 value. A leading BOS token is not
    highlighted: its activation is outside the statistics (Neuronpedia hides it too)."""
    pos = 100 / stats.max_act if stats.max_act > 0 else 0.0
    neg = 100 / stats.min_act if stats.min_act < 0 else 0.0
    out = []
    for text, v in zip(ex.tokens, ex.acts, strict=True):
        if v > 0:
            k = int(v * pos + 0.5)
            cls = _POS[k if k < 100 else 100]
        elif v < 0:
            k = int(v * neg + 0.5)
            cls = _NEG[k if k < 100 else 100]
        else:
            out.append((shown(text), "", "t"))
            continue
        out.append((shown(text), half(v), cls))
    i = ex.peak_index
    if 0 <= i < len(out):
        k = int(alpha(ex.peak_value, stats) * 100 + 0.5)
        cls = (_NEG if ex.peak_value < 0 else _POS)[k]
        out[i] = (out[i][0], single(ex.peak_value), cls + " pk")
    if bos_first and ex.start == 0 and out and i != 0:
        out[0] = (out[0][0], out[0][1], "t bos")
    return out


def density_width(frac: float) -> int:
    """The class step (0..50, of 2%) of a density bar on a log scale from 1e-6 to 1."""
    if frac <= 0:
        return 0
    return round(min(max((math.log10(frac) + 6) / 6, 0.02), 1.0) * 50)


@dataclass
class Bar:
    x: float
    w: float
    h: float
    lo: float
    hi: float | None
    count: int


@dataclass
class HistPlot:
    width: int
    height: int
    bars: list[Bar]
    ticks: list[tuple[float, str]]
    ymax: int
    low_count: int
    total: int


def hist_plot(h: Histogram, width: int = 340, height: int = 90) -> HistPlot | None:
    """Bars of the activations above 2**-10 on a log2 axis, spanning the bins that are not
    empty; None when no token got there. Bin 0 (inactive, zero or negative) is reported apart."""
    counts = h.counts
    used = [i for i in range(1, len(counts)) if counts[i]]
    if not used:
        return None
    first, last = used[0], used[-1]
    lo = math.log2(_EDGES[first])
    top_edge = _EDGES[last + 1] if last + 1 < len(_EDGES) - 1 else 2.0 ** (HIST_MAX_EXP + 0.5)
    hi = math.log2(top_edge)
    span = max(hi - lo, 1e-9)
    ymax = max(counts[first:last + 1])
    bars = []
    for i in range(first, last + 1):
        a = math.log2(_EDGES[i])
        b = math.log2(_EDGES[i + 1]) if i + 1 < len(_EDGES) - 1 else hi
        bars.append(Bar(x=round((a - lo) / span * width, 2), w=round((b - a) / span * width, 2),
                        h=round(counts[i] / ymax * height, 2), lo=_EDGES[i],
                        hi=None if i + 1 == len(_EDGES) - 1 else _EDGES[i + 1],
                        count=counts[i]))
    step = max(1, math.ceil(span / 5))
    ticks = [(round((e - lo) / span * width, 2), fmt(2.0**e, 3))
             for e in range(math.ceil(lo), math.floor(hi) + 1) if e % step == 0]
    return HistPlot(width=width, height=height, bars=bars, ticks=ticks, ymax=ymax,
                    low_count=counts[0], total=sum(counts))


def progress(done: int, total: int) -> float:
    return min(done / total, 1.0) if total > 0 else 0.0


GLOBALS = {"fmt": fmt, "pct": pct, "count": count, "shown": shown, "cells": cells,
           "hist_plot": hist_plot, "half": half, "single": single, "progress": progress,
           "density_width": density_width, "zip": zip}
