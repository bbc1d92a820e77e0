"""The one place that builds the explorer's URLs. Views and templates call these; nothing else
glues paths together.

Canonical pages: `/`, `/{model}`, `/{model}/{source}`, `/{model}/{source}/{index}`, the
searches `/search` (by text), `/tokens` (by token) and `/search/explanations` (by meaning), and
the interventions `/steer` and `/patch`; each also answers as JSON with `.json` appended
(`json()` below). Actions that compute live under `/api/v1/`; the Neuronpedia-compatible
endpoints under Neuronpedia's own paths (`/api/feature/`, `/api/search-all`, `/api/steer`,
`/api/explanation/`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from urllib.parse import quote, urlencode

from app.db.queries import PAGE_SIZE, default_order

JSON_SUFFIX = ".json"


@lru_cache(maxsize=4096)
def _seg(text: str) -> str:
    return quote(text, safe="")


def _with_query(path: str, query: dict[str, object] | None) -> str:
    if not query:
        return path
    items = {k: v for k, v in query.items() if v is not None}
    return f"{path}?{urlencode(items)}" if items else path


def home() -> str:
    return "/"


def model(model: str, metric: str | None = None) -> str:
    """A model's page; `metric` colours its head map (induction, the default, left out)."""
    return _with_query(f"/{_seg(model)}", {"metric": None if metric == "induction" else metric})


def source(model: str, source: str, *, sort: str | None = None, order: str | None = None,
           limit: int | None = None, next: str | None = None, q: str | None = None) -> str:
    """The feature list of a source: sorted, ordered and cut into pages as asked, and `next`,
    the page after a keyset token; `q`, only the features with an explanation that matches.
    A setting at its default is left out: one list, one URL."""
    sort = sort or "index"
    return _with_query(f"/{_seg(model)}/{_seg(source)}", {
        "sort": None if sort == "index" else sort,
        "order": None if order == default_order(sort) else order,
        "limit": None if limit == PAGE_SIZE else limit, "q": q or None, "next": next})


def compare(model_a: str, source_a: str, model_b: str, source_b: str) -> str:
    """The comparison of two matched sources (`featurescope match`)."""
    return f"/compare/{_seg(model_a)}/{_seg(source_a)}/{_seg(model_b)}/{_seg(source_b)}"


def feature(model: str, source: str, index: int) -> str:
    return f"/{_seg(model)}/{_seg(source)}/{int(index)}"


def try_text(model: str, source: str, index: int, text: str | None = None) -> str:
    """A feature page with its activations on a text of the user's (live inference)."""
    return _with_query(f"{feature(model, source, index)}/try", {"text": text})


def search(model: str | None = None, text: str | None = None,
           sources: list[str] | None = None) -> str:
    """The features that fire most on a text (live inference); the query is the search."""
    return _with_query("/search", {"model": model, "text": text,
                                   "sources": ",".join(sources) if sources else None})


def token_search(model: str | None = None, token: str | None = None,
                 token_id: int | None = None) -> str:
    """The features whose top examples peak on a token (from the harvest)."""
    return _with_query("/tokens", {"model": model, "token": token, "id": token_id})


def _number(x: float) -> str:
    """A float as its shortest decimal, without a trailing '.0'."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def steer(model: str | None = None, prompt: str | None = None,
          features: Sequence[tuple[str, int, float]] = (), **settings: object) -> str:
    """The steer page holding a whole request (opening it runs nothing): one
    `f=SOURCE:INDEX:STRENGTH` per feature, then the settings given (method, normalize, n_tokens,
    temperature, seed, top_logprobs, freq_penalty); booleans read 1 or 0."""
    query: list[tuple[str, object]] = [("model", model), ("prompt", prompt)]
    query += [("f", f"{s}:{int(i)}:{_number(x)}") for s, i, x in features]
    query += [(k, int(v) if isinstance(v, bool) else v) for k, v in settings.items()]
    items = [(k, v) for k, v in query if v is not None]
    return f"/steer?{urlencode(items)}" if items else "/steer"


def patch(model: str | None = None, clean: str | None = None, corrupted: str | None = None,
          answer: str | None = None, wrong: str | None = None,
          kinds: Sequence[str] | None = None) -> str:
    """The patch page holding a whole request (opening it runs nothing)."""
    return _with_query("/patch", {"model": model, "clean": clean, "corrupted": corrupted,
                                  "answer": answer, "wrong": wrong,
                                  "kinds": ",".join(kinds) if kinds else None})


def effect(model: str, source: str, index: int) -> str:
    """Where a feature page's effect box posts (ablation on a text, or its top examples)."""
    return f"{feature(model, source, index)}/effect"


def steer_api() -> str:
    return "/api/v1/steer"


def patch_api() -> str:
    return "/api/v1/patch"
def explanation_search(q: str | None = None, model: str | None = None,
                       sources: list[str] | None = None, offset: int | None = None) -> str:
    """Search by meaning over the explanations (of a model, of some of its sources)."""
    return _with_query("/search/explanations", {
        "q": q or None, "model": model or None,
        "sources": ",".join(sources) if sources else None, "offset": offset or None})


def json(url: str) -> str:
    """The JSON twin of a page URL: `.json` appended to the path, the query kept (`/.json` for
    the home page)."""
    path, sep, query = url.partition("?")
    return f"{path}{JSON_SUFFIX}{sep}{query}"


def random_feature(model: str, source: str) -> str:
    """Redirects to a random feature of the source (it computes, so it lives under /api/v1/)."""
    return f"/api/v1/random/{_seg(model)}/{_seg(source)}"


def neuronpedia_feature(model: str, source: str, index: int) -> str:
    return f"/api/feature/{_seg(model)}/{_seg(source)}/{int(index)}"


def static(path: str, version: str | None = None) -> str:
    return _with_query(f"/static/{path}", {"v": version} if version else None)


def docs() -> str:
    return "/docs"


def openapi() -> str:
    return "/openapi.json"


def lists() -> str:
    """The newest lists of features, and the form that makes one."""
    return "/lists"


def feature_list(list_id: str) -> str:
    """One list of features (shared by its link)."""
    return f"/lists/{_seg(list_id)}"


def list_add(model: str, source: str, index: int) -> str:
    """The form that puts a feature on a list, with a note."""
    return _with_query("/lists/add", {"model": model, "source": source, "index": int(index)})


def list_remove(list_id: str) -> str:
    return f"{feature_list(list_id)}/remove"
