"""The feature page's related features on SQLite and PostgreSQL: every list against a brute-force
computation from the model (cosine of output directions, Jaccard and Pearson over every token),
with the other feature's best explanation (as text) and its link, on the page and its JSON."""

from __future__ import annotations

import pytest
import torch
from explanation_data import SCRIPT, _explanation, source_id
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from support import assert_lists_close, brute_acts, brute_cofiring, brute_lists

from app.config import Settings
from app.main import create_app
from app.schemas import FeaturePage


@pytest.fixture(scope="module")
def client(llama_db):
    app = create_app(Settings(database_url=llama_db.url), engine=llama_db.engine)
    with TestClient(app) as c:
        yield c


def related_of(client, model: str, source: str, index: int):
    r = client.get(f"/{model}/{source}/{index}.json")
    assert r.status_code == 200
    return FeaturePage.model_validate_json(r.content).related


@pytest.mark.parametrize("slug", ["1-mlp", "1-res-sae-48"])
def test_related_lists_equal_brute_force(client, llama_db, harvests, slug):
    h = harvests[0]
    spec = next(s for s in h.specs if s.slug == slug)
    _, jac, pear = brute_cofiring(brute_acts(h.lm, h.dataset.tokens, spec))
    dirs = {s.slug: s.directions().double() for s in h.specs}
    unit = {k: d / d.norm(dim=1, keepdim=True) for k, d in dirs.items()}
    cos = unit[slug] @ unit[slug].T
    peers = [s.slug for s in h.specs if s.slug != slug and s.n_features == spec.n_features]
    across = torch.cat([unit[slug] @ unit[p].T for p in peers], dim=1) if peers else None
    want = {"cosine": (brute_lists(cos), cos), "pearson": (brute_lists(pear), pear),
            "jaccard": (brute_lists(jac, positive=True), jac)}
    for i in (0, 5, spec.n_features - 1):
        rel = related_of(client, llama_db.llama, slug, i)
        for key, (lists, values) in want.items():
            got = getattr(rel, key)
            assert all((g.model, g.source) == (llama_db.llama, slug) for g in got)
            assert all(g.url == f"/{llama_db.llama}/{slug}/{g.index}" for g in got)
            assert_lists_close([[(g.index, g.value) for g in got]], [lists[i]], values[i:i + 1],
                               rel=1e-4)
        if across is None:
            assert rel.cosine_across == []
        else:
            n = spec.n_features
            got = [(peers.index(g.source) * n + g.index, g.value) for g in rel.cosine_across]
            assert_lists_close([got], [brute_lists(across, self_too=True)[i]],
                               across[i:i + 1], rel=1e-5)
        assert rel.match == []


def test_related_entries_carry_their_explanation_as_text(client, llama_db):
    model = llama_db.llama
    rel = related_of(client, model, "1-mlp", 0)
    other = rel.jaccard[0] if rel.jaccard else rel.cosine[0]
    with Session(llama_db.engine) as session, session.begin():
        _explanation(session, source_id(session, model, "1-mlp"), other.index, SCRIPT, "human")
    again = related_of(client, model, "1-mlp", 0)
    shown = [g for g in again.jaccard + again.cosine + again.pearson if g.index == other.index]
    assert shown and all(g.explanation == SCRIPT for g in shown)
    assert all(g.explanation is None for g in again.cosine if g.index != other.index)
    html = client.get(f"/{model}/1-mlp/0").text
    section = html[html.index('id="related"'):]
    assert f'href="/{model}/1-mlp/{other.index}"' in section
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in section
    assert "<script>window.__pwned" not in html
    assert 'id="related-jaccard"' in section and 'id="related-pearson"' in section


def test_a_feature_without_relations_says_so(client, llama_db):
    from sqlalchemy import delete

    from app.db.tables import Relation

    model = llama_db.llama
    with Session(llama_db.engine) as session, session.begin():
        sid = source_id(session, model, "1-res-sae-48")
        session.execute(delete(Relation).where(Relation.source_id == sid,
                                               Relation.feature_idx == 2))
    rel = related_of(client, model, "1-res-sae-48", 2)
    assert rel.model_dump() == {k: [] for k in rel.model_dump()}
    assert "No related features stored" in client.get(f"/{model}/1-res-sae-48/2").text
