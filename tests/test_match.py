"""`featurescope match` on tiny real models: an SAE matched against a copy of itself with
permuted features recovers the permutation, correlations across two models equal a brute-force
computation, the comparison page and the feature pages show the result, and bad requests get
one clear error with nothing written."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from support import brute_acts, random_sae
from test_train import superposition

from app.cli import main
from app.config import Settings
from app.db.engine import make_engine, transaction
from app.db.tables import Model, Relation
from app.main import create_app
from app.relation_schemas import ComparePage
from app.schemas import FeaturePage
from workers.corpus import load_dataset
from workers.harvest import HarvestConfig, neuron_sources
from workers.loading import load_model
from workers.match import CrossStats, correlations, load_side, one_to_one, run_match
from workers.runner import HarvestRunner, RunConfig
from workers.sae import save_sae
from workers.train import TrainConfig, Trainer

HARVEST = HarvestConfig(top_k=3, n_ranges=2, per_range=2, window=8, shard_sequences=8,
                        compile=False)
HOOK = "blocks.1.hook_resid_post"


def harvest(db_url, model_dir, **kw):
    cfg = dict(db_url=db_url, model=str(model_dir), dataset="pydoc", max_tokens=24 * 16,
               seq_len=16, harvest=HARVEST, batch_size=4, progress_bar=False)
    return HarvestRunner(RunConfig(**{**cfg, **kw})).run()


@pytest.fixture
def permuted(tmp_path, tiny_gpt2_dir):
    """An SAE and a copy of it with its features permuted, both harvested; (url, model slug,
    slugs, permutation)."""
    sae = random_sae("relu", 64, 48, hook=HOOK, seed=3)
    with torch.no_grad():
        sae.b_enc.add_(2.0)  # most features fire somewhere on the few tokens of the test
    save_sae(sae, tmp_path / "a")
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_enc[:, perm])
        sae.b_enc.copy_(sae.b_enc[perm])
        sae.W_dec.copy_(sae.W_dec[perm])
    save_sae(sae, tmp_path / "b")
    url = f"sqlite:///{tmp_path / 'fs.db'}"
    got = harvest(url, tiny_gpt2_dir, layers="none", saes=[str(tmp_path / "a"),
                                                           str(tmp_path / "b")])
    return url, got.model, got.written, perm


def test_a_permuted_copy_is_matched_to_its_permutation(permuted, capsys):
    url, model, (a, b), perm = permuted
    assert main(["match", f"{model}/{a}", f"{model}/{b}", "--db", url]) == 0
    out = capsys.readouterr().out
    assert f"/compare/{model}/{a}/{model}/{b}" in out
    engine = make_engine(url)
    with transaction(engine) as s:
        rows = s.execute(select(Relation).where(Relation.kind == "match")).scalars().all()
    ids = {r.source_id for r in rows}
    assert len(ids) == 2
    sid_a = min(ids)  # harvested first
    inverse = torch.argsort(perm).tolist()  # A's feature perm[j] is B's feature j
    best = {r.feature_idx: r for r in rows if r.source_id == sid_a and r.rank == 0}
    pairs = {r.feature_idx: r for r in rows if r.source_id == sid_a and r.rank == 1}
    alive = sorted(best)  # the features that ever fire
    assert len(alive) >= 30
    for f in alive:
        assert best[f].other_idx == inverse[f] and best[f].value == pytest.approx(1, abs=1e-6)
        assert pairs[f].other_idx == inverse[f]
    back = {r.feature_idx: r.other_idx for r in rows if r.source_id != sid_a and r.rank == 0}
    assert all(back[inverse[f]] == f for f in alive)

    app = create_app(Settings(database_url=url), engine=engine)
    with TestClient(app) as client:
        page = ComparePage.model_validate_json(
            client.get(f"/compare/{model}/{a}/{model}/{b}.json").content)
        assert sum(x.count for x in page.best_match) == len(alive)
        assert page.best_match[-1].count == len(alive)  # all in the bin ending at 1
        assert sum(x.count for x in page.control) == len(alive)
        assert page.median_best == pytest.approx(1) and page.median_control < 0.9
        assert {(p.a, p.b) for p in page.pairs if p.a in alive} == {(f, inverse[f])
                                                                    for f in alive}
        assert page.unmatched_a == sorted(set(range(48)) - set(alive))
        html = client.get(f"/compare/{model}/{a}/{model}/{b}").text
        assert html.count("<rect ") == 40 and html.count('<rect class="control"') == 20
        assert f'href="/{model}/{b}/{inverse[alive[0]]}"' in html
        f = alive[0]
        fp = FeaturePage.model_validate_json(client.get(f"/{model}/{a}/{f}.json").content)
        assert [(m.source, m.index) for m in fp.related.match] == [(b, inverse[f])]
        assert fp.related.match[0].control < fp.related.match[0].value
        assert 'id="related-match"' in client.get(f"/{model}/{a}/{f}").text
        missing = client.get(f"/compare/{model}/{a}/{model}/{a}.json")
        assert missing.status_code == 404 and "featurescope match" in missing.json()["error"]
    engine.dispose()


def test_correlations_across_two_models_equal_brute_force(tiny_gpt2_dir, tiny_llama_dir):
    gpt2, llama = load_model(str(tiny_gpt2_dir)), load_model(str(tiny_llama_dir))
    ds = load_dataset("pydoc", gpt2.tokenizer, seq_len=16, max_tokens=20 * 16)
    sa, sb = neuron_sources(gpt2, [0])[0], neuron_sources(llama, [1])[0]
    got, control = correlations(gpt2, sa, llama, sb, ds.tokens, first=1, batch_size=4)
    xa, xb = brute_acts(gpt2, ds.tokens, sa), brute_acts(llama, ds.tokens, sb)
    fa = sa.n_features
    want = torch.corrcoef(torch.cat([xa, xb], dim=1).T)[:fa, fa:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The control: B's activations from the next sequence of each batch of 4 (the first's for
    # the last): 20 sequences of 15 counted tokens.
    seqs = xb.view(20, 15, -1)
    other = torch.cat([seqs[b:b + 4].roll(-1, dims=0) for b in range(0, 20, 4)]).view(300, -1)
    want_control = torch.corrcoef(torch.cat([xa, other], dim=1).T)[:fa, fa:]
    torch.testing.assert_close(control, want_control, rtol=1e-5, atol=1e-6)


def test_sources_of_models_with_other_tokenizers_are_refused(tmp_path, tiny_gpt2_dir,
                                                             tiny_llama_dir, capsys):
    url = f"sqlite:///{tmp_path / 'fs.db'}"
    g = harvest(url, tiny_gpt2_dir, layers="0")
    ll = harvest(url, tiny_llama_dir, layers="1")
    engine = make_engine(url)
    assert load_side(engine, f"{ll.model}/1-mlp").tokenizer_hash == load_side(
        engine, f"{g.model}/0-mlp").tokenizer_hash
    with transaction(engine) as s:
        s.execute(update(Model).where(Model.slug == ll.model).values(tokenizer_hash="other"))
    with pytest.raises(SystemExit, match="different tokenizers"):
        main(["match", f"{g.model}/0-mlp", f"{ll.model}/1-mlp", "--db", url])
    with pytest.raises(SystemExit, match="no source"):
        main(["match", f"{g.model}/7-mlp", f"{ll.model}/1-mlp", "--db", url])
    with pytest.raises(SystemExit, match="MODEL/SOURCE"):
        main(["match", "0-mlp", f"{ll.model}/1-mlp", "--db", url])
    with transaction(engine) as s:
        assert s.scalar(select(Relation).where(Relation.kind == "match")) is None
    engine.dispose()


def test_run_match_stores_both_directions_once(tmp_path, tiny_gpt2_dir):
    url = f"sqlite:///{tmp_path / 'fs.db'}"
    g = harvest(url, tiny_gpt2_dir, layers="0-1")
    engine = make_engine(url)
    for _ in range(2):  # a second run replaces the first
        a, b, corr, pairs = run_match(engine, f"{g.model}/0-mlp", f"{g.model}/1-mlp",
                                      max_tokens=10 * 16)
    assert len(pairs) == 256
    with transaction(engine) as s:
        rows = s.execute(select(Relation).where(Relation.kind == "match")).scalars().all()
    best = corr.nan_to_num(nan=-2).max(dim=1)
    mine = {r.feature_idx: r for r in rows if r.source_id == a.source_id and r.rank == 0}
    for f, r in mine.items():
        assert r.other_idx == best.indices[f].item() and r.value == best.values[f].item()
    assert len([r for r in rows if r.rank == 1]) == 2 * len(pairs) - sum(
        1 for x, y in pairs if corr[x, y].isnan())
    engine.dispose()


def test_two_saes_of_different_seeds_match_on_their_true_features():
    """Two TopK SAEs trained from different seeds on the toy model of superposition: where both
    learned a true direction, matching by activation correlation pairs those two features."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dictionary, sample = superposition()
        saes = []
        for seed in (1, 2):
            cfg = TrainConfig(hook_name=HOOK, d_sae=128, architecture="topk", k=4,
                              batch_tokens=1024, seed=seed)
            trainer = Trainer(cfg, sample(4096), total_steps=600)
            for _ in range(600):
                trainer.step(sample(1024))
            saes.append(trainer.finish())
        stats = CrossStats(128, 128)
        for _ in range(4):
            x = sample(4096)
            stats.update(saes[0].encode(x), saes[1].encode(x))
        corr = stats.corr()
        pairs = dict(one_to_one(corr))
        best = corr.nan_to_num(nan=-2).argmax(dim=1)
    finally:
        torch.set_num_threads(n)
    owners = []
    for sae in saes:  # per true direction, the feature whose decoder row is it (cosine > 0.9)
        w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
        cos, feat = (dictionary @ w.T).max(dim=1)
        owners.append(torch.where(cos > 0.9, feat, -1))
    both = [(a, b) for a, b in zip(*(o.tolist() for o in owners), strict=True)
            if a >= 0 and b >= 0]
    assert len(both) >= 0.8 * dictionary.shape[0]
    assert sum(pairs.get(a) == b for a, b in both) >= 0.9 * len(both)
    assert sum(best[a].item() == b for a, b in both) >= 0.9 * len(both)


