"""Lists of features with a note per feature: `/lists` (the newest, and a form to make one),
`/lists/{id}` (one list, shared by its link; `.json` twins), `/lists/add?model=&source=&index=`
(put a feature on a list, from its page), and the same under `/api/v1/lists` for scripts.

Reading a list is open like any page; making or changing one needs the `write` scope. A list
made with a key is changed only with that key or an admin one (or from loopback)."""

from __future__ import annotations

from collections import defaultdict
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ConfigDict, Field
from sqlalchemy.orm import Session

from app import urls
from app.db import lists as store
from app.db import queries
from app.db.tables import ApiKey, FeatureList
from app.keys import Scope
from app.list_schemas import (
    DESCRIPTION,
    NAME,
    NOTE,
    ListDeleted,
    ListFeatureIn,
    ListIn,
    ListItemOut,
    ListOut,
    ListsPage,
    ListSummary,
)
from app.routes.access import Caller, requires
from app.routes.deps import (
    MAX_INDEX,
    SLUG_PATTERN,
    FeatureIndex,
    ModelSlug,
    SessionDep,
    SourceSlug,
    checked,
    not_found,
    read_db,
)
from app.routes.errors import documented
from app.routes.forms import read_form
from app.routes.render import page, render
from app.schema_types import In
from app.schemas import TokenCount

router = APIRouter()

ListId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,32}$", description="the list's id")]
Writer = Annotated[Caller, requires(Scope.write)]
ERRORS = documented(404, 413, 422)


# ------------------------------------------------------------------ reading


def load_list(session: Session, list_id: str) -> FeatureList:
    lst = store.get_list(session, list_id=list_id)
    if lst is None:
        raise not_found(f"no list {list_id!r}")
    return lst


def build_list(session: Session, vocabs: queries.VocabCache, lst: FeatureList) -> ListOut:
    """A list with what this server knows of each of its features."""
    entries = store.items(session, list_id=lst.id)
    by_source: dict[tuple[str, str], list[int]] = defaultdict(list)
    for e in entries:
        by_source[e.model, e.source].append(e.feature_idx)
    known, texts = {}, {}
    for (model, source), indices in by_source.items():
        src = queries.source_by_slug(session, model=model, source=source)
        if src is None:
            continue
        rows = store.feature_rows(session, source_id=src.id, indices=indices)
        known.update({(model, source, i): r for i, r in rows.items()})
        if model not in texts:
            texts[model] = vocabs.get(session, model_id=src.model_id,
                                      tokenizer_hash=src.tokenizer_hash).text
    features = []
    for e in entries:
        row = known.get((e.model, e.source, e.feature_idx))
        features.append(ListItemOut(
            model=e.model, source=e.source, index=e.feature_idx, note=e.note,
            added_at=e.added_at, url=urls.feature(e.model, e.source, e.feature_idx),
            harvested=row is not None, max_act=row.max_act if row else None,
            frac_active=row.frac_active if row else None,
            top_tokens=[TokenCount(id=t, text=texts[e.model](t), count=c)
                        for t, c in row.top_tokens] if row else []))
    owner = session.get(ApiKey, lst.key_id).name if lst.key_id is not None else None
    url = urls.feature_list(lst.id)
    return ListOut(id=lst.id, name=lst.name, description=lst.description, owner=owner,
                   created_at=lst.created_at, updated_at=lst.updated_at, url=url,
                   json_url=urls.json(url), features=features)


@page(router, "/lists", name="lists", schema=ListsPage, summary="The newest lists of features")
def lists_page(request: Request, session: SessionDep):
    ctx = ListsPage(lists=[ListSummary(id=lst.id, name=lst.name, description=lst.description,
                                       n_features=n, created_at=lst.created_at,
                                       url=urls.feature_list(lst.id))
                           for lst, n in store.recent(session)])
    return render(request, ctx, template="lists.html")


@router.get("/lists/add", include_in_schema=False)
def add_page(request: Request, session: SessionDep,
             model: Annotated[str, Query(pattern=SLUG_PATTERN)],
             source: Annotated[str, Query(pattern=SLUG_PATTERN)],
             index: Annotated[int, Query(ge=0, le=MAX_INDEX)]):
    """The form that puts a feature on a list (a new one, or one of the newest)."""
    ctx = {"model": model, "source": source, "index": index,
           "lists": [lst for lst, _ in store.recent(session)]}
    return request.app.state.templates.TemplateResponse(request, "list_add.html", {"ctx": ctx})


@page(router, "/lists/{list_id}", name="list", schema=ListOut,
      summary="A list of features with a note per feature")
def list_page(request: Request, session: SessionDep, list_id: ListId):
    ctx = build_list(session, request.app.state.vocabs, load_list(session, list_id))
    return render(request, ctx, template="list.html")


# ------------------------------------------------------------------ writing


def _may_change(caller: Caller, request: Request, lst: FeatureList) -> None:
    if lst.key_id is None or (caller.key is not None and caller.key.id == lst.key_id):
        return
    if not caller.may(Scope.admin, request.app.state.access):
        raise HTTPException(403, f"the list {lst.name!r} was made with another key: only that "
                                 "key or an admin key may change it")


