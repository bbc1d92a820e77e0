"""A harvest written to a real SQLite file and to the local PostgreSQL server, read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sqlalchemy import func, select
from support import stored_examples

from app.db.engine import make_engine, upgrade
from app.db.tables import Dataset, ExampleGroup, Feature, Model, Sequence, Source
from workers import store
from workers.corpus import load_dataset
from workers.finalize import N_TOP_TOKENS, finalize, top_token_counts
from workers.harvest import HarvestConfig, Harvester, neuron_sources, run_harvest
from workers.loading import load_model

CFG = HarvestConfig(top_k=4, n_ranges=3, per_range=2, window=12, batch_size=4,
                    shard_sequences=12)


@pytest.fixture(scope="module")
def harvested(tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir))
    ds = load_dataset("pydoc", lm.tokenizer, seq_len=24, max_tokens=30 * 24)
    specs = neuron_sources(lm, [0, 1])
    states = run_harvest(Harvester(lm, ds.tokens, specs, CFG, bos_first=True))
    return lm, ds, specs, states


def write(url, harvested, **kw):
    lm, ds, specs, states = harvested
    engine = make_engine(url)
    upgrade(engine)
    reg = store.begin(engine, lm, ds, specs, CFG, **kw)
    store.write(engine, reg, finalize(lm, ds, specs, states, CFG))
    return engine, reg


def test_written_harvest_reads_back_exactly(db_url, harvested):
    lm, ds, specs, states = harvested
    engine, reg = write(db_url, harvested)
    with engine.connect() as conn:
        model = conn.execute(select(Model)).one()
        assert (model.slug, model.n_layers, model.d_mlp) == (lm.slug, 2, lm.d_mlp)
        dataset = conn.execute(select(Dataset)).one()
        assert dataset.n_sequences == ds.n_sequences and dataset.bos_policy == "bos-prepended"
        # sequences are stored once per dataset, shared by both sources
        assert conn.scalar(select(func.count()).select_from(Sequence)) == ds.n_sequences
        blob = conn.scalar(select(Sequence.tokens).where(Sequence.idx == 3))
        assert np.array_equal(store.sequence_tokens(blob), ds.tokens[3].numpy())
        sources = conn.execute(select(Source).order_by(Source.layer)).all()
        assert [s.status for s in sources] == ["ready", "ready"]
        assert all(s.version_hash for s in sources)

        spec = specs[1]
        st = states[spec.slug]
        sid = reg.source_ids[spec.slug]
        feats = conn.execute(select(Feature).where(Feature.source_id == sid)
                             .order_by(Feature.idx)).all()
        assert len(feats) == spec.n_features
        n_with_examples = 0
        for f in (0, 7, spec.n_features - 1):
            row = feats[f]
            assert row.max_act == pytest.approx(st.stats.max[f].item(), rel=1e-6)
            assert row.frac_active == pytest.approx(
                st.stats.n_active[f].item() / st.stats.n_tokens)
            assert sum(row.histogram) == st.stats.n_tokens
            # direct logit attribution, against the brute-force product with the unembedding
            eff = lm.logit_effects(lm.mlp_out_directions(spec.layer)[f:f + 1])[0]
            assert [t for t, _ in row.top_logits] == eff.topk(10).indices.tolist()
            # stored to 5 significant digits
            assert row.top_logits[0][1] == pytest.approx(eff.max().item(), rel=1e-4)
            assert [t for t, _ in row.bottom_logits] == eff.topk(10, largest=False).indices.tolist()

            ex = stored_examples(conn, sid, f, ExampleGroup.top)
            n_top = int(torch.isfinite(st.top.score[:, f]).sum())
            assert len(ex) == n_top
            for r, e in enumerate(ex):
                assert e.seq_idx == st.top.seq[r, f].item()
                assert e.peak_pos == st.top.pos[r, f].item() >= 1
                assert e.peak_value == pytest.approx(st.top.value[r, f].item(), rel=1e-6)
                acts = np.frombuffer(e.acts, dtype="<f2")
                assert len(acts) == CFG.window
                assert np.array_equal(acts, st.top.windows[r, f].numpy())
                assert acts[e.peak_pos - e.start] == np.float16(e.peak_value)
            if n_top:  # the top tokens are the tokens at the peaks of the top examples
                peak_tokens = [ds.tokens[e.seq_idx, e.peak_pos].item() for e in ex]
                assert row.top_tokens[0][1] == max(peak_tokens.count(t) for t in peak_tokens)
                n_with_examples += 1
        assert n_with_examples, "none of the features checked has top examples"

        # the zero group: the sequences of the zero sample, where the feature never fired
        n_zero = 0
        for f in range(spec.n_features):
            zero = stored_examples(conn, sid, f, ExampleGroup.zero)
            assert [e.seq_idx for e in zero] == [
                s for s in st.zero.seq[:, f].tolist() if s < len(ds.tokens)]
            assert all(np.frombuffer(e.acts, dtype="<f2").max() <= 0 for e in zero)
            n_zero += len(zero)
        assert n_zero

        # quantile groups: ascending activation across groups, each from the fired sample
        q = [(e.group, e.peak_value) for e in stored_examples(conn, sid, 0)
             if e.group >= ExampleGroup.quantile]
        assert {g for g, _ in q} <= {ExampleGroup.quantile + g for g in range(CFG.n_ranges)}
        values = [v for _, v in q]
        assert values and values == sorted(values) and all(v > 0 for v in values)


def test_ready_source_is_not_overwritten_silently(db_url, harvested):
    engine, _ = write(db_url, harvested)
    with pytest.raises(store.StoreError, match="--replace"):
        write(db_url, harvested)
    write(db_url, harvested, replace=True)
    with engine.connect() as conn:
        n_feat = conn.scalar(select(func.count()).select_from(Feature))
    assert n_feat == sum(s.n_features for s in harvested[2])


def test_a_source_is_invisible_until_finished(db_url, harvested):
    lm, ds, specs, states = harvested
    engine = make_engine(db_url)
    upgrade(engine)
    reg = store.begin(engine, lm, ds, specs, CFG)
    store.report_progress(engine, reg, 100)
    with engine.connect() as conn:
        rows = conn.execute(select(Source.status, Source.progress_tokens)).all()
        assert rows == [("building", 100)] * 2
        assert conn.scalar(select(func.count()).select_from(Feature)) == 0
    store.fail(engine, reg, "RuntimeError: out of memory")
    with engine.connect() as conn:
        assert {r.status for r in conn.execute(select(Source.status))} == {"failed"}


def test_top_token_counts_equal_counting_each_feature():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 6, (20, 300), generator=gen)
    fired = torch.rand(20, 300, generator=gen) < 0.7
    fired[:, :3] = False  # features that never fired
    got = top_token_counts(tokens, fired)
    for f in range(300):
        toks, counts = tokens[:, f][fired[:, f]].unique(return_counts=True)
        want = sorted(zip(toks.tolist(), counts.tolist(), strict=True),
                      key=lambda tc: (-tc[1], tc[0]))[:N_TOP_TOKENS]
        assert got[f] == [list(tc) for tc in want]
    assert got[0] == []
