"""The JSON contract of the explorer (pydantic), separate from the tables.

Every page answers with one of these when `.json` is appended to its URL; the keys are
documented here and kept stable. Errors share one envelope: `ErrorOut`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.explanation_schemas import ExplanationOut, ScorerJudgement
from app.relation_schemas import FeatureRelated
from app.schema_types import In, UtcTime


class Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorOut(Out):
    ok: Literal[False] = False
    status: int
    error: str


# ------------------------------------------------------------------ models and sources


class DatasetOut(Out):
    slug: str
    name: str
    source: str = Field(description="provenance: where the text came from")
    slice: str
    n_sequences: int
    seq_len: int
    bos_policy: str


class SourceOut(Out):
    slug: str
    kind: str = Field(description="neurons or sae")
    hook_name: str
    layer: int
    n_features: int
    dataset: str = Field(description="the dataset's slug")
    status: str = Field(description="building, ready or failed")
    progress_tokens: int
    total_tokens: int
    progress: float = Field(description="progress_tokens / total_tokens, 0..1")
    error: str | None
    url: str
    json_url: str


class ModelOut(Out):
    slug: str
    hub_id: str
    arch: str
    n_layers: int
    d_model: int
    d_mlp: int
    vocab_size: int
    url: str
    json_url: str
    sources: list[SourceOut]


class HomePage(Out):
    ok: Literal[True] = True
    models: list[ModelOut]


class HeadCell(Out):
    """One head of the head map."""

    head: int
    value: float
    url: str = Field(description="the head's page")


class HeadLayer(Out):
    layer: int
    source: str
    control: float | None = Field(description="the metric of uniform causal attention")
    heads: list[HeadCell]


class MetricLink(Out):
    name: str
    url: str = Field(description="the model page with its head map coloured by this metric")


class HeadMap(Out):
    metric: str
    metrics: list[MetricLink]
    layers: list[HeadLayer] = Field(description="the heads sources of the model, by layer")
    lo: float = Field(description="the smallest value on the map")
    hi: float = Field(description="the largest value on the map")


class ModelPage(Out):
    ok: Literal[True] = True
    model: ModelOut
    head_map: HeadMap | None = Field(None, description="its attention heads coloured by one "
                                     "metric (`?metric=`), where it has heads sources")


class SaeMetrics(Out):
    model_config = ConfigDict(extra="allow")
    l0: float | None = None
    variance_explained: float | None = None
    loss_recovered: float | None = None
    dead_fraction: float | None = None


class SourceDetail(SourceOut):
    sae_config: dict | None
    metrics: SaeMetrics | None = Field(description="SAE quality metrics, when the SAE has them")
    harvest_config: dict
    version_hash: str | None
    created_at: UtcTime
    finished_at: UtcTime | None
    dataset_info: DatasetOut


# ------------------------------------------------------------------ features


class TokenCount(Out):
    id: int
    text: str
    count: int


class TokenRef(Out):
    id: int
    text: str


class TokenValue(Out):
    id: int
    text: str
    value: float


class FeatureRow(Out):
    index: int
    max_act: float
    frac_active: float
    top_tokens: list[TokenCount]
    explanation: str | None = Field(description="its best explanation (the feature page's "
                                    "first)")
    url: str


class SourcePage(Out):
    ok: Literal[True] = True
    url: str = Field(description="this page: the source with its sort, order, limit and next")
    model: str
    source: SourceDetail
    sort: Literal["index", "max_act", "frac_active"]
    order: Literal["asc", "desc"]
    limit: int
    q: str | None = Field(description="only features with an explanation that matches this "
                          "full-text query (words, \"phrases\", -excluded, or)")
    features: list[FeatureRow]
    next: str | None = Field(description="opaque keyset token of the next page, or null")
    next_url: str | None


class FeatureStats(Out):
    max_act: float
    min_act: float
    mean_act: float
    std_act: float
    frac_active: float = Field(description="fraction of tokens with activation > 0")
    n_active: int
    n_tokens: int


class Histogram(Out):
    edges: list[float | None] = Field(
        description="HIST_BINS + 1 bin edges; the last is +inf, written null")
    counts: list[int] = Field(description="tokens per bin; bin 0 holds activations below 2**-10")


class ExampleOut(Out):
    rank: int
    seq_idx: int = Field(description="index of the sequence in the dataset")
    start: int = Field(description="position of the window's first token in the sequence")
    peak_pos: int = Field(description="position of the peak in the sequence")
    peak_index: int = Field(description="position of the peak in the window: peak_pos - start")
    peak_value: float = Field(description="the exact (float32) activation at the peak")
    token_ids: list[int]
    tokens: list[str]
    acts: list[float] = Field(description="activation at every window token: the shortest "
                              "decimal that reads back to the stored float16")


class QuantileGroup(Out):
    group: int = Field(description="0 for the lowest range of activations")
    name: str
    lo: float = Field(description="smallest peak value among the group's examples")
    hi: float = Field(description="largest peak value among the group's examples")
    examples: list[ExampleOut]


class FeatureLinks(Out):
    page: str
    json_url: str
    source: str
    prev: str | None
    next: str | None
    random: str
    neuronpedia: str = Field(description="the Neuronpedia-compatible JSON of this feature")


class FeaturePage(Out):
    ok: Literal[True] = True
    model: str
    source: str
    kind: str
    hook_name: str
    layer: int
    n_features: int
    dataset: str
    bos_first: bool = Field(description="sequences start with a BOS token; its activation is "
                            "left out of the statistics and is never a peak")
    index: int
    stats: FeatureStats
    histogram: Histogram
    top_logits: list[TokenValue]
    bottom_logits: list[TokenValue]
    top_tokens: list[TokenCount]
    top: list[ExampleOut]
    bottom: list[ExampleOut]
    quantiles: list[QuantileGroup] = Field(description="examples across the range, highest first")
    links: FeatureLinks
    related: FeatureRelated
    explanations: list[ExplanationOut] = Field(description="best first: by the highest score "
                                               "of a scorer not marked uninformative")
    scorers: list[ScorerJudgement] = Field(description="whether each scorer of these "
                                           "explanations beats its controls over the source")


# ------------------------------------------------------------------ live inference and search


class ActivationsIn(In):
    """One feature's activations on text of your own: give `text`, `texts` or `tokens`."""

    model: str = Field(max_length=128, examples=["smollm2-135m-instruct"])
    source: str = Field(max_length=128, examples=["6-mlp"])
    index: int = Field(ge=0, le=2**31 - 1)
    text: str | None = Field(None, description="tokenized like the corpus: BOS first when the "
                             "model has one")
    texts: list[str] | None = Field(None, description="several texts, answered in `results`")
    tokens: list[int] | None = Field(None, description="token ids, run exactly as given")


