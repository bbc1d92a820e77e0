"""The JSON of the Neuronpedia-compatible endpoints (`app.routes.neuronpedia`,
`app.routes.neuronpedia_live`): request bodies and answers in the shapes of Neuronpedia's own
(its webapp routes under apps/webapp/app/api/ and its Prisma schema), with the keys its Python
client (PyPI `neuronpedia`) reads. Names are Neuronpedia's (camelCase, `layer` for a source)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from app.explanation_schemas import NpExplanation
from app.model_queue import MAX_TEXT_CHARS
from app.schema_types import NpIn
from app.schemas import Out

Slug = Annotated[str, Field(max_length=128)]
Texts = str | list[str]


def source_set_name(source: str) -> str:
    """Neuronpedia's source set of a source: what follows the first '-' ('6-res-sae-4k' ->
    'res-sae-4k'), as its getSourceSetNameFromSource and its client's split('-', 1) say."""
    return source.split("-", 1)[1] if "-" in source else source


def _check_texts(texts: Texts) -> Texts:
    many = [texts] if isinstance(texts, str) else texts
    if not many:
        raise ValueError("give at least one text")
    if any(len(t) > MAX_TEXT_CHARS for t in many):
        raise ValueError(f"a text is longer than {MAX_TEXT_CHARS:,} characters")
    return texts


def _density_threshold(value: float) -> float:
    """Neuronpedia's densityThreshold: 0 and -1 mean none; any other value must be in (0, 1)."""
    if value in (0, -1):
        return -1
    if not 0 < value < 1:
        raise ValueError("densityThreshold must be between 0 and 1 (or -1 for none)")
    return value


# ------------------------------------------------------------------ GET /api/feature/...


class NpActivation(Out):
    """One stored example, shaped like a row of Neuronpedia's Activation table, with `source`
    (the client reads it) beside `layer`."""

    id: str
    modelId: str
    layer: str
    source: str
    index: str
    dataIndex: str | None
    tokens: list[str]
    values: list[float]
    maxValue: float
    maxValueTokenIndex: int
    minValue: float
    binMin: float = Field(description="the smallest peak among the examples of its group")
    binMax: float = Field(description="the largest peak among the examples of its group")
    binContains: float = Field(
        description="the fraction of the feature's sampled firing sequences whose peak lies in "
        "[binMin, binMax] (all of them when fewer fired than the sample holds)")
    qualifyingTokenIndex: int | None = None
    dfaValues: list[float] = []
    lossValues: list[float] = []


class NpModel(Out):
    """A model, shaped like a row of Neuronpedia's Model table."""

    id: str
    displayName: str
    layers: int
    dimension: int
    neuronsPerLayer: int


class NpSource(Out):
    """A source, shaped like a row of Neuronpedia's Source table."""

    id: str
    modelId: str
    setName: str
    hookName: str
    hasDashboards: bool
    inferenceEnabled: bool = Field(description="served live (`serve --live`)")
    dataset: str
    num_prompts: int | None
    num_tokens_in_prompt: int | None


class NpFeature(Out):
    """A feature shaped like the answer of Neuronpedia's GET /api/feature/{model}/{source}/{index}
    (its Neuron row with its model, source and activations)."""

    modelId: str
    layer: str
    index: str
    sourceSetName: str
    hookName: str
    model: NpModel
    source: NpSource
    maxActApprox: float
    frac_nonzero: float
    pos_str: list[str]
    pos_values: list[float]
    neg_str: list[str]
    neg_values: list[float]
    freq_hist_data_bar_heights: list[float]
    freq_hist_data_bar_values: list[float]
    logits_hist_data_bar_heights: list[float] = []
    logits_hist_data_bar_values: list[float] = []
    activations: list[NpActivation] = Field(description="by maxValue, highest first")
    explanations: list[NpExplanation] = []
    hasVector: bool = False
    vector: list[float] = []
    topkCosSimIndices: list[int] = []
    topkCosSimValues: list[float] = []
    neuron_alignment_indices: list[int] = []
    neuron_alignment_values: list[float] = []
    correlated_neurons_indices: list[int] = []
    correlated_neurons_pearson: list[float] = []
    correlated_features_indices: list[int] = []
    correlated_features_pearson: list[float] = []
    decoder_weights_dist: list[float] = []


class NpSourceSet(Out):
    """GET /api/source-set/{model}/{name}: a set of sources, one per layer."""

    name: str
    modelId: str
    description: str
    type: str
    creatorName: str
    urls: list[str]
    sources: list[NpSource] = Field(description="by layer")


# ------------------------------------------------------------------ live: activation/...


