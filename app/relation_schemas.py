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
