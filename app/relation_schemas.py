"""The JSON contract of related features (pydantic): the feature page's `related` lists.

Kept apart from `app.schemas` (which imports the feature page's part from here)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RelatedOut(_Out):
    model: str
    source: str
    index: int
    value: float
    explanation: str | None = Field(description="its best explanation, where it has one")
    url: str
    control: float | None = Field(None, description="match only: the best match's correlation "
                                  "against the other source's activations on other sequences, "
                                  "what a best match reaches by chance")


class FeatureRelated(_Out):
    cosine: list[RelatedOut] = Field(description="the most similar output directions in the "
                                     "same source (cosine similarity), highest first")
    cosine_across: list[RelatedOut] = Field(description="the most similar output directions in "
                                            "the model's other sources of the same width")
    jaccard: list[RelatedOut] = Field(description="features of the same source most often "
                                      "active on the same tokens: |both| / |either|")
    pearson: list[RelatedOut] = Field(description="features of the same source whose "
                                      "activations correlate most over all tokens")
    match: list[RelatedOut] = Field(description="its best match in every compared source, by "
                                    "activation correlation over the same tokens")

    @classmethod
    def empty(cls) -> FeatureRelated:
        return cls(cosine=[], cosine_across=[], jaccard=[], pearson=[], match=[])


class MatchedPair(_Out):
    a: int
    b: int
    value: float = Field(description="activation correlation over the same tokens")
    url_a: str
    url_b: str


class CorrelationBin(_Out):
    lo: float
    hi: float
    count: int


class ComparePage(_Out):
    ok: bool = True
    model_a: str
    source_a: str
    model_b: str
    source_b: str
    n_features_a: int
    n_features_b: int
    threshold: float = Field(description="the correlation from which a one-to-one pair counts "
                             "as a counterpart")
    best_match: list[CorrelationBin] = Field(description="histogram of the best-match "
                                             "correlation of each feature of A in B, over [-1, 1]")
    control: list[CorrelationBin] = Field(description="the same against B's activations on "
                                          "other sequences: what best matches reach by chance")
    median_best: float | None
    median_control: float | None
    pairs: list[MatchedPair] = Field(description="the one-to-one matching, highest first")
    unmatched_a: list[int] = Field(description="features of A with no counterpart in B: no "
                                   "one-to-one partner, or one correlated below the threshold")
    unmatched_b: list[int] = Field(description="features of B with no counterpart in A")
    page: str
    json_url: str
    source_a_url: str
    source_b_url: str
