"""SAELens's own files, both ways: SAEs written by SAELens (`save_model`, and the TopK trainer's
`save_inference_model`) harvested through the CLI, every stored activation against SAELens's
`encode` on the same residuals; `train-sae` output loaded by SAELens's `load_from_disk`.

sae-lens is heavy (transformer-lens and friends): it is in the `compat` extra, and only this
module imports it. Where it is missing the module skips (in CI: fails)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sqlalchemy import select
from support import HOOK, skip_or_fail, stored_examples

try:
    from sae_lens.saes import (
        SAE,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata
except ImportError as exc:  # pragma: no cover - depends on the environment
    skip_or_fail(f"sae-lens is not installed ({exc}); pip install -e '.[compat]'", module=True)

from app.cli import main
from app.db.engine import make_engine
from app.db.tables import Dataset, Feature, Sequence, Source
from workers.accumulate import window_start
from workers.loading import load_model
from workers.sae import load_sae

SEQ_LEN, N_SEQ, D_SAE, WINDOW = 32, 40, 48, 12

# (architecture, what the cfg.json says beyond it); each one saved by SAELens itself
VARIANTS = {
    "standard": ("standard", {}),
    "standard, no b_dec on the input": ("standard", {"apply_b_dec_to_input": False}),
    "standard, layer_norm": ("standard", {"normalize_activations": "layer_norm"}),
    "jumprelu": ("jumprelu", {}),
    "topk": ("topk", {}),
    "topk, constant_norm_rescale": ("topk", {"normalize_activations": "constant_norm_rescale"}),
    "topk, rescaled by decoder norms": ("topk", {"rescale_acts_by_decoder_norm": True}),
    "topk trainer checkpoint": ("topk-trainer", {}),
}


@pytest.fixture(scope="module")
def lm(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir))


@pytest.fixture(scope="module")
def residual_rms(lm) -> float:
    """The typical size of one coordinate of the tiny model's residual stream at HOOK."""
    ids = torch.randint(0, 50000, (4, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    got = []
    lm.run_with_hooks(ids, [HOOK], lambda _n, a: got.append(a.float()))
    return float(got[0][:, 1:].pow(2).mean().sqrt())


def saelens_sae(arch: str, extra: dict, d_in: int, rms: float, seed: int) -> SAE:
    """An SAELens SAE with random weights on the scale of the residuals, so that features fire
    on some tokens and not on others."""
    meta = SAEMetadata(hook_name=HOOK, model_name="tiny-gpt2")
    if arch == "topk-trainer":  # what SAELens's TopK trainer writes: decoder rows of norm 0.1
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=D_SAE, k=6, metadata=meta))
        assert sae.cfg.rescale_acts_by_decoder_norm
    elif arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=D_SAE, k=6, metadata=meta, **extra))
    elif arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=D_SAE, metadata=meta, **extra))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=D_SAE, metadata=meta, **extra))
    g = torch.Generator().manual_seed(seed)
    scale = 1.0 if sae.cfg.normalize_activations != "none" else rms
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, D_SAE, generator=g) / (scale * d_in**0.5))
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.3 - 0.3)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.2 * scale)
        if arch == "topk" and extra.get("rescale_acts_by_decoder_norm"):
            w = torch.randn(D_SAE, d_in, generator=g)
            sae.W_dec.copy_(w * 0.1 / w.norm(dim=-1, keepdim=True))
        elif arch != "topk-trainer":
            sae.W_dec.copy_(torch.randn(D_SAE, d_in, generator=g) / d_in**0.5)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.4)
    return sae