class NpFeatureRef(NpIn):
    """A feature as Neuronpedia's routes take it: `layer` or `source`, `index` as a string."""

    modelId: Slug
    layer: str | None = Field(None, max_length=128)
    source: str | None = Field(None, max_length=128)
    index: str | int

    @model_validator(mode="after")
    def _named(self) -> NpFeatureRef:
        if not (self.layer or self.source):
            raise ValueError("give the feature's layer (or source)")
        return self

    @property
    def slug(self) -> str:
        return self.layer or self.source  # Neuronpedia: layer, else source

    @field_validator("index")
    @classmethod
    def _index(cls, value: str | int) -> str | int:
        try:
            index = int(value)
        except ValueError:
            raise ValueError(f"index must be an integer, got {value!r}") from None
        if not 0 <= index < 2**31:
            raise ValueError(f"index must be between 0 and {2**31 - 1}")
        return value

    @property
    def number(self) -> int:
        return int(self.index)


class NpActivationNewIn(NpIn):
    """The body of Neuronpedia's POST /api/activation/new (`neuron` before `feature`)."""

    feature: NpFeatureRef | None = None
    neuron: NpFeatureRef | None = None
    customText: Texts
    ignoreBos: bool = Field(False, description="leave out the leading BOS token and its value")

    check_texts = field_validator("customText")(_check_texts)

    @model_validator(mode="after")
    def _one(self) -> NpActivationNewIn:
        if self.neuron is None and self.feature is None:
            raise ValueError("give the feature")
        return self

    @property
    def ref(self) -> NpFeatureRef:
        return self.neuron or self.feature


class NpLiveActivation(Out):
    """A feature's activations on a text, shaped like the Activation Neuronpedia answers."""

    modelId: str
    layer: str
    source: str
    index: str
    tokens: list[str]
    values: list[float]
    maxValue: float = Field(description="the largest of `values` (the BOS token's included "
                            "unless ignoreBos)")
    maxValueTokenIndex: int
    minValue: float
    dataIndex: None = None
    dataSource: str = "featurescope"


class NpSourceActivationsIn(NpIn):
    """The body of Neuronpedia's POST /api/activation/source."""

    modelId: Slug
    source: Slug
    customText: Texts

    check_texts = field_validator("customText")(_check_texts)


class NpActiveFeatures(Out):
    tokens: list[str]
    activeFeatures: dict[str, list[tuple[int, float]]] = Field(
        description="feature index -> [token position, value] for every non-zero value, the "
        "BOS position left out")


class NpSourceActivationsOut(Out):
    results: list[NpActiveFeatures] = Field(description="one per text")


# ------------------------------------------------------------------ live: searches


class NpNeuron(Out):
    """What a search result says of its feature (from the harvest)."""

    modelId: str
    layer: str
    index: str
    maxActApprox: float
    frac_nonzero: float


class NpSearchAllIn(NpIn):
    """The body of Neuronpedia's POST /api/search-all."""

    modelId: Slug
    sourceSet: Slug
    text: Texts
    selectedLayers: list[str] = Field([], max_length=200,
                                      description="sources of the set; [] for all of them")
    sortIndexes: list[int] = Field([], max_length=1024, description="rank by the sum of the "
                                   "values at these token positions; [] for the max")
    ignoreBos: bool = True
    densityThreshold: float = -1
    numResults: int = Field(50, ge=1, le=100)

    check_texts = field_validator("text")(_check_texts)
    check_density = field_validator("densityThreshold")(_density_threshold)


class NpSearchHit(Out):
    modelId: str
    layer: str
    index: str
    maxValue: float
    maxValueIndex: int
    values: list[float]
    neuron: NpNeuron | None


class NpSearchAllOut(Out):
    tokens: list[str]
    result: list[NpSearchHit]
    counts: list[list[float]] = []
    sortIndexes: list[int]


class NpSearchAllBatch(Out):
    results: list[NpSearchAllOut] = Field(description="one per text")


class NpTopkIn(NpIn):
    """The body of Neuronpedia's POST /api/search-topk-by-token."""

    modelId: Slug
    source: Slug
    text: Texts
    numResults: int = Field(10, ge=1, le=20)
    ignoreBos: bool = True
    densityThreshold: float = 0.01

    check_texts = field_validator("text")(_check_texts)
    check_density = field_validator("densityThreshold")(_density_threshold)


class NpTopFeature(Out):
    activationValue: float
    featureIndex: int
    feature: NpNeuron | None


class NpTokenTop(Out):
    position: int = Field(description="the token's position in the text, BOS first")
    token: str
    isSpecial: bool
    topFeatures: list[NpTopFeature] = Field(description="by activationValue, highest first")


class NpTopkOut(Out):
    source: str
    results: list[NpTokenTop]


class NpTopkBatch(Out):
    results: list[NpTopkOut] = Field(description="one per text")
