"""app/urls.py: a feature list has one URL, whatever default settings a link spells out, and
the page size and default orders that URL leaves out are the ones the list uses."""

from __future__ import annotations

import html
import re

from app.db.queries import PAGE_SIZE
from app.schemas import SourcePage


def _json(client, url) -> SourcePage:
    r = client.get(url)
    assert r.status_code == 200, (url, r.text[:300])
    return SourcePage.model_validate_json(r.content)


def test_a_list_spelled_with_its_defaults_has_the_bare_url(client, web_db):
    base = f"/{web_db.gpt2}/0-mlp"  # 256 neurons: more than a page
    bare = _json(client, base + ".json")
    spelled = _json(client, f"{base}.json?sort=index&order=asc&limit={PAGE_SIZE}")
    assert bare.url == spelled.url == base
    assert bare.limit == PAGE_SIZE and bare.source.n_features > PAGE_SIZE
    assert [f.index for f in bare.features] == list(range(PAGE_SIZE))
    assert bare.next_url == spelled.next_url == f"{base}?next={bare.next}"
    by_max = _json(client, f"{base}.json?sort=max_act&order=desc&limit=7")
    assert by_max.order == "desc" and by_max.url == f"{base}?sort=max_act&limit=7"
    assert by_max.next_url == f"{base}?sort=max_act&limit=7&next={by_max.next}"
    assert _json(client, f"{base}.json?order=desc").url == f"{base}?order=desc"


def test_sort_links_name_only_what_differs_from_the_defaults(client, web_db):
    base = f"/{web_db.llama}/1-mlp"
    r = client.get(f"{base}?sort=max_act&limit={PAGE_SIZE}")
    links = {html.unescape(h) for h in re.findall(r'<th[^>]*><a href="([^"]+)"', r.text)}
    # index and density in their default orders; the active column toggles to ascending
    assert links == {base, f"{base}?sort=max_act&order=asc", f"{base}?sort=frac_active"}
