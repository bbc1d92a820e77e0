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


def test_the_coarse_pass_finds_the_nearest_phrases():
    """Over 30,000 phrases of Python's documentation, the two-pass meaning search (leading
    dimensions, then the full ones) finds nearly all of the exact search's top 20."""
    needs_embedder()
    import random
    import re
    from pydoc_data.topics import topics

    from app.explanation_search import VectorIndex

    words = re.findall(r"[A-Za-z]+", " ".join(topics.values()))
    rng = random.Random(0)
    starts = [rng.randrange(len(words) - 10) for _ in range(30_000)]
    phrases = [" ".join(words[i:i + rng.randint(3, 9)]) for i in starts]
    vectors = embedding.embed(phrases)
    ids, sources = np.arange(1, len(phrases) + 1), np.zeros(len(phrases))
    coarse = VectorIndex.of(ids, sources, vectors, exact_up_to=1000)
    exact = VectorIndex.of(ids, sources, vectors, exact_up_to=10**6)
    queries = ["python function definitions", "closing parenthesis", "numbers and digits",
               "exceptions raised by a call", "string formatting", "the end of a sentence",
               "keyword arguments", "class attributes", "integer division", "file objects"]
    found = []
    for q in embedding.embed(queries):
        a, _ = coarse.nearest(q, source_ids=None, k=20)
        b, _ = exact.nearest(q, source_ids=None, k=20)
        found.append(len(set(a.tolist()) & set(b.tolist())) / 20)
    assert np.mean(found) >= 0.95 and min(found) >= 0.8, found
