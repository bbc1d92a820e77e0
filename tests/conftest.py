"""Shared fixtures: tiny real models built from configs, a real GPT-2 tokenizer, databases."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    build_tiny_gpt2,
    build_tiny_llama,
    disposing_engines,
    drop_pg_databases,
    fresh_pg_url,
    gpt2_tokenizer,
    needs_postgres,
    seed_everything,
)


def _save_tiny(path: Path, model, tokenizer) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def seeded():
    seed_everything(0)


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


# ---------------------------------------------------------------- databases


@pytest.fixture(scope="session", autouse=True)
def _drop_pg_databases() -> Iterator[None]:
    """The PostgreSQL databases the session made (fresh_pg_url) are dropped when it ends."""
    yield
    drop_pg_databases()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> Iterator[str]:
    """A fresh empty database: a SQLite file, or a new database on the PostgreSQL server.
    Engines the test connects to it are disposed when it ends.

    In CI (CI=true) a missing PostgreSQL server is a failure, elsewhere the test skips.
    """
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'featurescope.db'}"
    else:
        needs_postgres()
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        url = fresh_pg_url(f"fs_test_{worker}_{abs(hash(request.node.nodeid)) % 10**8}")
    with disposing_engines(url):
        yield url
