"""The JSON contract of explanations (pydantic): on the feature page, in search by meaning, and
in the shapes of Neuronpedia's explanation objects and explanation search.

Kept apart from `app.schemas` (which imports the feature page's parts from here)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schema_types import NpIn

Verdict = Literal["informative", "uninformative", "too-few"]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScorerJudgement(_Out):
    """Whether a scorer (with its model) tells a source's explanations from their controls."""

    scorer: str
    scorer_model: str
    n_pairs: int = Field(description="scores of the source's explanations that have a control")
    mean_value: float | None
    mean_control: float | None
    mean_difference: float | None = Field(description="mean of value - control")
    standard_error: float | None = Field(description="of the mean difference (paired)")
    verdict: Verdict = Field(description="uninformative: the mean score does not beat the mean "
                             "control by more than two standard errors; too-few: under "
                             "10 pairs, not enough scores to judge")
    message: str


class ScoreOut(_Out):
    scorer: str = Field(description="detection, fuzzing or simulation")
    scorer_model: str
    value: float
    control: float | None = Field(description="the same scorer on the same examples with "
                                  "another feature's explanation")
    verdict: Verdict = Field(description="this scorer's judgement over the source")
    details: dict
    created_at: dt.datetime


class ExplanationOut(_Out):
    id: int
    text: str
    explainer: str = Field(description="tokens, local, openai or human")
    explainer_model: str
    prompt_version: str
    author: str | None
    tokens_used: int | None
    created_at: dt.datetime
    scores: list[ScoreOut] = Field(description="highest first")


class FeatureExplanations(_Out):
    """What a feature page shows of explanations: best first, and the judgements of the
    scorers that scored them."""

    explanations: list[ExplanationOut]
    scorers: list[ScorerJudgement]


# ------------------------------------------------------------------ search by meaning


class ExplanationHit(_Out):
    model: str
    source: str
    index: int
    explanation_id: int
    text: str
    explainer: str
    explainer_model: str
    max_act: float | None
    frac_active: float | None
    text_rank: int | None = Field(description="rank among the full-text matches, from 1")
    meaning_rank: int | None = Field(description="rank by embedding similarity, from 1")
    similarity: float | None = Field(description="cosine of the query's and the text's "
                                     "embeddings")
    score: float = Field(description="reciprocal-rank fusion: sum of 1 / (60 + rank)")
    url: str


class ExplanationSearchOut(_Out):
    ok: Literal[True] = True
    query: str
    model: str | None
    sources: list[str] | None
    mode: Literal["hybrid", "text"] = Field(description="hybrid: full text and meaning; "
                                            "text: full text only (see note)")
    note: str | None
    searched: int = Field(description="explanations among the sources searched")
    with_vectors: int = Field(description="of which have an embedding")
    results: list[ExplanationHit] = Field(description="one per feature, best first")
    offset: int
    next_offset: int | None
    url: str


# ------------------------------------------------------------------ Neuronpedia compatibility


class NpExplanationScore(_Out):
    """A score shaped like Neuronpedia's ExplanationScore."""

    id: str
    value: float
    explanationId: str
    explanationScoreTypeName: str
    explanationScoreModelName: str
    initiatedByUserId: str
    jsonDetails: str = Field(description="JSON text: the control, the judgement and details")
    createdAt: dt.datetime


class NpExplanation(_Out):
    """An explanation shaped like Neuronpedia's Explanation; `source` repeats `layer` (the
    official Python client reads that name)."""

    id: str
    modelId: str
    layer: str
    source: str
    index: str
    description: str
    authorId: str
    typeName: str | None
    explanationModelName: str | None
    notes: str | None = None
    scoreV1: float = Field(0.0, description="its best score, 0 without one")
    scoreV2: float | None = None
    triggeredByUserId: str | None = None
    scores: list[NpExplanationScore] = []
    createdAt: dt.datetime
    updatedAt: dt.datetime


class NpNeuronRef(_Out):
    modelId: str
    layer: str
    index: str
    maxActApprox: float | None
    frac_nonzero: float | None


class NpExplanationHit(NpExplanation):
    cosine_similarity: float | None
    neuron: NpNeuronRef


class NpExplanationSearchAllIn(NpIn):
    """The body of Neuronpedia's POST /api/explanation/search-all."""

    query: str = Field(min_length=1, max_length=1000)
    offset: int = Field(0, ge=0, le=10_000)


class NpExplanationSearchModelIn(NpExplanationSearchAllIn):
    """The body of POST /api/explanation/search-model."""

    modelId: str = Field(max_length=128)


class NpExplanationSearchIn(NpExplanationSearchModelIn):
    """The body of POST /api/explanation/search: the sources of a model (`layers`)."""

    layers: list[str] = Field(min_length=1, max_length=2000)


class NpExplanationSearchRequest(_Out):
    modelId: str | None
    layers: list[str] | None
    query: str
    offset: int


class NpExplanationSearchOut(_Out):
    """Shaped like Neuronpedia's explanation search answer."""

    request: NpExplanationSearchRequest
    results: list[NpExplanationHit]
    resultsCount: int
    hasMore: bool
    nextOffset: int