def _feature_exists(session: Session, model: str, source: str, index: int) -> None:
    src = queries.source_by_slug(session, model=model, source=source)
    if src is None:
        raise not_found(f"no source {model}/{source}")
    if src.status == "ready" and index >= src.n_features:
        raise not_found(f"{model}/{source} has no feature {index}: it has features 0 to "
                        f"{src.n_features - 1}")


def create(session: Session, caller: Caller, body: ListIn) -> FeatureList:
    return store.create_list(session, name=body.name, description=body.description,
                             key_id=caller.key.id if caller.key else None)


def add(session: Session, request: Request, caller: Caller, list_id: str, item: ListFeatureIn
        ) -> FeatureList:
    lst = load_list(session, list_id)
    _may_change(caller, request, lst)
    _feature_exists(session, item.model, item.source, item.index)
    try:
        store.add_feature(session, lst=lst, model=item.model, source=item.source,
                          index=item.index, note=item.note)
    except store.ListFull as exc:
        raise HTTPException(422, str(exc)) from None
    return lst


def remove(session: Session, request: Request, caller: Caller, list_id: str, model: str,
           source: str, index: int) -> FeatureList:
    lst = load_list(session, list_id)
    _may_change(caller, request, lst)
    if not store.remove_feature(session, lst=lst, model=model, source=source, index=index):
        raise not_found(f"{model}/{source}/{index} is not on the list {lst.name!r}")
    return lst


def _json(request: Request, session: Session, lst: FeatureList, status: int = 200) -> Response:
    out = build_list(session, request.app.state.vocabs, lst)
    return Response(out.model_dump_json(), status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store", "Location": out.url})


@router.post("/api/v1/lists", status_code=201, response_model=ListOut, responses=ERRORS,
             summary="Make a list of features")
async def create_api(request: Request, caller: Writer, body: ListIn):
    return await read_db(request, lambda s: _json(request, s, create(s, caller, body), 201))


@router.post("/api/v1/lists/{list_id}/features", response_model=ListOut, responses=ERRORS,
             summary="Put a feature on a list with a note (a feature already there: the note)")
async def add_api(request: Request, caller: Writer, list_id: ListId, body: ListFeatureIn):
    return await read_db(request, lambda s: _json(request, s, add(s, request, caller, list_id,
                                                                  body)))


@router.delete("/api/v1/lists/{list_id}/features/{model}/{source}/{index}",
               response_model=ListOut, responses=ERRORS, summary="Take a feature off a list")
async def remove_api(request: Request, caller: Writer, list_id: ListId, model: ModelSlug,
                     source: SourceSlug, index: FeatureIndex):
    return await read_db(request, lambda s: _json(
        request, s, remove(s, request, caller, list_id, model, source, index)))


@router.delete("/api/v1/lists/{list_id}", response_model=ListDeleted, responses=ERRORS,
               summary="Delete a list")
async def delete_api(request: Request, caller: Writer, list_id: ListId):
    def run(session: Session) -> ListDeleted:
        lst = load_list(session, list_id)
        _may_change(caller, request, lst)
        store.delete_list(session, lst=lst)
        return ListDeleted(deleted=list_id)

    return await read_db(request, run)


# ------------------------------------------------------------------ the forms


class NewListForm(In):
    model_config = ConfigDict(extra="ignore")
    name: str = NAME
    description: str = DESCRIPTION


class AddForm(In):
    """Put a feature on the list `list`, or on a new list named `new_list`."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(max_length=128)
    source: str = Field(max_length=128)
    index: int = Field(ge=0, le=MAX_INDEX)
    note: str = NOTE
    list: str = Field("", max_length=32)
    new_list: str = Field("", max_length=200)


class RemoveForm(In):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(max_length=128)
    source: str = Field(max_length=128)
    index: int = Field(ge=0, le=MAX_INDEX)


def _to(lst: FeatureList) -> RedirectResponse:
    return RedirectResponse(urls.feature_list(lst.id), status_code=303)


@router.post("/lists", include_in_schema=False)
async def create_form(request: Request, caller: Writer):
    form = await read_form(request, NewListForm)
    return _to(await read_db(request, create, caller, checked(ListIn, **form.model_dump())))


@router.post("/lists/add", include_in_schema=False)
async def add_form(request: Request, caller: Writer):
    form = await read_form(request, AddForm)
    item = checked(ListFeatureIn, model=form.model, source=form.source, index=form.index,
                   note=form.note)

    def run(session: Session) -> FeatureList:
        list_id = form.list
        if form.new_list.strip():
            _feature_exists(session, item.model, item.source, item.index)
            list_id = create(session, caller, checked(ListIn, name=form.new_list.strip())).id
        elif not list_id:
            raise HTTPException(422, "choose a list, or name a new one")
        return add(session, request, caller, list_id, item)

    return _to(await read_db(request, run))


@router.post("/lists/{list_id}/remove", include_in_schema=False)
async def remove_form(request: Request, caller: Writer, list_id: ListId):
    form = await read_form(request, RemoveForm)
    return _to(await read_db(request, remove, request, caller, list_id, form.model,
                             form.source, form.index))