def test_sparse_cross_products_equal_dense_ones_and_brute_force(monkeypatch):
    """Batches of sparse codes (TopK-like: a few non-zeros per token, with a large constant
    feature beside them) take the sparse products; their correlations equal the dense path's
    and numpy's corrcoef over all tokens, whichever path each batch took."""
    import numpy as np

    import workers.match as match

    g = torch.Generator().manual_seed(0)

    def codes(n: int, f: int) -> torch.Tensor:
        x = torch.zeros(n, f)
        idx = torch.rand(n, f, generator=g).topk(3, dim=1).indices
        x.scatter_(1, idx, torch.rand(n, 3, generator=g) * 4)
        return x

    batches = [(codes(300, 90), codes(300, 70)) for _ in range(4)]
    batches[1][0][:, 5:7] = 1000.0 + torch.rand(300, 2, generator=g)  # dense, large features
    dens = [max(match._density(xa), match._density(xb)) for xa, xb in batches]
    assert min(dens) < 0.045 < max(dens)  # "mixed" takes both paths
    runs = {}
    for name, density in (("sparse", 1.0), ("dense", 0.0), ("mixed", 0.045)):
        monkeypatch.setattr(match, "SPARSE_BELOW", density)
        stats = CrossStats(90, 70)
        for xa, xb in batches:
            stats.update(xa, xb)
        runs[name] = stats.corr()
    a = torch.cat([x for x, _ in batches]).double().numpy()
    b = torch.cat([y for _, y in batches]).double().numpy()
    want = np.corrcoef(a.T, b.T)[:90, 90:]
    # the sparse products are float64 throughout; the dense ones multiply in float32
    for name, corr in runs.items():
        np.testing.assert_allclose(corr.numpy(), want, rtol=1e-7,
                                   atol=1e-9 if name == "sparse" else 5e-6, err_msg=name)
