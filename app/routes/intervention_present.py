"""Presentation helpers of the intervention pages: the geometry of the patching heatmaps, the
colour of each token of an ablation's effect, and the tooltips of generated tokens. They return
text and numbers, never HTML: the templates write the markup and Jinja escapes every string."""

from __future__ import annotations

from dataclasses import dataclass

from app.intervention_schemas import GeneratedToken, PatchOut
from app.routes.present import STRONG, fmt, shown
from app.schemas import FeatureStats


def intensity(value: float, scale: float) -> str:
    """CSS classes of a value on a diverging scale: `p` (positive) or `n` (negative) and its
    intensity `a{k}`, k = round(100 |value| / scale), at most 100; '' for zero."""
    if not value or not scale > 0:
        return ""
    k = min(100, int(abs(value) * 100 / scale + 0.5))
    if k == 0:
        return ""
    return f"{'p' if value > 0 else 'n'} a{k}" + (" s" if k >= STRONG else "")


@dataclass
class Cell:
    x: float
    y: float
    cls: str
    title: str


@dataclass
class Heatmap:
    """An SVG heatmap: cells of `cell` x `cell_h` units right of the row labels and below the
    (rotated) column labels."""

    width: float
    height: float
    left: float
    top: float
    cell: float
    cell_h: float
    cells: list[Cell]
    rows: list[tuple[float, str]]
    cols: list[tuple[float, str]]


def heatmap(values: list[list[float]], rows: list[str], cols: list[str], col_names: list[str],
            *, cell: float = 26, cell_h: float = 16) -> Heatmap:
    """values[i][j] at row i (layer `rows[i]`), column j, coloured on [-1, 1] (1 = the clean
    run); each cell's tooltip names its layer, its column (`col_names[j]`) and its value."""
    left = 8 + 7 * max((len(r) for r in rows), default=1)
    top = 12 + 5 * min(max((len(c) for c in cols), default=1), 16)
    cells = [Cell(x=round(left + j * cell, 2), y=round(top + i * cell_h, 2),
                  cls=intensity(v, 1.0), title=f"layer {rows[i]} · {col_names[j]}: {fmt(v, 4)}")
             for i, row in enumerate(values) for j, v in enumerate(row)]
    return Heatmap(width=left + len(cols) * cell + 4, height=top + len(rows) * cell_h + 4,
                   left=left, top=top, cell=cell, cell_h=cell_h, cells=cells,
                   rows=[(round(top + (i + 0.7) * cell_h, 2), r) for i, r in enumerate(rows)],
                   cols=[(round(left + (j + 0.6) * cell, 2), c) for j, c in enumerate(cols)])


def patch_maps(r: PatchOut) -> list[tuple[str, str, Heatmap]]:
    """(id, heading, heatmap) of each kind a sweep ran: the residual stream (layer x position,
    the tokens on the columns, "clean/corrupted" where they differ), heads (layer x head) and
    MLPs (one column)."""
    out = []
    if r.resid is not None:
        toks = [shown(a) if a == b else f"{shown(a)}/{shown(b)}"
                for a, b in zip(r.clean_tokens, r.corrupted_tokens, strict=True)]
        rows = [str(i) for i in range(len(r.resid))]
        out.append(("resid", "Residual stream", heatmap(
            r.resid, rows, toks, [f"position {j} {t!r}" for j, t in enumerate(toks)])))
    if r.heads is not None:
        n = len(r.heads[0]) if r.heads else 0
        out.append(("heads", "Attention heads", heatmap(
            r.heads, [str(i) for i in range(len(r.heads))], [f"H{h}" for h in range(n)],
            [f"head {h}" for h in range(n)])))
    if r.mlp is not None:
        out.append(("mlp", "MLPs", heatmap([[v] for v in r.mlp],
                                          [str(i) for i in range(len(r.mlp))], ["MLP"],
                                          ["MLP output"])))
    return out


def effect_cells(tokens: list[str], delta: list[float | None], scale: float
                 ) -> list[tuple[str, str, str]]:
    """Per token: (text, tooltip, CSS classes), coloured by how much its loss rose (`p`) or
    fell (`n`) when the feature was ablated, full colour at `scale`."""
    out = []
    for text, d in zip(tokens, delta, strict=True):
        if d is None:
            out.append((shown(text), "", "t"))
        else:
            cls = intensity(d, scale).removeprefix("p ")  # rises in the examples' hue
            out.append((shown(text), f"loss {'+' if d >= 0 else ''}{fmt(d, 4)}",
                        f"t {cls}".rstrip()))
    return out


def token_tip(t: GeneratedToken) -> str:
    """A generated token's tooltip: its log-probability and the likeliest alternatives."""
    tip = f"logprob {fmt(t.logprob, 4)}"
    if t.top:
        tip += " · " + ", ".join(f"{shown(x.token)!r} {fmt(x.logprob, 3)}" for x in t.top)
    return tip


def steer_strength(stats: FeatureStats) -> float:
    """The strength a feature page's steer link proposes: 4 x its max activation over the
    dataset, to 3 significant digits (1 for a feature that never fired)."""
    return float(f"{4 * stats.max_act:.3g}") if stats.max_act > 0 else 1.0


GLOBALS = {"patch_maps": patch_maps, "effect_cells": effect_cells, "token_tip": token_tip,
           "intensity": intensity, "steer_strength": steer_strength}
