"""Writes a harvest into the database.

`begin` registers the model, the dataset (its sequences stored once) and the sources as
`building`, so a server can show progress; `finish` writes every feature and example of the
sources and flips them to `ready` in one transaction, so a source is visible only when whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch
from sqlalchemy import Engine, delete, insert, select, update

from app.db.bulk import bulk_insert, copy_columns
from app.db.engine import transaction
from app.db.tables import (
    SEQUENCE_TOKENS,
    Dataset,
    ExampleBlock,
    ExampleGroup,
    Feature,
    Model,
    PeakToken,
    Sequence,
    Source,
    SourceStatus,
    Vocabulary,
    example_record,
    utcnow,
)
from workers.accumulate import window_start
from workers.corpus import tokenizer_hash
from workers.harvest import HarvestConfig, SourceSpec
from workers.state import Ranked, SourceState

log = logging.getLogger(__name__)

N_LOGITS = 10
N_TOP_TOKENS = 5
INSERT_CHUNK = 20_000


class StoreError(RuntimeError):
    pass


@dataclass
class Registered:
    model_id: int
    dataset_id: int
    source_ids: dict[str, int]


def _model_row(session, lm) -> Model:
    row = session.scalar(select(Model).where(Model.slug == lm.slug))
    thash = tokenizer_hash(lm.tokenizer)
    if row is not None:
        if row.tokenizer_hash != thash or row.d_mlp != lm.d_mlp or row.n_layers != lm.n_layers:
            raise StoreError(
                f"model {lm.slug!r} is already in the database with a different tokenizer or "
                f"shape (from {row.hub_id}); load this one under another name")
        return row
    row = Model(slug=lm.slug, hub_id=lm.source, revision=lm.revision, arch=lm.arch,
                n_layers=lm.n_layers, d_model=lm.d_model, d_mlp=lm.d_mlp,
                vocab_size=lm.vocab_size, tokenizer_hash=thash)
    session.add(row)
    session.flush()
    session.add(Vocabulary(model_id=row.id, tokens=lm.token_strings()))
    return row


def _dataset_row(session, dataset) -> Dataset:
    row = session.scalar(select(Dataset).where(Dataset.slug == dataset.slug))
    if row is not None:
        return row
    row = Dataset(slug=dataset.slug, name=dataset.name, source=dataset.source,
                  slice=dataset.slice, n_sequences=dataset.n_sequences, seq_len=dataset.seq_len,
                  bos_policy=dataset.bos_policy, tokenizer_hash=dataset.tokenizer_hash)
    session.add(row)
    session.flush()
    toks = dataset.tokens.numpy().astype(SEQUENCE_TOKENS)
    rows = [{"dataset_id": row.id, "idx": i, "tokens": toks[i].tobytes()} for i in range(len(toks))]
    for i in range(0, len(rows), INSERT_CHUNK):
        session.execute(insert(Sequence), rows[i:i + INSERT_CHUNK])
    return row


def begin(engine: Engine, lm, dataset, specs: list[SourceSpec], cfg: HarvestConfig,
          *, replace: bool = False) -> Registered:
    """Register everything and mark the sources `building`. A ready source of the same name is
    refused unless `replace`; a building or failed one (an earlier, interrupted run) is reused."""
    with transaction(engine) as session:
        model = _model_row(session, lm)
        ds = _dataset_row(session, dataset)
        ids = {}
        for spec in specs:
            src = session.scalar(select(Source).where(Source.model_id == model.id,
                                                      Source.slug == spec.slug))
            if src is not None and src.status == SourceStatus.ready and not replace:
                raise StoreError(
                    f"source {lm.slug}/{spec.slug} is already harvested; pass --replace to "
                    "harvest it again")
            if src is None:
                src = Source(model_id=model.id, slug=spec.slug)
                session.add(src)
            src.dataset_id = ds.id
            src.kind = spec.kind
            src.hook_name = spec.hook_name
            src.layer = spec.layer
            src.n_features = spec.n_features
            src.sae_config = spec.sae_config
            src.harvest_config = cfg.to_dict()
            src.status = SourceStatus.building
            src.progress_tokens = 0
            src.total_tokens = dataset.n_tokens
            src.error = None
            session.flush()
            ids[spec.slug] = src.id
        return Registered(model.id, ds.id, ids)


def ready_sources(engine: Engine, model_slug: str) -> set[str]:
    """Slugs of the model's sources that are finished."""
    with transaction(engine) as session:
        return set(session.scalars(
            select(Source.slug).join(Model, Model.id == Source.model_id)
            .where(Model.slug == model_slug, Source.status == SourceStatus.ready)))


def report_progress(engine: Engine, reg: Registered, n_tokens: int) -> None:
    with transaction(engine) as session:
        session.execute(update(Source).where(Source.id.in_(reg.source_ids.values()))
                        .values(progress_tokens=n_tokens))


