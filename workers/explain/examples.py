"""A feature's stored examples as explainers and scorers read them: token texts and per-token
activations of each window, by group (top, the quantile groups, zero)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import Row
from sqlalchemy.orm import Session

from app.db import queries
from app.db.tables import BosPolicy, ExampleGroup


@dataclass(frozen=True)
class Window:
    """One example: the window's token texts, the feature's activation at each token, and
    the position in the window of the sequence's peak (the harvest's, exact)."""

    tokens: list[str]
    acts: list[float]
    group: int
    peak: int

    def around(self, before: int, after: int) -> Window:
        """The tokens from `before` tokens before the peak to `after` after it."""
        lo, hi = max(self.peak - before, 0), self.peak + after + 1
        return Window(self.tokens[lo:hi], self.acts[lo:hi], self.group, self.peak - lo)


@dataclass
class FeatureExamples:
    """What is stored of one feature for explaining it: its examples by group, the token ids
    its top examples peak on with their counts, and its top logit tokens as texts."""

    index: int
    top: list[Window] = field(default_factory=list)
    quantiles: list[Window] = field(default_factory=list)  # highest range first
    zero: list[Window] = field(default_factory=list)
    top_tokens: list[tuple[str, int]] = field(default_factory=list)
    top_logits: list[str] = field(default_factory=list)

    @property
    def fires(self) -> bool:
        return bool(self.top)


def source(session: Session, model: str, source_slug: str) -> Row:
    """The source row (queries.source_by_slug) or ValueError naming what is missing."""
    src = queries.source_by_slug(session, model=model, source=source_slug)
    if src is None:
        raise ValueError(f"no source {model}/{source_slug}")
    if src.status != "ready":
        raise ValueError(f"source {model}/{source_slug} is {src.status}, not ready")
    return src


def _window(e, vocab: queries.Vocab, bos: bool) -> Window:
    """A stored example as a Window; a BOS token that opens it is left out, as the harvest
    leaves it out of every statistic."""
    n = min(len(e.acts) // 2, max(len(e.tokens) // 4 - e.start, 0))
    ids = queries.decode_tokens(e.tokens, e.start, n)
    acts = np.frombuffer(e.acts, "<f2", n).astype(np.float32).tolist()
    skip = int(bos and e.start == 0 and n > 0)
    return Window(list(vocab.many(ids[skip:])) if n > skip else [], acts[skip:], e.group,
                  e.peak_pos - e.start - skip)


def feature_examples(session: Session, vocabs: queries.VocabCache, src: Row, index: int
                     ) -> FeatureExamples:
    """The examples and peak/logit tokens of feature `index` of source `src`."""
    vocab = vocabs.get(session, model_id=src.model_id, tokenizer_hash=src.tokenizer_hash)
    out = FeatureExamples(index)
    row = queries.feature(session, source_id=src.id, index=index)
    if row is None:
        raise ValueError(f"source {src.slug} has no feature {index}")
    out.top_tokens = [(vocab.text(t), c) for t, c in row.top_tokens]
    out.top_logits = [vocab.text(t) for t, _ in row.top_logits]
    quantiles: dict[int, list[Window]] = {}
    for e in queries.examples(session, source_id=src.id, dataset_id=src.dataset_id, index=index,
                              with_zero=True):
        w = _window(e, vocab, src.bos_policy == BosPolicy.prepended)
        if e.group == ExampleGroup.top:
            out.top.append(w)
        elif e.group == ExampleGroup.zero:
            out.zero.append(w)
        elif e.group >= ExampleGroup.quantile:
            quantiles.setdefault(e.group, []).append(w)
    out.quantiles = [w for g in sorted(quantiles, reverse=True) for w in quantiles[g]]
    return out
