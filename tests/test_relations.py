"""Related features against brute force on tiny real models: cosine lists of output directions,
Jaccard and Pearson lists from the co-firing statistics (shards merged in either order), and
the relations table written by a harvest, up and down its migration."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import inspect, select
from support import assert_lists_close, brute_acts, brute_cofiring, brute_lists, random_sae

from app.db.engine import make_engine, transaction, upgrade
from app.db.tables import Relation, Source
from workers.corpus import load_dataset
from workers.harvest import HarvestConfig, Harvester, neuron_sources, run_harvest
from workers.loading import load_model
from workers.relations import (
    MAX_COFIRING_FEATURES,
    N_RELATED,
    best,
    cofiring_rows,
    direction_rows,
    self_cosine_best,
)
from workers.runner import HarvestRunner, RunConfig
from workers.sae import sae_sources, save_sae

CFG = dict(top_k=3, n_ranges=2, per_range=2, window=8, batch_size=4, shard_sequences=8,
           relations=True)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request, tiny_gpt2_dir, tiny_llama_dir, tmp_path_factory):
    path = {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir}[request.param]
    lm = load_model(str(path))
    ds = load_dataset("pydoc", lm.tokenizer, seq_len=32, max_tokens=24 * 32)
    folder = tmp_path_factory.mktemp("sae")
    # A TopK SAE on the residual stream: sparse activations take the sparse products.
    save_sae(random_sae("topk", lm.d_model, 48, hook="blocks.1.hook_resid_post"), folder / "a")
    specs = neuron_sources(lm, [0, 1]) + sae_sources(lm, [str(folder / "a")])
    return lm, ds, specs


def lists_of(rows, kind: str, slug: str, n: int, *, same: bool = True):
    got = [[] for _ in range(n)]
    for f, k, rank, other, j, v in rows:
        if k == kind and (other == slug) == same:
            assert rank == len(got[f])
            got[f].append((j, v) if same else (other, j, v))
    return got


def harvest(lm, ds, specs):
    cfg = HarvestConfig(**CFG)
    h = Harvester(lm, ds.tokens, specs, cfg, bos_first=True)
    return h, run_harvest(h)


def test_cofiring_lists_equal_brute_force(setup):
    lm, ds, specs = setup
    _, states = harvest(lm, ds, specs)
    for spec in specs:
        x = brute_acts(lm, ds.tokens, spec)
        co, jac, pear = brute_cofiring(x)
        cof = states[spec.slug].cofire
        assert cof.n_tokens == x.shape[0]
        assert torch.equal(cof.co.double(), co), spec.slug
        torch.testing.assert_close(cof.xx, x.T @ x, rtol=1e-5, atol=1e-4)
        rows = cofiring_rows(spec.slug, cof)
        got_j = lists_of(rows, "jaccard", spec.slug, spec.n_features)
        assert got_j == brute_lists(jac, positive=True), spec.slug  # exact: integer counts
        assert sum(map(len, got_j)) > 0
        assert_lists_close(lists_of(rows, "pearson", spec.slug, spec.n_features),
                           brute_lists(pear), pear, rel=1e-4)


def test_shards_merged_in_either_order_give_the_same_lists(setup):
    lm, ds, specs = setup
    h, _ = harvest(lm, ds, specs)
    assert h.n_shards == 3
    s0, s1, s2 = (h.run_shard(i) for i in range(3))
    for spec in specs:
        slug = spec.slug
        one = s0[slug].merge(s1[slug]).merge(s2[slug]).cofire
        other = s2[slug].merge(s1[slug].merge(s0[slug])).cofire
        assert torch.equal(one.co, other.co)
        assert cofiring_rows(slug, one) == cofiring_rows(slug, other)


def test_cosine_lists_equal_brute_force(setup):
    lm, _, specs = setup
    dirs = {s.slug: s.directions() for s in specs}
    rows = direction_rows(dirs)
    unit = {k: (d / d.norm(dim=1, keepdim=True)).double() for k, d in dirs.items()}
    for spec in specs:
        slug, n = spec.slug, spec.n_features
        cos = unit[slug] @ unit[slug].T
        assert_lists_close(lists_of(rows[slug], "cosine", slug, n), brute_lists(cos), cos,
                           rel=1e-5)
        peers = [p for p in specs if p.slug != slug and p.n_features == n]
        across = lists_of(rows[slug], "cosine", slug, n, same=False)
        if not peers:  # the SAE has no other source of its width
            assert not any(across)
            continue
        sims = torch.cat([unit[slug] @ unit[p.slug].T for p in peers], dim=1)
        want = brute_lists(sims, self_too=True)
        by_peer = {p.slug: k for k, p in enumerate(peers)}
        assert_lists_close([[(by_peer[o] * n + j, v) for o, j, v in lst] for lst in across],
                           want, sims, rel=1e-5)


def test_a_harvest_writes_its_relations(db_url, tmp_path, tiny_gpt2_dir):
    cfg = RunConfig(db_url=db_url, model=str(tiny_gpt2_dir), dataset="pydoc", layers="0-1",
                    max_tokens=16 * 16, seq_len=16, batch_size=4, progress_bar=False,
                    harvest=HarvestConfig(**{**CFG, "compile": False}))
    HarvestRunner(cfg).run()
    engine = make_engine(db_url)
    with transaction(engine) as s:
        ids = {r.slug: r.id for r in s.execute(select(Source.slug, Source.id))}
        rows = s.execute(select(Relation)).scalars().all()
    d_mlp = 256  # the tiny GPT-2's MLP width
    kinds = {(r.kind, r.source_id == r.other_source_id) for r in rows}
    assert kinds == {("cosine", True), ("cosine", False), ("jaccard", True), ("pearson", True)}
    for slug, sid in ids.items():
        mine = [r for r in rows if r.source_id == sid and r.kind == "cosine"]
        assert len(mine) == 2 * N_RELATED * d_mlp, slug
        assert {r.other_source_id for r in mine} == set(ids.values())
    # A source harvested again replaces its own lists and those pointing at it.
    HarvestRunner(RunConfig(**{**cfg.__dict__, "layers": "1", "replace": True})).run()
    with transaction(engine) as s:
        again = s.execute(select(Relation)).scalars().all()
    assert not [r for r in again if r.source_id == ids["0-mlp"] and r.other_source_id != r.source_id]
    assert len(again) == len(rows) - 2 * N_RELATED * d_mlp
    engine.dispose()


def test_best_takes_the_lowest_columns_among_ties_like_a_full_sort():
    """best() is a top-k with exact tie handling: against brute_lists on coarse values full of
    ties, NaN and infinities, with and without leaving out each row's own column."""
    g = torch.Generator().manual_seed(0)
    for trial in range(120):
        n, f = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(1, 40, (1,),
                                                                                generator=g))
        v = torch.randint(-3, 4, (n, f), generator=g).double() / 2
        for frac, x in ((0.2, float("nan")), (0.1, float("-inf")), (0.1, float("inf"))):
            v[torch.rand(n, f, generator=g) < frac] = x
        own = trial % 2 == 0 and n <= f
        got = best(v, 5, exclude_from=0 if own else None)
        want = brute_lists(v, self_too=not own, k=5)
        assert got == want, trial


