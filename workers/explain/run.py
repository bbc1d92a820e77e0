"""One `featurescope explain` run: explain the requested features of a source, score the
explanations beside their controls, and store both per batch (so an interrupted run loses
nothing written and a rerun skips what is there)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from app.db import queries
from app.db.engine import make_engine, upgrade
from app.db.tables import Explanation, ExplanationScore
from workers.explain.examples import FeatureExamples, feature_examples, source


@dataclass(frozen=True)
class Written:
    """What an explainer wrote for one feature."""

    text: str
    tokens_used: int | None = None


class Explainer(Protocol):
    name: str
    model: str  # "" where no language model writes
    prompt_version: str

    def explain(self, batch: list[FeatureExamples]) -> list[Written]: ...


@dataclass(frozen=True)
class Score:
    """One scorer's value for an explanation and for its control, with the details."""

    value: float | None  # None: no examples of one class, nothing to score
    control: float | None
    details: dict


class Scorer(Protocol):
    name: str
    model: str

    def score(self, items: list[tuple[str, str | None, FeatureExamples]]) -> list[Score]: ...


def parse_features(text: str, n_features: int) -> list[int]:
    """'all', '7', '0-99' or '1,5,9-12' as sorted feature indices within the source."""
    if text == "all":
        return list(range(n_features))
    out: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"--features expects 'all', 'N', 'A-B' or a comma list, not {text!r}")
        a, b = int(lo), int(hi) if sep else int(lo)
        if a > b or b >= n_features:
            raise ValueError(f"features {part.strip()} are not within 0-{n_features - 1}")
        out.update(range(a, b + 1))
    return sorted(out)


@dataclass
class ExplainResult:
    explained: int = 0
    skipped: int = 0
    scored: int = 0
    unscored: int = 0
    vectors: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class ExplainRun:
    """Explain `features` of model/source with `explainer`, then score with `scorers`."""

    db_url: str
    model: str
    source: str
    explainer: Explainer
    scorers: list[Scorer] = field(default_factory=list)
    features: str = "all"
    batch_size: int = 16
    seed: int = 0
    progress_bar: bool = True
    embed: bool = True

    def run(self) -> ExplainResult:
        engine = make_engine(self.db_url)
        upgrade(engine)
        vocabs = queries.VocabCache()
        with Session(engine) as session:
            src = source(session, self.model, self.source)
            todo = parse_features(self.features, src.n_features)
            done = self._existing(session, src.id)
        result = ExplainResult(skipped=sum(f in done for f in todo))
        bar = _bar(len(todo), self.progress_bar, f"explain {self.model}/{self.source}")
        try:
            for i in range(0, len(todo), self.batch_size):
                batch = todo[i:i + self.batch_size]
                # examples are read only where there is something to explain or to score
                read = [f for f in batch if f not in done or self.scorers]
                with Session(engine) as session:
                    exs = [feature_examples(session, vocabs, src, f) for f in read]
                # a language model is not asked about a feature that never fired
                new = [e for e in exs if e.index not in done
                       and (e.fires or not self.explainer.model)]
                self._explain(engine, src.id, new, done, result)
                self._score(engine, exs, done, result)
                bar.update(len(batch))
        finally:
            bar.close()
        if self.embed and result.explained:
            result.vectors = _embed(engine, src.id, result)
        engine.dispose()
        return result

    def _existing(self, session: Session, source_id: int) -> dict[int, tuple[int, str]]:
        """feature -> (explanation id, text) of this explainer, model and prompt version."""
        e = self.explainer
        rows = session.execute(select(Explanation.feature_idx, Explanation.id, Explanation.text)
                               .where(Explanation.source_id == source_id,
                                      Explanation.explainer == e.name,
                                      Explanation.explainer_model == e.model,
                                      Explanation.prompt_version == e.prompt_version)
                               .order_by(Explanation.id))
        return {f: (i, t) for f, i, t in rows}

    def _explain(self, engine, source_id: int, exs: list[FeatureExamples],
                 done: dict[int, tuple[int, str]], result: ExplainResult) -> None:
        if not exs:
            return
        e = self.explainer
        written = e.explain(exs)
        with Session(engine) as session, session.begin():
            for ex, w in zip(exs, written, strict=True):
                done[ex.index] = (session.execute(insert(Explanation).values(
                    source_id=source_id, feature_idx=ex.index, text=w.text, explainer=e.name,
                    explainer_model=e.model, prompt_version=e.prompt_version,
                    author=None, tokens_used=w.tokens_used)).inserted_primary_key[0], w.text)
        result.explained += len(exs)

    def _control(self, index: int, done: dict[int, tuple[int, str]]) -> str | None:
        """The explanation of a random other feature (seeded by the feature): the control."""
        others = [f for f in done if f != index]
        if not others:
            return None
        return done[random.Random(self.seed * 1_000_003 + index).choice(sorted(others))][1]

    def _score(self, engine, exs: list[FeatureExamples], done: dict[int, tuple[int, str]],
               result: ExplainResult) -> None:
        for scorer in self.scorers:
            ids = [done[ex.index][0] for ex in exs if ex.index in done]
            with Session(engine) as session:
                scored = set(session.scalars(select(ExplanationScore.explanation_id).where(
                    ExplanationScore.explanation_id.in_(ids),
                    ExplanationScore.scorer == scorer.name,
                    ExplanationScore.scorer_model == scorer.model)))
            todo = [ex for ex in exs if ex.index in done and ex.fires
                    and done[ex.index][0] not in scored]
            if not todo:
                continue
            scores = scorer.score([(done[ex.index][1], self._control(ex.index, done), ex)
                                   for ex in todo])
            with Session(engine) as session, session.begin():
                for ex, s in zip(todo, scores, strict=True):
                    if s.value is None:  # no examples of one class: nothing to score
                        result.unscored += 1
                        continue
                    result.scored += 1
                    session.execute(insert(ExplanationScore).values(
                        explanation_id=done[ex.index][0], scorer=scorer.name,
                        scorer_model=scorer.model, value=s.value, control=s.control,
                        details=s.details))


def _embed(engine, source_id: int, result: ExplainResult) -> int:
    from app import embedding

    try:
        return embedding.store_missing_vectors(engine, source_id=source_id)
    except embedding.EmbedderMissing as exc:
        result.notes.append(f"no embeddings stored: {exc}")
        return 0


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, show: bool, desc: str):
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="feature")
