"""Explanations and scores written straight into a database over a real tiny harvest (the web
tests' tiny Llama): a fixed set that the tests of pages, search and judgements read back.
(Imported by name, like `support`.)"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from app.db.tables import Explanation, ExplanationScore, Model, Source

SCRIPT = '<script>window.__pwned = 1</script> <b>bold</b> & "quotes"'

# Phrases for the explanations of many features: none holds the words of the searches below.
FILLER = ["numbers and digits", "female names", "the end of a sentence", "plural nouns",
          "words about the weather", "indentation in code", "capital letters at the start",
          "the word the", "commas between items", "dates and years"]


@dataclass(frozen=True)
class Written:
    """Ids of what was written, by role."""

    closing: int  # 1-mlp/3: "closing parenthesis ..."; the feature's best explanation
    closing_other: int  # 1-mlp/3 too: a worse-scored explanation
    script: int  # 1-mlp/5: an explanation made of HTML and script
    sae: int  # 1-res-sae-48/7
    fillers: list[int]  # 1-mlp/10.. one each


def source_id(session: Session, model: str, source: str) -> int:
    return session.scalar(select(Source.id).join(Model, Model.id == Source.model_id)
                          .where(Model.slug == model, Source.slug == source))


def _explanation(session: Session, sid: int, idx: int, text: str, explainer: str = "tokens",
                 explainer_model: str = "", **kw) -> int:
    return session.execute(insert(Explanation).values(
        source_id=sid, feature_idx=idx, text=text, explainer=explainer,
        explainer_model=explainer_model, prompt_version=kw.pop("prompt_version", "v1"),
        created_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), **kw)).inserted_primary_key[0]


def score(session: Session, explanation_id: int, scorer: str, value: float,
          control: float | None, scorer_model: str = "smollm2-135m-instruct") -> None:
    session.execute(insert(ExplanationScore).values(
        explanation_id=explanation_id, scorer=scorer, scorer_model=scorer_model, value=value,
        control=control, details={"n_examples": 20},
        created_at=dt.datetime(2026, 1, 2, tzinfo=dt.UTC)))


def write_explanations(engine, model: str) -> Written:
    """On `model`'s 1-mlp: 1 + 20 explanations with detection scores that beat their controls
    (informative), fuzzing scores that do not (uninformative) and 4 simulation scores (too few
    to judge); two explanations on feature 3, one of HTML on feature 5; one on 1-res-sae-48/7."""
    rng = random.Random(0)
    with Session(engine) as session, session.begin():
        mlp, sae = source_id(session, model, "1-mlp"), source_id(session, model, "1-res-sae-48")
        closing = _explanation(session, mlp, 3, "closing parenthesis at the end of a call",
                               author="tester", tokens_used=123)
        score(session, closing, "detection", 0.91, 0.52)
        score(session, closing, "fuzzing", 0.64, 0.63)
        other = _explanation(session, mlp, 3, "python function definitions", "local",
                             "smollm2-135m-instruct")
        score(session, other, "detection", 0.71, 0.50)
        score(session, other, "fuzzing", 0.99, 0.97)  # high, but its scorer is uninformative
        script = _explanation(session, mlp, 5, SCRIPT, "human")
        fillers = []
        for k in range(20):
            e = _explanation(session, mlp, 10 + k, f"{FILLER[k % len(FILLER)]} ({k})")
            fillers.append(e)
            score(session, e, "detection", 0.75 + rng.uniform(-0.1, 0.1),
                  0.5 + rng.uniform(-0.1, 0.1))
            fuzz = 0.6 + rng.uniform(-0.1, 0.1)
            score(session, e, "fuzzing", fuzz, fuzz + rng.uniform(-0.05, 0.05))
            if k < 4:
                score(session, e, "simulation", 0.3, 0.1, scorer_model="gpt-4o-mini")
        score(session, fillers[0], "detection", 0.7, None)  # no control: not in the judgement
        sae_e = _explanation(session, sae, 7, "html tags and angle brackets")
    return Written(closing, other, script, sae_e, fillers)