@pytest.mark.parametrize(("n", "block"), [(1, 2), (2, 2), (7, 2), (130, 32), (300, 64)])
def test_blocked_symmetric_cosine_lists_equal_brute_force(n, block):
    """self_cosine_best computes only the blocks on and above the diagonal and serves each
    block's columns from its transpose: the lists of the full product, zero rows left out."""
    g = torch.Generator().manual_seed(n)
    w = torch.randint(-2, 3, (n, 6), generator=g).float()  # a coarse grid: many equal cosines
    w[3 % n] = 0  # a zero direction: NaN, in no list
    u = w / w.norm(dim=1, keepdim=True)
    full = u.double() @ u.double().T
    # float32 products: orthogonal grid vectors come out within 1e-7 of 0, either side
    assert_lists_close(self_cosine_best(u, 5, block=block), brute_lists(full, k=5), full,
                       abs=1e-6)


def test_cofiring_is_refused_for_sources_wider_than_its_limit(db_url, tmp_path, tiny_gpt2_dir):
    """Co-firing keeps two [F, F] matrices: a wider SAE is refused before anything is
    registered, with what to do instead."""
    from workers.runner import PlanError

    save_sae(random_sae("topk", 64, MAX_COFIRING_FEATURES + 1024, hook="blocks.1.hook_resid_post"),
             tmp_path / "wide")
    cfg = RunConfig(db_url=db_url, model=str(tiny_gpt2_dir), dataset="pydoc", layers="none",
                    saes=[str(tmp_path / "wide")], max_tokens=16 * 16, seq_len=16, batch_size=4,
                    progress_bar=False, harvest=HarvestConfig(**{**CFG, "relations": True}))
    with pytest.raises(PlanError, match="without --relations"):
        HarvestRunner(cfg).run()
    engine = make_engine(db_url)
    with transaction(engine) as s:
        assert s.execute(select(Source)).scalars().all() == []
    engine.dispose()


def test_migrations_0007_and_0008_go_up_and_down(db_url):
    engine = make_engine(db_url)

    def indexes() -> set[str]:
        return {i["name"] for i in inspect(engine).get_indexes("relations")}

    upgrade(engine, "0006")
    assert "relations" not in inspect(engine).get_table_names()
    upgrade(engine, "0007")
    assert "relations" in inspect(engine).get_table_names()
    assert "ix_relations_other" in indexes()
    upgrade(engine)
    assert "ix_relations_other_source" in indexes() and "ix_relations_other" not in indexes()
    upgrade(engine, "0007")
    assert "ix_relations_other" in indexes() and "ix_relations_other_source" not in indexes()
    upgrade(engine, "0006")
    assert "relations" not in inspect(engine).get_table_names()
    engine.dispose()
