"""The embedding model of search by meaning (WordLlama's l2_supercat, 256-d, shipped inside the
`wordllama` package): what it computes, how well it tells related phrases from unrelated ones,
and that neither it nor the server imports torch; without the package, it says why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import needs_embedder

from app import embedding

ROOT = Path(__file__).resolve().parents[1]

# (phrase, related, unrelated): the related phrase must be the nearer one.
PAIRS = [
    ("python function definitions", "the def keyword starting a function", "closing parenthesis"),
    ("numbers and digits", "numerals such as 1, 2 and 3", "plural nouns"),
    ("female names", "women's first names like Mary", "programming keywords"),
    ("the end of a sentence", "full stop after a clause", "html tags"),
    ("code", "source code of a program", "a dog barking"),
]


def test_embeddings_are_wordllamas_own():
    needs_embedder()
    from tokenizers import Tokenizer
    from wordllama.inference import WordLlamaInference

    e = embedding.load_embedder()
    root = embedding.package_dir()
    theirs = WordLlamaInference(
        e.table.copy(), Tokenizer.from_file(str(root / "tokenizers"
                                                / "l2_supercat_tokenizer_config.json")))
    texts = ["closing parenthesis", "a", "Python's def keyword (twice: def def)", "é ü 東京"]
    ours = embedding.embed(texts)
    assert ours.dtype == np.float32 and ours.shape == (len(texts), embedding.DIM)
    np.testing.assert_allclose(ours, theirs.embed(texts, norm=True), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    assert not embedding.embed([""]).any()
    assert embedding.embed([]).shape == (0, embedding.DIM)


@pytest.mark.parametrize("phrase,related,unrelated", PAIRS)
def test_related_phrases_are_nearer(phrase, related, unrelated):
    needs_embedder()
    a, b, c = embedding.embed([phrase, related, unrelated])
    assert a @ b > a @ c + 0.15


def test_neither_the_embedder_nor_the_server_imports_torch():
    needs_embedder()
    code = ("import sys; from app import embedding, main; embedding.embed(['x']); "
            "print(sorted(m for m in ('torch', 'transformers', 'wordllama') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_without_the_package_it_says_why():
    code = ("import sys; sys.modules['wordllama'] = None; from app import embedding; "
            "print(embedding.available())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == embedding.MISSING
