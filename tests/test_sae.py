"""workers.sae: the three architectures against their formulas, SAELens and Gemma Scope files,
refusals, and an SAE source's harvest against a brute-force encode of every token."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import select
from support import HOOK, random_sae, stored_examples

from workers.sae import (
    METRIC_KEYS,
    SAEFormatError,
    load_sae,
    sae_sources,
    save_sae,
    source_slug,
)


def formula(t: dict[str, torch.Tensor], x: torch.Tensor, arch: str, *, k: int | None = None,
            b_dec_in: bool = True) -> torch.Tensor:
    """The encoder as SAELens and Gemma Scope document it, written out independently."""
    h = (x - t["b_dec"] * b_dec_in) @ t["W_enc"] + t["b_enc"]
    if arch == "standard":
        return torch.relu(h)
    if arch == "jumprelu":
        return torch.relu(h) * (h > t["threshold"]).float()
    vals, idx = h.topk(k, dim=-1)
    return torch.zeros_like(h).scatter(-1, idx, torch.relu(vals))


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_encode_matches_the_formula(arch):
    sae = random_sae(arch)
    x = torch.randn(3, 5, 16)
    want = formula({k: v for k, v in sae.tensors().items()}, x, arch, k=sae.cfg.k)
    torch.testing.assert_close(sae.encode(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), want @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-5)
    assert sae.encode(x).shape == (3, 5, 40)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saved_sae_loads_back_bit_for_bit(arch, tmp_path):
    sae = random_sae(arch, extra={"model_name": "m", "context_size": 64})
    metrics = dict.fromkeys(METRIC_KEYS, 0.5)
    save_sae(sae, tmp_path / "sae", metrics=metrics)
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == [
        "cfg.json", "sae_weights.safetensors", "training_metrics.json"]
    back = load_sae(tmp_path / "sae")
    assert back.cfg == sae.cfg
    for name, t in sae.tensors().items():
        got = back.tensors()[name]
        assert got.dtype == t.dtype and torch.equal(got, t), name
    x = torch.randn(4, 16)
    assert torch.equal(back.encode(x), sae.encode(x))
    assert json.loads((tmp_path / "sae" / "training_metrics.json").read_text()) == metrics
    with pytest.raises(FileExistsError, match="not empty"):
        save_sae(sae, tmp_path / "sae")
    (tmp_path / "empty").mkdir()
    save_sae(sae, tmp_path / "empty")  # an empty folder is fine
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def write_saelens(folder, cfg: dict, tensors: dict[str, torch.Tensor]):
    """An SAE folder the way SAELens's save_model writes one: cfg.json and safetensors."""
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def tensors_for(d_in, d_sae, *, threshold=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.randn(d_sae, generator=g),
         "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g)}
    if threshold:
        t["threshold"] = torch.rand(d_sae, generator=g)
    return t


SAELENS_CFGS = {
    # SAELens 6: model facts under "metadata"
    "v6-jumprelu": ({"d_in": 16, "d_sae": 32, "dtype": "float32", "device": "cpu",
                     "apply_b_dec_to_input": False, "normalize_activations": "none",
                     "reshape_activations": "none", "architecture": "jumprelu",
                     "metadata": {"model_name": "gpt2", "hook_name": HOOK, "hook_head_index": None,
                                  "sae_lens_version": "6.5.1", "context_size": 128}}, "jumprelu"),
    "v6-topk": ({"d_in": 16, "d_sae": 32, "dtype": "float32", "device": "cpu", "k": 5,
                 "apply_b_dec_to_input": True, "normalize_activations": "none",
                 "reshape_activations": "none", "architecture": "topk",
                 "metadata": {"hook_name": HOOK, "sae_lens_version": "6.5.1"}}, "topk"),
    # SAELens 3-5: flat, with hook_name (and hook_point before 3.0), activation_fn_str
    "v5-standard": ({"architecture": "standard", "d_in": 16, "d_sae": 32, "dtype": "float32",
                     "device": "cpu", "model_name": "gpt2", "hook_name": HOOK, "hook_layer": 1,
                     "hook_head_index": None, "activation_fn_str": "relu",
                     "apply_b_dec_to_input": True, "finetuning_scaling_factor": False,
                     "context_size": 128, "prepend_bos": True, "normalize_activations": "none",
                     "sae_lens_training_version": "4.0.0"}, "standard"),
    "v4-topk-as-activation": ({"d_in": 16, "d_sae": 32, "hook_point": HOOK,
                               "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5},
                               "normalize_activations": False}, "topk"),
}


@pytest.mark.parametrize("name", list(SAELENS_CFGS))
def test_saelens_layout_written_by_hand_loads_and_encodes_identically(name, tmp_path):
    cfg, arch = SAELENS_CFGS[name]
    t = tensors_for(16, 32, threshold=arch == "jumprelu")
    sae = load_sae(write_saelens(tmp_path / name, cfg, t))
    assert (sae.cfg.architecture, sae.cfg.hook_name, sae.cfg.d_in, sae.cfg.d_sae) == (
        arch, HOOK, 16, 32)
    x = torch.randn(2, 7, 16) * 3
    b_dec_in = cfg.get("apply_b_dec_to_input", True)
    want = formula(t, x, arch, k=5, b_dec_in=b_dec_in)
    torch.testing.assert_close(sae.encode(x), want, rtol=1e-5, atol=1e-5)
    # unknown fields survive a save, so the folder stays readable by SAELens
    save_sae(sae, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert {k: again[k] for k in ("d_in", "d_sae", "hook_name", "architecture")} == {
        "d_in": 16, "d_sae": 32, "hook_name": HOOK, "architecture": arch}


@pytest.mark.parametrize("how", ["constant_norm_rescale", "layer_norm"])
def test_normalize_activations_as_saelens_defines_them(how, tmp_path):
    t = tensors_for(16, 32)
    cfg = {"d_in": 16, "d_sae": 32, "hook_name": HOOK, "architecture": "standard",
           "normalize_activations": how, "apply_b_dec_to_input": True}
    sae = load_sae(write_saelens(tmp_path / how, cfg, t))
    x = torch.randn(5, 16) * 7 + 2
    if how == "constant_norm_rescale":
        scale = 16**0.5 / x.norm(dim=-1, keepdim=True)
        xn, undo = x * scale, (lambda y: y / scale)
    else:
        mu, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
        xn, undo = (x - mu) / (std + 1e-5), (lambda y: y * std + mu)
    f = formula(t, xn, "standard")
    torch.testing.assert_close(sae.encode(x), f, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae(x), undo(f @ t["W_dec"] + t["b_dec"]), rtol=1e-4, atol=1e-3)


def test_topk_rescaled_by_decoder_norms_as_saelens_defines_it(tmp_path):
    """rescale_acts_by_decoder_norm (what SAELens's TopK trainer writes, decoder rows of norm
    0.1): the pre-activations times each decoder row's norm go into the TopK; decode divides
    them back out."""
    t = tensors_for(16, 32)
    t["W_dec"] = t["W_dec"] * 0.1 / t["W_dec"].norm(dim=-1, keepdim=True)
    cfg = {"d_in": 16, "d_sae": 32, "k": 5, "architecture": "topk",
           "rescale_acts_by_decoder_norm": True, "metadata": {"hook_name": HOOK}}
    sae = load_sae(write_saelens(tmp_path / "rescaled", cfg, t))
    assert sae.cfg.rescale_acts_by_decoder_norm
    x = torch.randn(6, 16) * 4
    norms = t["W_dec"].norm(dim=-1)
    h = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norms
    vals, idx = h.topk(5, dim=-1)
    want = torch.zeros_like(h).scatter(-1, idx, torch.relu(vals))
    torch.testing.assert_close(sae.encode(x), want, rtol=1e-5, atol=1e-5)
    plain = formula(t, x, "topk", k=5)
    assert not torch.allclose(sae.encode(x), plain)  # about 10x, not a rounding difference
    torch.testing.assert_close(sae(x), (want / norms) @ t["W_dec"] + t["b_dec"])
    torch.testing.assert_close(sae.output_directions(), t["W_dec"] / norms[:, None])
    save_sae(sae, tmp_path / "again")
    assert load_sae(tmp_path / "again").cfg.rescale_acts_by_decoder_norm


REFUSED = {
    "hook_head_index": ({"metadata": {"hook_name": HOOK, "hook_head_index": 3}},
                        "hook_head_index=3"),
    "hook_point_head_index": ({"hook_point": HOOK, "hook_point_head_index": 0},
                              "hook_head_index=0"),
    "reshape_activations": ({"hook_name": HOOK, "reshape_activations": "hook_z"},
                            "reshape_activations='hook_z'"),
    "activation_fn": ({"hook_name": HOOK, "activation_fn_str": "tanh-relu"},
                      "activation_fn='tanh-relu'"),
    "activation_fn_kwargs": ({"hook_name": HOOK, "activation_fn": "topk",
                              "activation_fn_kwargs": {"k": 4, "postact_fn": "relu"}},
                             r"activation_fn_kwargs \['postact_fn'\]"),
    "rescale on a standard SAE": ({"hook_name": HOOK, "rescale_acts_by_decoder_norm": True},
                                  "rescale_acts_by_decoder_norm is only defined for topk"),
    "normalize_activations": ({"hook_name": HOOK, "normalize_activations": "whiten"},
                              "unknown normalize_activations 'whiten'"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_keys_that_change_encode_and_are_not_implemented_are_refused_by_name(name, tmp_path):
    cfg, message = REFUSED[name]
    write_saelens(tmp_path / "sae", {"d_in": 16, "d_sae": 32, **cfg}, tensors_for(16, 32))
    with pytest.raises(SAEFormatError, match=message):
        load_sae(tmp_path / "sae")


@pytest.mark.parametrize("how", ["expected_average_only_in", "covariance_whitening"])
def test_normalizations_saelens_folds_at_the_end_of_training_encode_raw(how, tmp_path):
    t = tensors_for(16, 32)
    cfg = {"d_in": 16, "d_sae": 32, "hook_name": HOOK, "architecture": "standard",
           "normalize_activations": how, "reshape_activations": "none", "hook_head_index": None}
    sae = load_sae(write_saelens(tmp_path / how, cfg, t))
    x = torch.randn(5, 16)
    torch.testing.assert_close(sae.encode(x), formula(t, x, "standard"))


def test_gemma_scope_params_npz(tmp_path):
    t = tensors_for(16, 32, threshold=True)
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_82"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in t.items()})
    for spec in (folder / "params.npz", folder):
        sae = load_sae(spec)
        assert (sae.cfg.architecture, sae.cfg.hook_name, sae.cfg.apply_b_dec_to_input) == (
            "jumprelu", HOOK, False)
        x = torch.randn(3, 16)
        torch.testing.assert_close(sae.encode(x), formula(t, x, "jumprelu", b_dec_in=False))
    mlp = tmp_path / "gemma-scope-9b-pt-mlp" / "layer_0" / "width_16k" / "avg"
    mlp.mkdir(parents=True)
    np.savez(mlp / "params.npz", **{k: v.numpy() for k, v in t.items()})
    assert load_sae(mlp).cfg.hook_name == "blocks.0.hook_mlp_out"
    # outside Gemma Scope's layout the hook point is given after '@'
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in t.items()})
    with pytest.raises(SAEFormatError, match="PATH@blocks"):
        load_sae(tmp_path / "params.npz")
    assert load_sae(f"{tmp_path / 'params.npz'}@blocks.0.hook_resid_pre").cfg.hook_name == (
        "blocks.0.hook_resid_pre")
    np.savez(tmp_path / "bad.npz", W_enc=t["W_enc"].numpy(), W_dec=t["W_dec"].numpy())
    with pytest.raises(SAEFormatError, match="missing tensor b_enc, b_dec, threshold"):
        load_sae(f"{tmp_path / 'bad.npz'}@{HOOK}")


def test_source_slugs():
    assert source_slug("blocks.6.hook_resid_post", 4096) == "6-res-sae-4k"
    assert source_slug("blocks.1.hook_resid_post", 96) == "1-res-sae-96"
    assert source_slug("blocks.0.hook_resid_pre", 2048) == "0-res-pre-sae-2k"
    assert source_slug("blocks.3.hook_mlp_out", 1024) == "3-mlp-sae-1k"
    assert source_slug("blocks.3.hook_attn_out", 16384) == "3-att-sae-16k"
    assert source_slug("blocks.2.mlp.hook_post", 1000) == "2-mlp-post-sae-1000"


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_gpt2_dir):
    from workers.loading import load_model

    return load_model(str(tiny_gpt2_dir))


def test_sae_sources_fit_the_model(tiny_gpt2, tmp_path):
    lm = tiny_gpt2
    save_sae(random_sae("topk", 64, 96), tmp_path / "a",
             metrics=dict.fromkeys(METRIC_KEYS, 1.0))
    save_sae(random_sae("topk", 64, 96, seed=1), tmp_path / "b")
    save_sae(random_sae("jumprelu", lm.d_mlp, 2048, hook="blocks.0.mlp.hook_post"), tmp_path / "c")
    a, b, c = sae_sources(lm, [str(tmp_path / d) for d in "abc"])
    assert [s.slug for s in (a, b, c)] == ["1-res-sae-96", "1-res-sae-96-2", "0-mlp-post-sae-2k"]
    assert (a.kind, a.bottom, a.n_features, a.layer, a.hook_name) == ("sae", False, 96, 1, HOOK)
    assert a.sae_config["metrics"] == dict.fromkeys(METRIC_KEYS, 1.0)
    assert b.sae_config["metrics"] is None
    assert a.sae_config["path"] == str((tmp_path / "a").resolve())
    assert a.sae_config["k"] == 6 and a.sae_config["d_in"] == 64
    assert a.sae_config["sha256"] != b.sae_config["sha256"]  # tells the two SAEs apart
    json.dumps(a.sae_config)  # stored as JSON
    sae = load_sae(tmp_path / "a")
    assert torch.equal(a.directions(), sae.W_dec)
    x = torch.randn(2, 3, 64)
    assert torch.equal(a.encode(x), sae.encode(x))
    mlp_sae = load_sae(tmp_path / "c")
    torch.testing.assert_close(c.directions(), mlp_sae.W_dec @ lm.mlp_out_directions(0))
    assert c.directions().shape == (2048, lm.d_model)


def test_files_that_do_not_fit_are_refused(tiny_gpt2, tmp_path):
    lm = tiny_gpt2
    save_sae(random_sae("topk", 32, 64), tmp_path / "small")
    with pytest.raises(SAEFormatError, match=r"small: d_in is 32 but .* has dimension 64"):
        sae_sources(lm, [str(tmp_path / "small")])
    save_sae(random_sae("topk", 64, 64, hook="blocks.7.hook_resid_post"), tmp_path / "deep")
    with pytest.raises(SAEFormatError, match=r"deep: .*'blocks.7.hook_resid_post'.*layers 0\.\.1"):
        sae_sources(lm, [str(tmp_path / "deep")])
    save_sae(random_sae("topk", 64, 64, hook="blocks.1.attn.hook_z"), tmp_path / "z")
    with pytest.raises(SAEFormatError, match="unknown hook point 'blocks.1.attn.hook_z'"):
        sae_sources(lm, [str(tmp_path / "z")])
    t = tensors_for(64, 32)
    del t["b_dec"]
    write_saelens(tmp_path / "partial", {"d_in": 64, "d_sae": 32, "hook_name": HOOK}, t)
    with pytest.raises(SAEFormatError, match=r"partial.*missing tensor b_dec"):
        sae_sources(lm, [str(tmp_path / "partial")])
    write_saelens(tmp_path / "shape", {"d_in": 64, "d_sae": 31, "hook_name": HOOK},
                  tensors_for(64, 32))
    with pytest.raises(SAEFormatError, match=r"W_enc has shape \(64, 32\), expected \(64, 31\)"):
        load_sae(tmp_path / "shape")
    write_saelens(tmp_path / "gated", {"d_in": 64, "d_sae": 32, "hook_name": HOOK,
                                       "architecture": "gated"}, tensors_for(64, 32))
    with pytest.raises(SAEFormatError, match="unsupported SAE architecture 'gated'"):
        load_sae(tmp_path / "gated")
    write_saelens(tmp_path / "nohook", {"d_in": 64, "d_sae": 32}, tensors_for(64, 32))
    with pytest.raises(SAEFormatError, match="lacks hook_name"):
        load_sae(tmp_path / "nohook")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(SAEFormatError, match="not an SAE"):
        load_sae(tmp_path / "nothing")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "cfg.json").write_text(json.dumps(
        {"d_in": 64, "d_sae": 32, "hook_name": HOOK}))
    with pytest.raises(SAEFormatError, match="missing sae_weights.safetensors"):
        load_sae(tmp_path / "noweights")