def harvest(tmp_path, monkeypatch, model_dir, sae_dir) -> tuple[str, object]:
    """`featurescope harvest` of the SAE alone into a fresh SQLite file: (db URL, engine)."""
    monkeypatch.setenv("FEATURESCOPE_DATA_DIR", str(tmp_path / "data"))
    url = f"sqlite:///{tmp_path / 'fs.db'}"
    assert main(["harvest", "--model", str(model_dir), "--dataset", "pydoc", "--layers", "none",
                 "--sae", str(sae_dir), "--max-tokens", str(N_SEQ * SEQ_LEN), "--seq-len",
                 str(SEQ_LEN), "--top-k", "5", "--window", str(WINDOW), "--batch-size", "8",
                 "--db", url, "-q"]) == 0
    return url, make_engine(url)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_saelens_saved_sae_harvests_to_saelens_encode(name, lm, residual_rms, tiny_gpt2_dir,
                                                      tmp_path, monkeypatch):
    arch, extra = VARIANTS[name]
    sae = saelens_sae(arch, extra, lm.d_model, residual_rms, seed=len(name))
    folder = tmp_path / "sae"
    if arch == "topk-trainer":
        sae.save_inference_model(folder)
    else:
        sae.save_model(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["sae_lens_version"]  # SAELens 6's own layout, metadata and all
    ours = load_sae(folder)
    assert ours.cfg.rescale_acts_by_decoder_norm == bool(cfg.get("rescale_acts_by_decoder_norm"))
    _, engine = harvest(tmp_path, monkeypatch, tiny_gpt2_dir, folder)

    with engine.connect() as conn:
        src = conn.execute(select(Source)).one()
        n_seq = conn.scalar(select(Dataset.n_sequences).where(Dataset.id == src.dataset_id))
        seqs = dict(conn.execute(select(Sequence.idx, Sequence.tokens)
                                 .where(Sequence.dataset_id == src.dataset_id)).all())
        feats = {f.idx: f for f in conn.execute(select(Feature).where(
            Feature.source_id == src.id))}
        examples = stored_examples(conn, src.id)
    assert (src.kind, src.n_features, src.hook_name) == ("sae", D_SAE, HOOK)
    ids = torch.tensor(np.stack([np.frombuffer(seqs[i], dtype="<i4") for i in range(n_seq)]),
                       dtype=torch.long)
    got = []
    lm.run_with_hooks(ids, [HOOK], lambda _n, a: got.append(a.clone()))
    with torch.no_grad():
        acts = sae.encode(got[0]).float()  # SAELens's own encode: [N, T, D_SAE]
    body = acts[:, 1:]  # the BOS position is never an example's peak nor in the statistics

    fired = [f for f in range(D_SAE) if body[:, :, f].max() > 0]
    assert len(fired) > D_SAE // 2, f"only {len(fired)} features fired"
    for f in fired:
        assert feats[f].max_act == pytest.approx(body[:, :, f].max().item(), rel=1e-5, abs=1e-6)
    peaks = body.max(1).values  # [N, D_SAE]
    for f in fired:
        want = sorted(peaks[:, f][peaks[:, f] > 0].tolist(), reverse=True)[:5]
        top = [e.peak_value for e in examples if e.feature_idx == f and e.group == 0]
        np.testing.assert_allclose(top, want, rtol=1e-5, atol=1e-6)
    assert len(examples) > 3 * len(fired)
    for e in examples:  # every stored example of every group, at its own positions
        f, s = e.feature_idx, e.seq_idx
        assert e.peak_value == pytest.approx(acts[s, e.peak_pos, f].item(), rel=1e-5, abs=1e-6)
        assert e.start == window_start(torch.tensor(e.peak_pos), SEQ_LEN, WINDOW).item()
        stored = np.frombuffer(e.acts, dtype="<f2").astype(np.float32)
        np.testing.assert_allclose(stored, acts[s, e.start:e.start + WINDOW, f].half().float(),
                                   rtol=2e-3, atol=1e-4)
    if ours.cfg.rescale_acts_by_decoder_norm:  # read without the flag, every value was 10x off
        unscaled = torch.relu(torch.topk(
            (got[0] - sae.b_dec) @ sae.W_enc + sae.b_enc, 6, dim=-1).values).max()
        assert unscaled.item() > 5 * acts.max().item()


def test_train_sae_output_loads_in_saelens_and_encodes_the_same(lm, tiny_gpt2_dir, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("FEATURESCOPE_DATA_DIR", str(tmp_path / "data"))
    ids = torch.randint(0, 50000, (6, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    got = []
    lm.run_with_hooks(ids, [HOOK], lambda _n, a: got.append(a.clone()))
    x = got[0]
    for name, flags in (("topk", ["--k", "8"]), ("relu", ["--l1", "1.0"]),
                        ("jumprelu", ["--architecture", "jumprelu"])):
        out = tmp_path / name
        assert main(["train-sae", "--model", str(tiny_gpt2_dir), "--dataset", "pydoc", "--hook",
                     HOOK, "--features", "64", *flags, "--max-tokens", str(24 * SEQ_LEN),
                     "--seq-len", str(SEQ_LEN), "--device", "cpu", "--out", str(out),
                     "-q"]) == 0
        theirs = SAE.load_from_disk(str(out))
        ours = load_sae(out)
        assert (theirs.cfg.d_in, theirs.cfg.d_sae) == (lm.d_model, 64)
        assert theirs.cfg.architecture() == ours.cfg.architecture, name
        assert theirs.cfg.metadata.hook_name == HOOK
        with torch.no_grad():
            want, mine = theirs.encode(x), ours.encode(x)
        assert (want > 0).any(), name
        torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
