"""What readers see of explanations, decided in one place: whether a scorer tells a source's
explanations from their controls (`judge`), the order of a feature's explanations (best
first), and the best explanation of each feature of a list.

A scorer (with its model) is uninformative for a source when, over the scores of that source's
explanations that have a control, the mean score does not beat the mean control by more than
two standard errors of the paired difference; under MIN_PAIRS pairs there are not enough scores
to judge. Judgements are computed per source by one aggregate query and kept per server until
the explanations version (migration 0004) moves."""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Sequence

from sqlalchemy import Row
from sqlalchemy.orm import Session

from app.db import explanations as db
from app.explanation_schemas import ExplanationOut, FeatureExplanations, ScoreOut, ScorerJudgement

MIN_PAIRS = 10
"""Fewer (score, control) pairs than this: not enough scores to judge a scorer."""


def _model(scorer_model: str) -> str:
    return scorer_model or "no model"


def judge(scorer: str, scorer_model: str, *, n: int, sum_value: float, sum_control: float,
          sum_diff: float, sum_diff2: float) -> ScorerJudgement:
    """The judgement of a scorer from n (value, control) pairs given by their sums: of value,
    of control, of d = value - control and of d squared. Informative when mean(d) exceeds two
    standard errors, sd(d, ddof=1) / sqrt(n); too-few under MIN_PAIRS pairs."""
    if n < 0:
        raise ValueError(f"n must not be negative, not {n}")
    name = f"{scorer} ({_model(scorer_model)})"
    mean_value = sum_value / n if n else None
    mean_control = sum_control / n if n else None
    mean_diff = sum_diff / n if n else None
    se = None
    if n >= 2:
        # From sums the spread of equal differences comes out as rounding noise, not zero.
        spread = sum_diff2 - sum_diff * sum_diff / n
        spread = spread if spread > 1e-12 * sum_diff2 else 0.0
        se = math.sqrt(spread / (n - 1) / n)
    if n < MIN_PAIRS:
        verdict = "too-few"
        message = (f"{name}: not enough scores to judge it against its controls "
                   f"({n} of the {MIN_PAIRS} pairs needed)")
    elif mean_diff > 2 * se:
        verdict = "informative"
        message = (f"{name} scores beat their controls by {mean_diff:.3g} ± {se:.2g} "
                   f"(standard error) over {n} explanations of this source")
    else:
        verdict = "uninformative"
        message = (f"{name} is uninformative here: over {n} explanations of this source its "
                   f"scores (mean {mean_value:.3g}) do not beat their controls (mean "
                   f"{mean_control:.3g}) by more than two standard errors ({2 * se:.2g})")
    return ScorerJudgement(scorer=scorer, scorer_model=scorer_model, n_pairs=n,
                           mean_value=mean_value, mean_control=mean_control,
                           mean_difference=mean_diff, standard_error=se, verdict=verdict,
                           message=message)


def unjudged(scorer: str, scorer_model: str) -> ScorerJudgement:
    """The judgement of a scorer none of whose scores in the source has a control."""
    return judge(scorer, scorer_model, n=0, sum_value=0.0, sum_control=0.0, sum_diff=0.0,
                 sum_diff2=0.0)


Judgements = dict[tuple[str, str], ScorerJudgement]


class ExplanationCache:
    """Per server: each source's scorer judgements, dropped when the explanations version
    moves. Thread-safe (views run in a pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version: int | None = None
        self._judgements: dict[int, Judgements] = {}

    def judgements(self, session: Session, *, source_id: int, version: int) -> Judgements:
        with self._lock:
            if self._version != version:
                self._version, self._judgements = version, {}
            found = self._judgements.get(source_id)
        if found is None:
            found = {(r.scorer, r.scorer_model): judge(
                r.scorer, r.scorer_model, n=r.n, sum_value=r.sum_value,
                sum_control=r.sum_control, sum_diff=r.sum_diff, sum_diff2=r.sum_diff2)
                for r in db.control_sums(session, source_id=source_id)}
            with self._lock:
                if self._version == version:
                    self._judgements[source_id] = found
        return found


def page_version(version_hash: str | None, version: int) -> str | None:
    """What a page's ETag is made of: the finished source's version hash and the explanations
    version (None while a source is building)."""
    return f"{version_hash}.e{version}" if version_hash else None


def _order_key(ex: ExplanationOut) -> tuple:
    """Best first: the highest score from a scorer not marked uninformative, then the highest
    of any score, then the newest."""
    trusted = [s.value for s in ex.scores if s.verdict != "uninformative"]
    every = [s.value for s in ex.scores]
    return (bool(trusted), max(trusted, default=0.0), bool(every), max(every, default=0.0),
            ex.id)


def ordered(explanations: Sequence[Row], scores: Sequence[Row], judgements: Judgements
            ) -> tuple[list[ExplanationOut], list[ScorerJudgement]]:
    """Explanations with their scores (highest first), best first, and the judgements of the
    scorers among their scores."""
    by_explanation: dict[int, list] = defaultdict(list)
    used: Judgements = {}
    for s in scores:
        key = (s.scorer, s.scorer_model)
        j = used[key] = judgements.get(key) or used.get(key) or unjudged(*key)
        by_explanation[s.explanation_id].append(ScoreOut(
            scorer=s.scorer, scorer_model=s.scorer_model, value=s.value, control=s.control,
            verdict=j.verdict, details=s.details or {}, created_at=s.created_at))
    out = [ExplanationOut(
        id=e.id, text=e.text, explainer=e.explainer, explainer_model=e.explainer_model,
        prompt_version=e.prompt_version, author=e.author, tokens_used=e.tokens_used,
        created_at=e.created_at,
        scores=sorted(by_explanation[e.id], key=lambda s: (-s.value, s.scorer, s.scorer_model)))
        for e in explanations]
    out.sort(key=_order_key, reverse=True)
    return out, [used[k] for k in sorted(used)]


def of_features(session: Session, cache: ExplanationCache, *, source_id: int,
                indices: Sequence[int], version: int) -> dict[int, FeatureExplanations]:
    """The explanations of some features of a source, each feature's best first."""
    rows = db.of_features(session, source_id=source_id, indices=indices)
    if not rows:
        return {}
    judgements = cache.judgements(session, source_id=source_id, version=version)
    scores = db.scores_of(session, explanation_ids=[r.id for r in rows])
    per_feature: dict[int, list] = defaultdict(list)
    for r in rows:
        per_feature[r.feature_idx].append(r)
    out = {}
    for idx, exs in per_feature.items():
        ids = {e.id for e in exs}
        listed, used = ordered(exs, [s for s in scores if s.explanation_id in ids], judgements)
        out[idx] = FeatureExplanations(explanations=listed, scorers=used)
    return out


def of_feature(session: Session, cache: ExplanationCache, *, source_id: int, index: int,
               version: int) -> FeatureExplanations:
    found = of_features(session, cache, source_id=source_id, indices=[index], version=version)
    return found.get(index) or FeatureExplanations(explanations=[], scorers=[])
