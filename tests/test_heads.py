"""Attention-head sources against brute force from the models' own eager attention
(`output_attentions=True`) on tiny GPT-2 and Llama models: top examples, stored rows, metrics,
the induction score and the OV circuit; and a heads harvest written to the database."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sqlalchemy import inspect, select
from support import eager_attentions, fresh_pg_url, needs_postgres

from app.db.engine import make_engine, transaction, upgrade
from app.db.tables import AttentionRows, ExampleBlock, ExampleGroup, Source, unpack_examples
from workers.corpus import load_dataset
from workers.finalize import finalize_source
from workers.harvest import HarvestConfig, Harvester, neuron_sources, run_harvest
from workers.head_metrics import induction_tokens, ov_weights
from workers.heads import distance_bin, head_sources
from workers.loading import load_model
from workers.runner import HarvestRunner, RunConfig

CFG = dict(top_k=4, n_ranges=2, per_range=3, window=12, batch_size=4, shard_sequences=8)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request, tiny_gpt2_dir, tiny_llama_dir):
    """Heads of both layers and one layer's neurons, in one harvest of 40 sequences."""
    lm = load_model(str(tiny_gpt2_dir if request.param == "gpt2" else tiny_llama_dir))
    ds = load_dataset("pydoc", lm.tokenizer, seq_len=32, max_tokens=40 * 32)
    specs = head_sources(lm, [0, 1]) + neuron_sources(lm, [1])
    cfg = HarvestConfig(**CFG)
    states = run_harvest(Harvester(lm, ds.tokens, specs, cfg, bos_first=True))
    assert ds.bos_policy == "bos-prepended"
    return lm, ds, specs, cfg, states


def test_top_examples_and_rows_equal_brute_force(setup):
    lm, ds, specs, cfg, states = setup
    attn = eager_attentions(lm, ds.tokens)
    for layer in (0, 1):
        a = attn[layer]  # [N, H, T, T]
        rowmax = a[:, :, 1:, 1:].amax(-1)  # queries 1.., keys without the BOS
        peak, qpos = rowmax.max(-1)  # [N, H]
        st = states[f"{layer}-attn"]
        for h in range(lm.n_heads):
            want = sorted(range(len(peak)), key=lambda s: (-peak[s, h].item(), s))[:cfg.top_k]
            assert st.top.seq[:, h].tolist() == want
            torch.testing.assert_close(st.top.value[:, h], peak[want, h], rtol=1e-5, atol=1e-6)
            assert st.top.pos[:, h].tolist() == (qpos[want, h] + 1).tolist()
        res = finalize_source(specs[layer], st, lm=lm, dataset=ds, cfg=cfg)
        seen = 0
        for feat, group, _n, window, data in zip(*res.blocks[0], strict=True):
            for ex in unpack_examples(int(group), len(data) // (12 + 2 * window), int(window),
                                      bytes(data)):
                row = a[ex.seq_idx, int(feat), ex.peak_pos]
                got = np.frombuffer(ex.acts, dtype="<f2")
                want = row[ex.start:ex.start + window].half().numpy()
                np.testing.assert_array_equal(got, want)
                if group == ExampleGroup.top:
                    bos, key = res.head_metrics["top_examples"][int(feat)][ex.rank]
                    assert bos == pytest.approx(float(row[0].half()), abs=0)
                    assert key == int(row[1:].argmax()) + 1
                    seen += 1
        assert seen == lm.n_heads * cfg.top_k


