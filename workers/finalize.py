"""Turns a harvest's finished states into what the store writes: every feature's statistics,
direct logit attribution and top tokens, and its example blocks, as rows and numpy columns.

Runs before the write transaction opens (workers/store.py only writes what this returns).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from app.db.tables import ExampleGroup, example_record
from workers.accumulate import window_start
from workers.harvest import HarvestConfig, SourceSpec
from workers.relations import cofiring_rows, direction_rows
from workers.state import Ranked, SourceState
from workers.store import SourceResult

N_LOGITS = 10
N_TOP_TOKENS = 5


def _sig(x: float) -> float:
    """Logit effects to 5 significant digits: what any page shows, and a lighter row."""
    return float(f"{x:.5g}")


_json = json.JSONEncoder(separators=(",", ":")).encode
"""Compact JSON text, from one encoder made once (json.dumps makes one per call)."""


def _json_rows(x: torch.Tensor) -> list[str]:
    """The compact JSON array of each row of a 2-D integer tensor, from one encoding of all."""
    if x.shape[1] == 0:
        return ["[]"] * x.shape[0]
    return [f"[{r}]" for r in _json(x.tolist())[2:-2].split("],[")] if x.shape[0] else []


def _json_pairs(items: list[list]) -> list[str]:
    """The compact JSON of each item, a list of [number, number] pairs, from one encoding of
    all the non-empty ones: same text as _json(item), a call per source instead of per item."""
    out = ["[]"] * len(items)
    full = [i for i, x in enumerate(items) if x]
    if full:
        # "[[[a,b],[c,d]],[[e,f]]]": items are separated by "]],[[", which no item holds
        parts = _json([items[i] for i in full])[3:-3].split("]],[[")
        for i, part in zip(full, parts, strict=True):
            out[i] = f"[[{part}]]"
    return out


def logit_tables(lm, directions: torch.Tensor, k: int = N_LOGITS, chunk: int = 512
                 ) -> tuple[list, list]:
    """Direct logit attribution of each direction [n, d_model]: the top and bottom k tokens."""
    tops, bottoms = [], []
    for i in range(0, directions.shape[0], chunk):
        eff = lm.logit_effects(directions[i:i + chunk].to(lm.device)).float()
        tv, ti = eff.topk(k, dim=1)
        bv, bi = eff.topk(k, dim=1, largest=False)
        for rv, ri, out in ((tv, ti, tops), (bv, bi, bottoms)):
            for vals, idx in zip(rv.tolist(), ri.tolist(), strict=True):
                out.append([[t, _sig(v)] for t, v in zip(idx, vals, strict=True)])
    return tops, bottoms


def top_token_counts(tokens: torch.Tensor, fired: torch.Tensor, k: int = N_TOP_TOKENS
                     ) -> list[list[list[int]]]:
    """Per feature, the k most frequent tokens among tokens[:, f] where fired[:, f], as
    [[token_id, count], ...] by count, then token id. tokens, fired: [n, F]."""
    big = int(tokens.max()) + 2 if tokens.numel() else 1
    s = torch.where(fired, tokens.long(), big).sort(0).values
    counts = (s[:, None, :] == s[None, :, :]).sum(1)
    first = torch.ones_like(fired)
    first[1:] = s[1:] != s[:-1]
    # one key per distinct token: count first, then the lower token id
    key = torch.where(first & (s != big), counts * (big + 1) + (big - s), -1)
    key = key.topk(min(k, key.shape[0]), dim=0).values.T.tolist()
    return [[[big - x % (big + 1), x // (big + 1)] for x in row if x >= 0] for row in key]


def quantile_picks(sample: Ranked, n_ranges: int, per_range: int) -> list[tuple[int, torch.Tensor]]:
    """Rows of the sample to show per quantile group: the fired sequences of the sample, sorted by
    activation, cut into n_ranges groups of equal count, per_range picked evenly from each.

    Returns, per group, (group index, rows [per_range, F] with -1 where there is none).
    """
    value = torch.where(torch.isfinite(sample.score), sample.value, torch.tensor(float("inf")))
    order = torch.argsort(value, dim=0, stable=True)  # fired ones first, ascending
    n = torch.isfinite(sample.score).sum(0)  # [F]
    j = torch.arange(per_range)[:, None]
    out = []
    for g in range(n_ranges):
        lo = g * n // n_ranges
        hi = (g + 1) * n // n_ranges
        width = hi - lo
        pick = torch.where(width >= per_range, lo + (j * width) // per_range, lo + j)
        valid = j < torch.minimum(width, torch.tensor(per_range))
        rows = order.gather(0, pick.clamp(max=sample.size - 1))
        out.append((g, torch.where(valid, rows, torch.tensor(-1))))
    return out


def _example_blocks(group: int, ranking: Ranked, rows: torch.Tensor, seq_len: int,
                    first: int) -> list[np.ndarray | list[memoryview]]:
    """The example_blocks rows of one group for features first, first + 1, ..., one array (or
    list of bytes) per column of BLOCK_COLUMNS after source_id. rows: [n, F] indices into the
    ranking (-1 = none) of those features, in rank order. Features without an example in the
    group get no row."""
    n, n_features = rows.shape
    window = ranking.windows.shape[-1]
    ok = rows >= 0
    # The examples of each feature to the front of its column, in rank order.
    rows = rows.gather(0, torch.argsort((~ok).to(torch.int8), dim=0, stable=True)).clamp(min=0)
    counts = ok.sum(0).numpy()
    f = torch.arange(first, first + n_features)[None, :].expand_as(rows)
    pos = ranking.pos[rows, f].long()
    rec = np.empty((n_features, n), dtype=example_record(window))  # feature-major
    rec["seq_idx"] = ranking.seq[rows, f].T.numpy()
    rec["start"] = window_start(pos, seq_len, window).T.numpy()
    rec["peak_pos"] = pos.T.numpy()
    rec["peak_value"] = ranking.value[rows, f].float().T.numpy()
    rec["acts"] = ranking.windows[rows, f].transpose(0, 1).numpy()
    buf, size = memoryview(rec.reshape(-1).view(np.uint8)), rec.itemsize
    has = np.flatnonzero(counts)
    data = [buf[i * n * size:(i * n + c) * size]
            for i, c in zip(has.tolist(), counts[has].tolist(), strict=True)]
    m = len(has)
    return [(has + first).astype(np.int32),
            np.full(m, group, dtype=np.int16), counts[has].astype(np.int16),
            np.full(m, window, dtype=np.int16), data]


BLOCK_CHUNK = 8192
"""Features whose example blocks are built and written together."""


def _by_feature(parts: list[list]) -> list:
    """The rows of several groups' BLOCK_COLUMNS as one set of columns, ordered by feature and
    then group: written in that order, the large top and bottom blocks of a feature share
    pages with its small quantile blocks."""
    cols = [np.concatenate(c) if isinstance(c[0], np.ndarray) else [x for p in c for x in p]
            for c in zip(*parts, strict=True)]
    order = np.argsort(cols[0], kind="stable")
    return [c[order] if isinstance(c, np.ndarray) else [c[i] for i in order.tolist()]
            for c in cols]


def finalize_source(spec: SourceSpec, state: SourceState, *, lm, dataset, cfg: HarvestConfig,
                    logits: tuple[list, list] | None = None) -> SourceResult:
    """One source's rows: statistics, direct logit attribution from its output directions
    (spec.directions; or the given top and bottom `logits`), the tokens its top examples peak
    on, and its example blocks (top, bottom, the quantile groups picked from the sample, and
    zero: sequences where it never fired). A heads source goes through
    workers/head_metrics.py, which comes back here."""
    if spec.kind == "heads" and logits is None:
        from workers.head_metrics import finalize_heads

        return finalize_heads(spec, state, lm=lm, dataset=dataset, cfg=cfg)
    tops, bottoms = logits if logits is not None else logit_tables(lm, spec.directions())
    st = state
    peak_tok = dataset.tokens[st.top.seq.clamp(max=len(dataset.tokens) - 1), st.top.pos.long()]
    top_tokens = top_token_counts(peak_tok, torch.isfinite(st.top.score))
    stats = st.stats
    n = max(stats.n_tokens, 1)
    cols = zip(stats.max.tolist(), stats.min.tolist(), stats.mean.tolist(), stats.std.tolist(),
               stats.n_active.tolist(), _json_rows(stats.hist), _json_pairs(tops),
               _json_pairs(bottoms), _json_pairs(top_tokens), strict=True)
    feats = [(f, mx, mn, mean, std, nact / n, nact, stats.n_tokens, hist, top, bottom, tt)
             for f, (mx, mn, mean, std, nact, hist, top, bottom, tt) in enumerate(cols)]
    peaks = [(t, f, c) for f, tt in enumerate(top_tokens) for t, c in tt]

    groups = [(ExampleGroup.top, st.top, torch.arange(st.top.size)[:, None].expand(
        -1, spec.n_features))]
    if st.bottom is not None:
        groups.append((ExampleGroup.bottom, st.bottom, torch.arange(
            st.bottom.size)[:, None].expand(-1, spec.n_features)))
    for g, rows in quantile_picks(st.sample, cfg.n_ranges, cfg.per_range):
        groups.append((ExampleGroup.quantile + g, st.sample, rows))
    if st.zero is not None:
        groups.append((ExampleGroup.zero, st.zero, torch.arange(st.zero.size)[:, None].expand(
            -1, spec.n_features)))
    groups = [(code, ranking, torch.where(torch.isfinite(
        ranking.score.gather(0, rows.clamp(min=0))), rows, torch.tensor(-1)))
        for code, ranking, rows in groups]
    blocks = []
    for lo in range(0, spec.n_features, BLOCK_CHUNK):
        hi = min(lo + BLOCK_CHUNK, spec.n_features)
        blocks.append(_by_feature([
            _example_blocks(int(code), ranking, rows[:, lo:hi], dataset.seq_len, lo)
            for code, ranking, rows in groups]))
    return SourceResult(
        slug=spec.slug, n_tokens=dataset.n_tokens, features=feats, peaks=peaks, blocks=blocks,
        identity=[lm.source, dataset.slug, spec.slug, spec.hook_name, cfg.to_dict()],
        relations=[] if st.cofire is None else cofiring_rows(spec.slug, st.cofire))


def add_direction_relations(specs: list[SourceSpec], results: list[SourceResult]) -> None:
    """Append every source's cosine lists (within it, and across the harvest's other sources
    of the same width) to its result."""
    rows = direction_rows({s.slug: s.directions() for s in specs if s.directions is not None})
    for res in results:
        res.relations += rows.get(res.slug, [])


def finalize(lm, dataset, specs: list[SourceSpec], states: dict[str, SourceState],
             cfg: HarvestConfig) -> list[SourceResult]:
    """finalize_source for every source, in the order of specs, with the cosine lists."""
    results = [finalize_source(s, states[s.slug], lm=lm, dataset=dataset, cfg=cfg) for s in specs]
    add_direction_relations(specs, results)
    return results
