"""The JSON contract of lists of features: featurescope's own (`/lists/{id}.json`,
`/api/v1/lists...`) and Neuronpedia's (`/api/list/...`, the shapes its Python client reads:
`ListRequest.new`, `add_items`, `get`, `get_owned`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from app.neuronpedia_schemas import NpActivation
from app.routes.deps import MAX_INDEX, SLUG_PATTERN
from app.schema_types import In, NpIn, UtcTime
from app.schemas import Out, TokenCount

NAME = Field(min_length=1, max_length=200, description="the list's name")
DESCRIPTION = Field("", max_length=10_000, description="what the list is about")
NOTE = Field("", max_length=10_000, description="a note on the feature, shown beside it")


class ListIn(In):
    name: str = NAME
    description: str = DESCRIPTION


class ListFeatureIn(In):
    model: str = Field(pattern=SLUG_PATTERN, max_length=128)
    source: str = Field(pattern=SLUG_PATTERN, max_length=128)
    index: int = Field(ge=0, le=MAX_INDEX)
    note: str = NOTE


class ListItemOut(Out):
    model: str
    source: str
    index: int
    note: str
    added_at: UtcTime
    url: str = Field(description="the feature's page")
    harvested: bool = Field(description="false when this server has no such feature (any more)")
    max_act: float | None
    frac_active: float | None
    top_tokens: list[TokenCount] = Field(description="the tokens its top examples peak on")


class ListOut(Out):
    """A list (`/lists/{id}.json`)."""

    ok: Literal[True] = True
    id: str
    name: str
    description: str
    owner: str | None = Field(description="the name of the key that made it, if one did")
    created_at: UtcTime
    updated_at: UtcTime
    url: str
    json_url: str
    features: list[ListItemOut]


class ListSummary(Out):
    id: str
    name: str
    description: str
    n_features: int
    created_at: UtcTime
    url: str


class ListsPage(Out):
    """The newest lists (`/lists.json`)."""

    ok: Literal[True] = True
    lists: list[ListSummary]


class ListDeleted(Out):
    ok: Literal[True] = True
    deleted: str


# ------------------------------------------------------------------ Neuronpedia's shapes


class NpListGetIn(NpIn):
    listId: str = Field(max_length=64)


class NpListNewIn(NpIn):
    name: str = NAME
    description: str = DESCRIPTION


class NpFeatureToAdd(NpIn):
    modelId: str = Field(pattern=SLUG_PATTERN, max_length=128)
    layer: str = Field(pattern=SLUG_PATTERN, max_length=128, description="the source")
    index: str | int
    description: str | None = Field(None, max_length=10_000, description="the note")


class NpAddFeaturesIn(NpIn):
    listId: str = Field(max_length=64)
    featuresToAdd: list[NpFeatureToAdd] = Field(max_length=1000)


class NpUser(Out):
    name: str


class NpListFeature(Out):
    """The feature of a list entry: a part of Neuronpedia's feature (its top 3 examples)."""

    modelId: str
    layer: str
    index: str
    sourceSetName: str
    hookName: str
    maxActApprox: float
    frac_nonzero: float
    activations: list[NpActivation]
    explanations: list[dict] = []


class NpListEntry(Out):
    """One of a list's `neurons` (Neuronpedia's ListsOnNeurons)."""

    modelId: str
    layer: str
    index: str
    listId: str
    description: str | None = Field(description="the note")
    addedAt: UtcTime
    userId: str | None
    neuron: NpListFeature | None = Field(description="null where this server has no such "
                                         "feature, or past the first 300 entries")


class NpList(Out):
    """A list, shaped like Neuronpedia's answer to POST /api/list/get (or /api/list/new,
    with no `neurons`)."""

    id: str
    name: str
    description: str
    defaultTestText: str | None = None
    userId: str | None
    createdAt: UtcTime
    updatedAt: UtcTime
    user: NpUser | None
    activations: list[dict] = []
    neurons: list[NpListEntry] = []
