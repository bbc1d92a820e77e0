"""workers.train: a toy model of superposition, the activation stream, the spliced evaluation
and `train-sae` end to end on a tiny GPT-2."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from workers.sae import METRIC_KEYS, SAE, SAEConfig, load_sae, sae_sources
from workers.sae_eval import evaluate, splice
from workers.train import TrainConfig, Trainer, cmd_train_sae, shuffled

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture
def one_thread():
    """Small matmuls run faster, and steadier on a loaded machine, on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def superposition(n_true: int = 64, d: int = 32, p: float = 0.04, seed: int = 0):
    """A known dictionary of n_true unit directions in d < n_true dimensions, and a sampler of
    activations that are sparse non-negative combinations of it."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_true, d, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)

    def sample(n: int) -> torch.Tensor:
        active = torch.rand(n, n_true, generator=gen) < p
        size = torch.rand(n, n_true, generator=gen) * 1.5 + 0.5
        return (active * size) @ dictionary

    return dictionary, sample


@pytest.mark.parametrize(("arch", "kw", "steps", "max_l0"), [
    ("topk", {"k": 4}, 200, 4),
    ("standard", {"sparsity_coeff": 3.0, "lr": 2e-3}, 500, 12),  # ReLU keeps small activations
    ("jumprelu", {"sparsity_coeff": 1.0, "lr": 2e-3}, 300, 6),
])
def test_toy_superposition_recovers_the_true_directions(arch, kw, steps, max_l0, one_thread):
    dictionary, sample = superposition()
    cfg = TrainConfig(hook_name=HOOK, d_sae=128, architecture=arch, batch_tokens=1024, **kw)
    trainer = Trainer(cfg, sample(4096), total_steps=steps)
    for _ in range(steps):
        trainer.step(sample(1024))
    sae = trainer.finish()
    w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best = (dictionary @ w.T).max(dim=1).values  # per true direction, its closest decoder row
    assert (best > 0.9).float().mean() >= 0.9, best.sort().values[:10]
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))  # unit rows, as stored
    x = sample(4096)
    f = sae.encode(x)
    fvu = (sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fvu < 0.3
    assert (f > 0).sum(-1).float().mean() <= max_l0  # 2.56 true directions per sample


def test_folding_the_scale_keeps_what_the_sae_computes(one_thread):
    """finish() maps the normalized-space SAE to raw units: same reconstruction, features
    divided by the scale."""
    _, sample = superposition()
    for arch, kw in (("topk", {"k": 4}), ("standard", {}), ("jumprelu", {})):
        cfg = TrainConfig(hook_name=HOOK, d_sae=64, architecture=arch, **kw)
        tr = Trainer(cfg, sample(2048) * 30, total_steps=20)
        for _ in range(20):
            tr.step(sample(256) * 30)
        x = sample(512) * 30
        xs = x * tr.scale
        with torch.no_grad():
            h = (xs - tr.b_dec) @ tr.W_enc + tr.b_enc
            if arch == "topk":
                top = h.topk(4, dim=-1)
                f = torch.zeros_like(h).scatter(-1, top.indices, top.values.relu())
            elif arch == "jumprelu":
                f = h.relu() * (h > tr.log_t.exp())
            else:
                f = h.relu()
            want = (f @ tr.W_dec + tr.b_dec) / tr.scale
        sae = tr.finish()
        torch.testing.assert_close(sae(x), want, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(sae.encode(x).sum(-1),
                                   (f * tr.W_dec.norm(dim=1)).sum(-1) / tr.scale,
                                   rtol=1e-4, atol=1e-4)


def test_shuffle_buffer_yields_every_activation_once_per_pass():
    chunks = [torch.arange(i * 10, i * 10 + 10, dtype=torch.float32)[:, None] for i in range(7)]
    for passes in (1, 2):
        out = list(shuffled(iter(chunks), buffer_tokens=24, batch_tokens=4, passes=passes,
                            generator=torch.Generator().manual_seed(0)))
        got = torch.cat(out)[:, 0]
        assert sorted(got.tolist()) == sorted(list(range(70)) * passes)
        assert got[:20].tolist() != list(range(20))  # mixed across chunks
        assert all(b.shape[0] <= 4 for b in out)


def test_config_is_validated():
    assert TrainConfig(hook_name=HOOK, d_sae=64).k == 32
    assert TrainConfig(hook_name=HOOK, d_sae=64, architecture="relu").architecture == "standard"
    assert TrainConfig(hook_name=HOOK, d_sae=64, architecture="standard").coeff == 5.0
    for bad, match in (({"k": 65}, "k must be"), ({"architecture": "gated"}, "architecture"),
                       ({"architecture": "standard", "k": 4}, "topk SAEs only"),
                       ({"sparsity_coeff": 1.0}, "not an L1"), ({"batch_tokens": 0}, "batch_tokens"),
                       ({"max_tokens": 0}, "max_tokens")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(hook_name=HOOK, d_sae=64, **bad)


@pytest.fixture(scope="module")
def tiny(tiny_gpt2_dir):
    from workers.corpus import load_dataset
    from workers.loading import load_model

    lm = load_model(str(tiny_gpt2_dir))
    return lm, load_dataset("pydoc", lm.tokenizer, seq_len=32, max_tokens=12 * 32)


def identity_sae(d: int) -> SAE:
    """A standard SAE that reconstructs exactly: relu(x) - relu(-x) = x."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, hook_name=HOOK, architecture="standard"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae.requires_grad_(False)