def fail(engine: Engine, reg: Registered, error: str) -> None:
    with transaction(engine) as session:
        session.execute(update(Source).where(Source.id.in_(reg.source_ids.values()),
                                             Source.status == SourceStatus.building)
                        .values(status=SourceStatus.failed, error=error[:2000]))


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


BLOCK_COLUMNS = ("source_id", "feature_idx", "group", "n", "window", "data")
FEATURE_COLUMNS = ("source_id", "idx", "max_act", "min_act", "mean_act", "std_act",
                   "frac_active", "n_active", "n_tokens", "histogram", "top_logits",
                   "bottom_logits", "top_tokens")

PEAK_COLUMNS = ("source_id", "token_id", "feature_idx", "count")


def _example_blocks(source_id: int, group: int, ranking: Ranked, rows: torch.Tensor,
                    seq_len: int, first: int) -> list[np.ndarray | list[memoryview]]:
    """The example_blocks rows of one group for features first, first + 1, ..., one array (or
    list of bytes) per BLOCK_COLUMNS. rows: [n, F] indices into the ranking (-1 = none) of
    those features, in rank order. Features without an example in the group get no row."""
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
    return [np.full(m, source_id, dtype=np.int32), (has + first).astype(np.int32),
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
    order = np.argsort(cols[1], kind="stable")
    return [c[order] if isinstance(c, np.ndarray) else [c[i] for i in order.tolist()]
            for c in cols]


def finish(engine: Engine, reg: Registered, lm, dataset, specs: list[SourceSpec],
           states: dict[str, SourceState], cfg: HarvestConfig) -> None:
    """Write features and examples of every source and mark them ready, in one transaction.

    Top and bottom logit tokens come from each source's output directions (spec.directions).
    """
    seq_len = dataset.seq_len
    with transaction(engine) as session:
        for spec in specs:
            sid = reg.source_ids[spec.slug]
            st = states[spec.slug]
            session.execute(delete(ExampleBlock).where(ExampleBlock.source_id == sid))
            session.execute(delete(Feature).where(Feature.source_id == sid))
            session.execute(delete(PeakToken).where(PeakToken.source_id == sid))
            tops, bottoms = logit_tables(lm, spec.directions())

            peak_tok = dataset.tokens[st.top.seq.clamp(max=len(dataset.tokens) - 1),
                                      st.top.pos.long()]
            top_tokens = top_token_counts(peak_tok, torch.isfinite(st.top.score))
            stats = st.stats
            n = max(stats.n_tokens, 1)
            cols = zip(stats.max.tolist(), stats.min.tolist(), stats.mean.tolist(),
                       stats.std.tolist(), stats.n_active.tolist(), _json_rows(stats.hist),
                       top_tokens, strict=True)
            feats, peaks = [], []
            for f, (mx, mn, mean, std, nact, hist, tt) in enumerate(cols):
                feats.append((sid, f, mx, mn, mean, std, nact / n, nact, stats.n_tokens,
                              hist, _json(tops[f]), _json(bottoms[f]), _json(tt)))
                peaks += [(sid, t, f, c) for t, c in tt]
            bulk_insert(session, Feature.__table__, FEATURE_COLUMNS, feats)
            bulk_insert(session, PeakToken.__table__, PEAK_COLUMNS, peaks)

            groups = [(ExampleGroup.top, st.top, torch.arange(st.top.size)[:, None].expand(
                -1, spec.n_features))]
            if st.bottom is not None:
                groups.append((ExampleGroup.bottom, st.bottom, torch.arange(
                    st.bottom.size)[:, None].expand(-1, spec.n_features)))
            for g, rows in quantile_picks(st.sample, cfg.n_ranges, cfg.per_range):
                groups.append((ExampleGroup.quantile + g, st.sample, rows))
            groups = [(code, ranking, torch.where(torch.isfinite(
                ranking.score.gather(0, rows.clamp(min=0))), rows, torch.tensor(-1)))
                for code, ranking, rows in groups]
            for lo in range(0, spec.n_features, BLOCK_CHUNK):
                hi = min(lo + BLOCK_CHUNK, spec.n_features)
                parts = [_example_blocks(sid, int(code), ranking, rows[:, lo:hi], seq_len, lo)
                         for code, ranking, rows in groups]
                copy_columns(session, ExampleBlock.__table__, BLOCK_COLUMNS,
                             _by_feature(parts))

            finished = utcnow()
            version = hashlib.sha256(json.dumps(
                [lm.source, dataset.slug, spec.slug, spec.hook_name, cfg.to_dict(),
                 finished.isoformat()], default=str).encode()).hexdigest()[:20]
            session.execute(update(Source).where(Source.id == sid).values(
                status=SourceStatus.ready, progress_tokens=dataset.n_tokens,
                finished_at=finished, version_hash=version, error=None))
    log.info("stored %d sources", len(specs))


def sequence_tokens(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=SEQUENCE_TOKENS)
