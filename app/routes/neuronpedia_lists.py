"""Neuronpedia's list endpoints, over featurescope's lists (`app.routes.lists`), in the shapes
Neuronpedia's webapp answers (its `getListWithDetails`: the list, its user, and its `neurons`,
the ListsOnNeurons rows oldest first, each with its feature and that feature's top 3
activations, for the first 300) and its Python client reads (`ListRequest`):

- `POST /api/list/get` `{"listId"}`: a list (open, like every read);
- `POST /api/list/new` `{"name", "description"}`: a new list (`write` scope);
- `POST /api/list/add-features` `{"listId", "featuresToAdd": [{"modelId", "layer", "index",
  "description"}]}`: the entries added (`write` scope);
- `POST /api/list/list`: the lists of the key that calls (without a key: those made without one).

Neuronpedia's `userId` and `user.name` are the name of the key that made the list. Each path
also answers with a trailing slash, without a redirect."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from sqlalchemy.orm import Session

from app.db import lists as store
from app.db import queries
from app.db.tables import ApiKey, FeatureList, ListFeature
from app.list_schemas import (
    NpAddFeaturesIn,
    NpList,
    NpListEntry,
    NpListFeature,
    NpListGetIn,
    NpListNewIn,
    NpUser,
)
from app.neuronpedia_schemas import source_set_name
from app.routes.access import sender
from app.routes.deps import MAX_INDEX, checked, invalid, read_db
from app.routes.errors import documented
from app.routes.features import build_feature
from app.routes.lists import ListFeatureIn, ListIn, Writer, add, create, load_list
from app.routes.neuronpedia import np_activations

router = APIRouter(prefix="/api/list")

DETAILED = 300
"""Entries answered with their feature (Neuronpedia stops at 300 too)."""
TOP = 3
"""Top activations answered per feature."""


def _post(path: str, **kwargs):
    """Register a POST at `path` and at `path/`, only the first in the OpenAPI description."""
    def register(view):
        router.add_api_route(path, view, methods=["POST"], **kwargs)
        router.add_api_route(path + "/", view, methods=["POST"], include_in_schema=False,
                             **kwargs)
        return view

    return register


def _owner(session: Session, lst: FeatureList) -> str | None:
    return session.get(ApiKey, lst.key_id).name if lst.key_id is not None else None


def _feature(session: Session, vocabs: queries.VocabCache, model: str, source: str,
             index: int) -> NpListFeature | None:
    src = queries.source_by_slug(session, model=model, source=source)
    if src is None or src.status != "ready" or index >= src.n_features:
        return None
    ctx = build_feature(session, vocabs, src, index)
    return NpListFeature(modelId=ctx.model, layer=ctx.source, index=str(ctx.index),
                         sourceSetName=source_set_name(ctx.source), hookName=ctx.hook_name,
                         maxActApprox=ctx.stats.max_act, frac_nonzero=ctx.stats.frac_active,
                         activations=np_activations(ctx)[:TOP])


def np_list(session: Session, vocabs: queries.VocabCache | None, lst: FeatureList) -> NpList:
    """A list in Neuronpedia's shape; with `vocabs`, its entries too."""
    owner = _owner(session, lst)
    neurons = []
    if vocabs is not None:
        for i, e in enumerate(store.items(session, list_id=lst.id)):
            neurons.append(NpListEntry(
                modelId=e.model, layer=e.source, index=str(e.feature_idx), listId=lst.id,
                description=e.note, addedAt=e.added_at, userId=owner,
                neuron=_feature(session, vocabs, e.model, e.source, e.feature_idx)
                if i < DETAILED else None))
    return NpList(id=lst.id, name=lst.name, description=lst.description, userId=owner,
                  createdAt=lst.created_at, updatedAt=lst.updated_at,
                  user=NpUser(name=owner) if owner else None, neurons=neurons)


@_post("/get", response_model=NpList, responses=documented(404, 413, 422),
       summary="A list with its features, shaped like Neuronpedia's /api/list/get")
async def get_list(request: Request, body: NpListGetIn):
    return await read_db(request, lambda s: np_list(s, request.app.state.vocabs,
                                                    load_list(s, body.listId)))


@_post("/new", response_model=NpList, responses=documented(413, 422),
       summary="Make a list, like Neuronpedia's /api/list/new")
async def new_list(request: Request, caller: Writer, body: NpListNewIn):
    new = checked(ListIn, name=body.name, description=body.description)
    return await read_db(request, lambda s: np_list(s, None, create(s, caller, new)))


def _index(value: str | int) -> int:
    try:
        index = int(value)
    except ValueError:
        raise invalid(f"index must be an integer, got {value!r}") from None
    if not 0 <= index <= MAX_INDEX:
        raise invalid(f"index must be 0 to {MAX_INDEX}, got {index}")
    return index


@_post("/add-features", response_model=list[NpListEntry], responses=documented(404, 413, 422),
       summary="Put features on a list, like Neuronpedia's /api/list/add-features")
async def add_features(request: Request, caller: Writer, body: NpAddFeaturesIn):
    items = [checked(ListFeatureIn, model=f.modelId, source=f.layer, index=_index(f.index),
                     note=f.description or "") for f in body.featuresToAdd]

    def run(session: Session) -> list[NpListEntry]:
        lst = load_list(session, body.listId)
        owner = _owner(session, lst)
        out = []
        for item in items:
            add(session, request, caller, lst.id, item)
            entry = session.get(ListFeature, (lst.id, item.model, item.source, item.index))
            out.append(NpListEntry(modelId=item.model, layer=item.source, index=str(item.index),
                                   listId=lst.id, description=entry.note,
                                   addedAt=entry.added_at, userId=owner, neuron=None))
        return out

    if not items:
        raise HTTPException(422, "featuresToAdd is empty")
    return await read_db(request, run)


@_post("/list", response_model=list[NpList], responses=documented(413, 422),
       summary="The lists of the key that calls, like Neuronpedia's /api/list/list")
async def owned_lists(request: Request):
    key = await sender(request)
    return await read_db(request, lambda s: [
        np_list(s, None, lst) for lst, _ in store.recent(s, key_id=key.id if key else None,
                                                          owned=True)])