def test_splice_and_evaluate(tiny):
    lm, ds = tiny
    ids = ds.tokens[:4]
    with torch.inference_mode():
        clean = lm.hf_model(input_ids=ids).logits
        with splice(lm, HOOK, lambda a: a):
            same = lm.hf_model(input_ids=ids).logits
        with splice(lm, "blocks.0.mlp.hook_post", torch.zeros_like):
            other = lm.hf_model(input_ids=ids).logits
        after = lm.hf_model(input_ids=ids).logits
    torch.testing.assert_close(same, clean)
    torch.testing.assert_close(after, clean)  # the splice is gone
    assert not torch.allclose(other, clean)
    m = evaluate(lm, identity_sae(lm.d_model), ds.tokens[:6], first=1, batch_size=4)
    assert m["ce_spliced"] == pytest.approx(m["ce_clean"], abs=1e-4)
    assert m["ce_zero_ablation"] > m["ce_clean"]
    assert m["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert m["variance_explained"] == pytest.approx(1.0, abs=1e-4)
    assert m["mse"] < 1e-9 and m["l0"] == pytest.approx(lm.d_model, rel=0.05)


def args_for(model, out, **kw):
    base = dict(model=str(model), dataset="pydoc", hook=HOOK, features=128, k=8, l1=None,
                architecture=None, max_tokens=96 * 32, seq_len=32, batch_size=8, lr=None,
                device="cpu", seed=0, out=str(out), quiet=True)
    return argparse.Namespace(**{**base, **kw})


def test_train_sae_command_on_a_tiny_model(tiny, tiny_gpt2_dir, tmp_path, capsys):
    from app.config import Settings

    lm, _ = tiny
    settings = Settings(data_dir=tmp_path / "data")
    out = tmp_path / "sae"
    assert cmd_train_sae(args_for(tiny_gpt2_dir, out), settings, device="cpu") == 0
    assert "loss recovered" in capsys.readouterr().out
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert set(metrics) == set(METRIC_KEYS)
    assert 0 < metrics["variance_explained"] <= 1  # fvu < 1
    assert metrics["l0"] <= 8 and 0 <= metrics["dead_fraction"] < 1
    assert metrics["n_tokens_trained"] == 96 * 31  # distinct tokens, BOS left out
    assert metrics["ce_zero_ablation"] > metrics["ce_clean"]
    assert metrics["loss_recovered"] is not None
    cfg = json.loads((out / "cfg.json").read_text())
    assert {k: cfg[k] for k in ("d_in", "d_sae", "hook_name", "hook_layer", "architecture", "k",
                                "apply_b_dec_to_input", "normalize_activations", "context_size")
            } == {"d_in": 64, "d_sae": 128, "hook_name": HOOK, "hook_layer": 1,
                  "architecture": "topk", "k": 8, "apply_b_dec_to_input": True,
                  "normalize_activations": "none", "context_size": 32}
    (spec,) = sae_sources(lm, [str(out)])
    assert spec.slug == "1-res-sae-128" and spec.sae_config["metrics"] == metrics
    with pytest.raises(SystemExit, match="not empty"):
        cmd_train_sae(args_for(tiny_gpt2_dir, out), settings, device="cpu")

    relu = tmp_path / "relu"
    cmd_train_sae(args_for(tiny_gpt2_dir, relu, k=None, l1=1.0, max_tokens=24 * 32), settings,
                  device="cpu")
    assert load_sae(relu).cfg.architecture == "standard"