def _varied_sae(arch: str, width: int):
    """A random SAE whose codes vary from token to token on the tiny model: no biases (its
    activations are small, so let their direction decide)."""
    sae = random_sae(arch, 64, width)
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_harvested_sae_source_equals_brute_force_encode(tiny_gpt2, tmp_path, db_url):
    """An SAE source as stored in SQLite and PostgreSQL against encoding every token."""
    check_sae_harvest(tiny_gpt2, tmp_path, db_url, "topk", 96)


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_wide_sae_sources_equal_brute_force_encode(tiny_gpt2, tmp_path, arch):
    """The same at 4,096 features (one database is enough: the store is the same)."""
    check_sae_harvest(tiny_gpt2, tmp_path, f"sqlite:///{tmp_path / 'wide.db'}", arch, 4096)


def check_sae_harvest(lm, tmp_path, db_url: str, arch: str, width: int) -> None:
    """Stored top examples, values, windows, stats and logits of an SAE source against encoding
    every token of the dataset directly (the harvest fills SAE sources from their sparse
    codes)."""
    from app.db.engine import make_engine, upgrade
    from app.db.tables import ExampleGroup, Feature, Source
    from app.histogram import histogram_edges
    from workers import store
    from workers.accumulate import window_start
    from workers.corpus import load_dataset
    from workers.finalize import finalize
    from workers.harvest import HarvestConfig, Harvester, run_harvest

    sae = _varied_sae(arch, width)
    save_sae(sae, tmp_path / "sae")
    specs = sae_sources(lm, [str(tmp_path / "sae")])
    ds = load_dataset("pydoc", lm.tokenizer, seq_len=32, max_tokens=40 * 32)
    cfg = HarvestConfig(top_k=5, n_ranges=2, per_range=2, window=12, batch_size=4,
                        shard_sequences=12)
    assert cfg.sparse
    states = run_harvest(Harvester(lm, ds.tokens, specs, cfg, bos_first=True))
    engine = make_engine(db_url)
    upgrade(engine)
    reg = store.begin(engine, lm, ds, specs, cfg)
    store.write(engine, reg, finalize(lm, ds, specs, states, cfg))

    captured = []
    lm.run_with_hooks(ds.tokens, [HOOK], lambda _n, a: captured.append(a.clone()))
    t = {k: v for k, v in sae.tensors().items()}
    acts = formula(t, captured[0], arch, k=sae.cfg.k)  # [N, T, width], every token
    body = acts[:, 1:]
    flat = body.reshape(-1, width).double()
    peak, ppos = body.max(1)
    edges = torch.tensor(histogram_edges(), dtype=torch.float64)
    sid = reg.source_ids[source_slug(HOOK, width)]
    with engine.connect() as conn:
        src = conn.execute(select(Source).where(Source.id == sid)).one()
        assert (src.kind, src.status, src.sae_config.get("k")) == ("sae", "ready", sae.cfg.k)
        feats = conn.execute(select(Feature).where(Feature.source_id == sid)
                             .order_by(Feature.idx)).all()
        examples = stored_examples(conn, sid)
    engine.dispose()
    by_feature: dict[int, list] = {}
    for e in examples:
        by_feature.setdefault(e.feature_idx, []).append(e)
    assert not [e for e in examples if e.group == ExampleGroup.bottom]
    fired = (peak > 0).T.tolist()  # [width][sequence]
    n_checked = 0
    for f in range(width):
        cands = sorted((-peak[s, f].item(), s) for s in range(len(ds.tokens)) if fired[f][s])
        want = [s for _, s in cands[:cfg.top_k]]
        mine = by_feature.get(f, [])
        top = [e for e in mine if e.group == ExampleGroup.top]
        assert [e.seq_idx for e in top] == want, f"feature {f}"
        zero = [e.seq_idx for e in mine if e.group == ExampleGroup.zero]
        assert len(zero) == min(cfg.n_zero, len(ds.tokens) - len(cands)), f"feature {f}"
        assert not [s for s in zero if fired[f][s]], f"feature {f}"
        for e in top:
            s = e.seq_idx
            assert e.peak_value == pytest.approx(peak[s, f].item(), rel=1e-5, abs=1e-6)
            assert e.peak_pos == ppos[s, f].item() + 1
            start = window_start(torch.tensor(e.peak_pos), 32, cfg.window).item()
            assert e.start == start
            stored = np.frombuffer(e.acts, dtype="<f2").astype(np.float32)
            np.testing.assert_allclose(stored, acts[s, start:start + cfg.window, f].half().float(),
                                       rtol=2e-3, atol=1e-4)
            n_checked += 1
    col = flat.T  # [width, tokens]
    rows = {name: np.array([getattr(r, name) for r in feats]) for name in (
        "n_active", "max_act", "min_act", "mean_act", "std_act")}
    np.testing.assert_array_equal(rows["n_active"], (col > 0).sum(1).numpy())
    np.testing.assert_allclose(rows["max_act"], col.max(1).values.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["min_act"], col.min(1).values.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["mean_act"], col.mean(1).numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(rows["std_act"], col.std(1, correction=0).numpy(), rtol=1e-3,
                               atol=1e-6)
    bins = (torch.bucketize(flat.float().double(), edges, right=True) - 1).clamp(0, len(edges) - 2)
    want_hist = torch.zeros(width, len(edges) - 1, dtype=torch.int64).scatter_add_(
        1, bins.T, torch.ones_like(bins.T))
    got_hist = torch.tensor([json.loads(r.histogram) if isinstance(r.histogram, str)
                             else r.histogram for r in feats])
    assert torch.equal(got_hist, want_hist)
    for f in range(0, width, max(1, width // 64)):
        eff = lm.logit_effects(sae.W_dec[f:f + 1])[0]
        assert [tok for tok, _ in feats[f].top_logits] == eff.topk(10).indices.tolist()
    n_fired = sum(map(any, fired))
    assert n_fired > width // 4, n_fired  # the codes vary: many features fired somewhere
    assert (flat > 0).double().mean() < 0.5  # and most codes are zeros
    assert n_checked >= n_fired, n_checked


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "standard"])
def test_sparse_codes_fill_the_same_state_as_dense_ones(tiny_gpt2, tmp_path, arch):
    """An SAE source filled from its non-zero codes equals the same source filled from the
    dense codes: eager torch, the native loop, and the loop without host synchronisations."""
    from support import assert_states_equal

    from workers.corpus import load_dataset
    from workers.harvest import HarvestConfig, Harvester, run_harvest

    lm = tiny_gpt2
    save_sae(_varied_sae(arch, 4096), tmp_path / "sae")
    specs = sae_sources(lm, [str(tmp_path / "sae")])
    ds = load_dataset("pydoc", lm.tokenizer, seq_len=32, max_tokens=40 * 32)
    runs = {}
    for name, kw in {"dense": dict(sparse=False), "dense-native": dict(sparse=False, compile=True),
                     "sparse": {}, "sparse-sync-free": dict(sync_free=True)}.items():
        cfg = HarvestConfig(top_k=5, n_ranges=2, per_range=2, window=12, batch_size=4,
                            shard_sequences=12, **kw)
        harvester = Harvester(lm, ds.tokens, specs, cfg, bos_first=True)
        assert harvester._sparse(specs[0]) == (name == "sparse" or (
            name == "sparse-sync-free" and arch == "topk"))
        runs[name] = run_harvest(harvester)
    for states in runs.values():
        assert_states_equal(runs["dense"], states)
    top = runs["sparse"][specs[0].slug].top
    assert int(torch.isfinite(top.score).sum()) > 4096  # features fired in many sequences