def brute_metrics(a: torch.Tensor, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """The definitions in workers/head_metrics.py, query by query. a: [N, H, T, T]."""
    n_seq, n_heads, t, _ = a.shape
    sums = {k: np.zeros(n_heads) for k in ("previous-token", "self", "bos-sink", "distance",
                                           "entropy", "duplicate-token")}
    hist = np.zeros((n_heads, 13))
    n_dup = 0
    for s in range(n_seq):
        for q in range(1, t):
            row = a[s, :, q, :q + 1].double().numpy()  # [H, q + 1]
            sums["previous-token"] += row[:, q - 1]
            sums["self"] += row[:, q]
            sums["bos-sink"] += row[:, 0]
            d = q - np.arange(q + 1)
            sums["distance"] += (row * d).sum(1)
            sums["entropy"] -= (row * np.log(np.maximum(row, 1e-30))).sum(1)
            for k in range(q + 1):
                hist[:, 0 if d[k] == 0 else min(int(math.log2(d[k])) + 1, 12)] += row[:, k]
            dup = [k for k in range(1, q) if tokens[s, k] == tokens[s, q]]
            if dup:
                n_dup += 1
                sums["duplicate-token"] += row[:, dup].sum(1)
    out = {k: v / (n_seq * (t - 1)) for k, v in sums.items()}
    out["duplicate-token"] = sums["duplicate-token"] / max(n_dup, 1)
    out["distance_hist"] = hist / hist.sum(1, keepdims=True)
    return out


def test_metrics_equal_brute_force(setup):
    lm, ds, specs, cfg, states = setup
    attn = eager_attentions(lm, ds.tokens)
    ids, half = induction_tokens(lm, ds.seq_len, int(ds.tokens[0, 0]), cfg.seed)
    induction = eager_attentions(lm, ids)
    assert torch.equal(ids[:, 1:1 + half], ids[:, 1 + half:])
    for layer in (0, 1):
        got = finalize_source(specs[layer], states[f"{layer}-attn"], lm=lm, dataset=ds,
                              cfg=cfg).head_metrics
        want = brute_metrics(attn[layer], ds.tokens)
        for name in ("previous-token", "self", "bos-sink", "distance", "entropy",
                     "duplicate-token"):
            np.testing.assert_allclose(got["metrics"][name], want[name], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(got["distance_hist"], want["distance_hist"], rtol=1e-5,
                                   atol=1e-9)
        # induction: from each token of the second copy to the token after its first occurrence
        a = induction[layer]
        want_ind = [np.mean([a[s, h, 1 + half + i, 2 + i].item() for s in range(len(ids))
                             for i in range(half)]) for h in range(lm.n_heads)]
        np.testing.assert_allclose(got["metrics"]["induction"], want_ind, rtol=1e-5)
        # controls: the same metrics of uniform causal attention
        uniform = torch.ones(32, 32).tril()
        uniform = (uniform / uniform.sum(1, keepdim=True)).expand(len(ds.tokens), 1, 32, 32)
        want_ctl = brute_metrics(uniform, ds.tokens)
        for name in ("previous-token", "distance", "entropy", "duplicate-token"):
            assert got["controls"][name] == pytest.approx(want_ctl[name][0], rel=1e-6)


def test_distance_bins():
    d = torch.tensor([0, 1, 2, 3, 4, 7, 8, 2047, 2048, 5000])
    assert distance_bin(d).tolist() == [0, 1, 2, 2, 3, 3, 4, 11, 12, 12]


def _ov_logit(lm, layer: int, head: int, token: int) -> float:
    """How much attending to `token` raises its own logit through one head's OV circuit, from
    the model's own value and output projections run on the token's embedding."""
    attn, dh = lm._attn(layer), lm.d_head
    e = lm.hf_model.get_input_embeddings().weight[token][None]
    with torch.inference_mode():
        if lm.arch == "gpt2":
            v = (attn.c_attn(e) - attn.c_attn(torch.zeros_like(e)))[:, 2 * lm.d_model:]
            kv = head
        else:
            v = attn.v_proj(e)
            kv = head // (lm.n_heads * dh // v.shape[1])
        z = torch.zeros(1, lm.n_heads * dh)
        z[:, head * dh:(head + 1) * dh] = v[:, kv * dh:(kv + 1) * dh]
        o_proj = attn.c_proj if lm.arch == "gpt2" else attn.o_proj
        out = o_proj(z) - o_proj(torch.zeros_like(z))
        return float(lm.logit_effects(out)[0, token])


def test_ov_circuit_tokens_equal_the_heads_own_projections(setup):
    lm, ds, specs, cfg, states = setup
    res = finalize_source(specs[1], states["1-attn"], lm=lm, dataset=ds, cfg=cfg)
    rng = np.random.default_rng(0)
    for head in (0, lm.n_heads - 1):
        tops, bottoms = (res.features[head][i] for i in (9, 10))
        import json

        tops, bottoms = json.loads(tops), json.loads(bottoms)
        for token, value in tops[:3] + bottoms[:3]:
            assert value == pytest.approx(_ov_logit(lm, 1, head, token), rel=1e-3, abs=1e-7)
        for token in rng.integers(0, lm.vocab_size, 30).tolist():
            assert bottoms[-1][1] - 1e-6 <= _ov_logit(lm, 1, head, token) <= tops[-1][1] + 1e-6


def test_copying_score_of_a_head_built_to_copy(tiny_llama_dir):
    """With tied embeddings and a unit final norm, a head whose W_O is W_V transposed has the
    OV circuit E V V^T E^T: positive semi-definite, copying score 1; negated, -1."""
    from workers.head_metrics import ov_circuit, unembedding

    lm = load_model(str(tiny_llama_dir))
    attn, dh = lm._attn(0), lm.d_head
    with torch.no_grad():
        wv, _, _ = ov_weights(lm, 0)
        attn.o_proj.weight[:, 0:dh] = wv[0]
        attn.o_proj.weight[:, dh:2 * dh] = -wv[1]
        lm.hf_model.model.norm.weight.fill_(1.0)
    _, copying = ov_circuit(lm, 0, *unembedding(lm))
    assert copying[0].item() == pytest.approx(1.0, abs=1e-4)
    assert copying[1].item() == pytest.approx(-1.0, abs=1e-4)
    assert abs(copying[2].item()) < 0.9


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_heads_harvest_is_stored_and_migration_0006_goes_up_and_down(tiny_gpt2_dir, tmp_path,
                                                                     backend):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'fs.db'}"
    else:
        needs_postgres()
        url = fresh_pg_url("heads_store")
    result = HarvestRunner(RunConfig(db_url=url, model=str(tiny_gpt2_dir), dataset="pydoc",
                                     layers="none", heads="1", max_tokens=16 * 32, seq_len=32,
                                     harvest=HarvestConfig(**CFG), progress_bar=False)).run()
    assert result.written == ["1-attn"]
    engine = make_engine(url)
    with transaction(engine) as session:
        src = session.scalar(select(Source).where(Source.slug == "1-attn"))
        assert (src.kind, src.hook_name, src.n_features) == ("heads", "blocks.1.attn.hook_pattern", 4)
        assert len(src.head_metrics["metrics"]["induction"]) == 4
        assert len(src.head_metrics["top_examples"][0]) == CFG["top_k"]
        n_blocks = len(session.scalars(select(ExampleBlock.feature_idx).where(
            ExampleBlock.source_id == src.id)).all())
        assert n_blocks >= 4
        assert len(session.scalars(select(AttentionRows.rank).where(
            AttentionRows.source_id == src.id)).all()) == 4 * CFG["top_k"]
    upgrade(engine, "0005")
    assert "head_metrics" not in {c["name"] for c in inspect(engine).get_columns("sources")}
    assert "attention_rows" not in inspect(engine).get_table_names()
    upgrade(engine)
    assert "head_metrics" in {c["name"] for c in inspect(engine).get_columns("sources")}
    assert "attention_rows" in inspect(engine).get_table_names()
    engine.dispose()


def test_heads_flag_is_checked(tiny_gpt2_dir, tmp_path):
    from workers.runner import PlanError

    with pytest.raises(PlanError, match="--heads"):
        RunConfig(db_url="sqlite://", heads="x")
    with pytest.raises(PlanError, match="--heads: the model has layers 0..1"):
        HarvestRunner(RunConfig(db_url=f"sqlite:///{tmp_path / 'x.db'}",
                                model=str(tiny_gpt2_dir), layers="none", heads="5",
                                progress_bar=False)).run()


def test_attention_rows_of_top_examples_equal_brute_force(setup):
    from workers.head_metrics import HOVER_EXAMPLES

    lm, ds, specs, cfg, states = setup
    attn = eager_attentions(lm, ds.tokens)
    res = finalize_source(specs[1], states["1-attn"], lm=lm, dataset=ds, cfg=cfg)
    top = states["1-attn"].top
    assert len(res.attention_rows) == lm.n_heads * min(HOVER_EXAMPLES, cfg.top_k)
    for head, rank, window, data in res.attention_rows:
        seq, query = int(top.seq[rank, head]), int(top.pos[rank, head])
        start = min(max(query - (window - window // 4 - 1), 0), ds.seq_len - window)
        got = np.frombuffer(data, dtype="<f2").reshape(window, window)
        want = attn[1][seq, head, start:start + window, start:start + window].half().numpy()
        np.testing.assert_array_equal(got, want)


def test_a_model_built_with_an_induction_head_has_it_found(tmp_path):
    """On the hand-wired induction circuit, the harvest's metrics single out head 0.0 as the
    previous-token head and head 1.0 as the induction head, each equal to its direct
    computation from the model's eager attention and far above its control."""
    from support import build_induction_gpt2, gpt2_tokenizer

    from workers.head_metrics import induction_score
    from workers.models import from_hf_model

    lm = from_hf_model(build_induction_gpt2(), gpt2_tokenizer(), slug="induction",
                       source="hand-wired")
    ds = load_dataset("pydoc", lm.tokenizer, seq_len=64, max_tokens=8 * 64)
    specs = head_sources(lm, [0, 1])
    cfg = HarvestConfig(**CFG)
    states = run_harvest(Harvester(lm, ds.tokens, specs, cfg, bos_first=True))
    got = [finalize_source(s, states[s.slug], lm=lm, dataset=ds, cfg=cfg).head_metrics
           for s in specs]
    ids, half = induction_tokens(lm, ds.seq_len, int(ds.tokens[0, 0]), cfg.seed)
    want = [induction_score(a, half, 1).tolist() for a in eager_attentions(lm, ids)]
    for layer in (0, 1):
        np.testing.assert_allclose(got[layer]["metrics"]["induction"], want[layer], rtol=1e-5)
    induction = got[1]["metrics"]["induction"]
    assert induction[0] > 0.95 > 10 * got[1]["controls"]["induction"]
    assert max(induction[1:] + got[0]["metrics"]["induction"]) < 0.1
    prev = got[0]["metrics"]["previous-token"]
    assert prev[0] > 0.99 and max(prev[1:]) < 0.2
    # and the induction head is no previous-token head
    assert got[1]["metrics"]["previous-token"][0] < 0.5