class TextActivations(Out):
    tokens: list[str]
    token_ids: list[int]
    values: list[float] = Field(description="the feature's float32 activation at every token")
    max_value: float = Field(description="the largest value, the BOS token left out")
    max_index: int = Field(description="where it is (the first such token)")


class ActivationsOut(Out):
    """Shaped like Neuronpedia's activation/new answer (tokens, values, max and where)."""

    ok: Literal[True] = True
    model: str
    source: str
    index: int
    bos_first: bool
    tokens: list[str] | None = None
    token_ids: list[int] | None = None
    values: list[float] | None = None
    max_value: float | None = None
    max_index: int | None = None
    results: list[TextActivations] | None = Field(None, description="one per text of `texts`")


class SearchIn(In):
    model: str = Field(max_length=128)
    text: str
    sources: list[str] | None = Field(None, description="source slugs; default: every live "
                                      "source of the model")
    top: int = Field(20, ge=1, le=200, description="features to return")
    per_token: int = Field(5, ge=0, le=50, description="top features listed for each token")


class SearchHit(Out):
    source: str
    index: int
    max_value: float = Field(description="its largest activation on the text")
    max_index: int = Field(description="at which token")
    max_act: float | None = Field(description="its largest activation over the corpus")
    relative: float | None = Field(description="max_value / max_act")
    values: list[float]
    url: str


class TokenHit(Out):
    source: str
    index: int
    value: float


class SearchOut(Out):
    ok: Literal[True] = True
    model: str
    sources: list[str]
    text: str
    bos_first: bool
    tokens: list[str]
    token_ids: list[int]
    features: list[SearchHit] = Field(description="ranked by max_value, highest first")
    per_token: list[list[TokenHit]] = Field(description="per token, its top features")
    url: str = Field(description="the search page of this query")


class TokenFeature(Out):
    source: str
    index: int
    token_id: int
    count: int = Field(description="how many of its top examples peak on the token")
    n_top: int = Field(description="how many top examples it has")
    max_act: float
    frac_active: float
    url: str


class TokenSearchOut(Out):
    ok: Literal[True] = True
    model: str
    query: str | None
    tokens: list[TokenRef] = Field(description="the token ids searched")
    features: list[TokenFeature] = Field(description="by count, then max_act, highest first")
    url: str
