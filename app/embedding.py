"""Text embeddings of explanations, offline and torch-free: WordLlama's 256-d `l2_supercat`
model, whose weights and tokenizer ship inside the PyPI package `wordllama` (the `embed`
extra). A text's embedding is the mean of its tokens' vectors, made unit length; that is what
`wordllama`'s own `embed(..., norm=True)` computes, without importing it (its import configures
the root logger) or its downloads.

`store_missing_vectors` writes the vectors of the explanations that have none; `featurescope
explain` calls it after writing explanations, and `featurescope embed-explanations` runs it on
its own. Where the package is missing, `load_embedder()` says why and search is text-only.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from app.db.tables import Explanation, ExplanationVector

log = logging.getLogger(__name__)

PACKAGE = "wordllama"
EMBEDDER = "wordllama-l2_supercat-256"
"""The name stored with each vector (`explanation_vectors.embedder`)."""
DIM = 256
VECTOR = np.dtype("<f4")
"""A stored vector: DIM little-endian float32s of unit length (or all zero for a text with no
token)."""
_WEIGHTS = ("weights", "l2_supercat_256.safetensors")
_TOKENIZER = ("tokenizers", "l2_supercat_tokenizer_config.json")
MISSING = (f"search by meaning is off: the package {PACKAGE!r} is not installed "
           "(pip install 'featurescope[embed]'); explanations are searched by their words only")


class EmbedderMissing(RuntimeError):
    """The embedding model's package is not installed."""


@dataclass(frozen=True)
class Embedder:
    """The token table (vocab x DIM float32) and tokenizer of the embedding model."""

    name: str
    table: np.ndarray
    tokenizer: object  # tokenizers.Tokenizer

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), DIM]: each text's mean token vector, unit length (zero for a
        text without tokens)."""
        out = np.zeros((len(texts), self.table.shape[1]), dtype=np.float32)
        if not len(texts):
            return out
        encoded = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        top = self.table.shape[0] - 1
        for i, enc in enumerate(encoded):
            if enc.ids:
                v = self.table[np.clip(np.asarray(enc.ids), 0, top)].mean(axis=0)
                norm = float(np.linalg.norm(v))
                if norm > 0:
                    out[i] = v / norm
        return out


def package_dir() -> Path | None:
    """Where the `wordllama` package is installed (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):  # blocked: sys.modules[PACKAGE] is None
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


_lock = threading.Lock()
_loaded: list[Embedder] = []


def load_embedder() -> Embedder:
    """The embedding model, read once per process (about 0.5 s); EmbedderMissing where its
    package or files are not there."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            _loaded.append(_read())
    return _loaded[0]


def _read() -> Embedder:
    root = package_dir()
    if root is None:
        raise EmbedderMissing(MISSING)
    weights, tokenizer = root.joinpath(*_WEIGHTS), root.joinpath(*_TOKENIZER)
    for path in (weights, tokenizer):
        if not path.is_file():
            raise EmbedderMissing(f"search by meaning is off: {path} is missing from the "
                                  f"installed {PACKAGE!r} package")
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    table = np.ascontiguousarray(load_file(str(weights))["embedding.weight"], dtype=np.float32)
    tok = Tokenizer.from_file(str(tokenizer))
    tok.no_padding()
    tok.no_truncation()
    return Embedder(EMBEDDER, table, tok)


def available() -> str | None:
    """None when the embedding model loads, else why it does not."""
    try:
        load_embedder()
    except EmbedderMissing as exc:
        return str(exc)
    return None


def embed(texts: Sequence[str]) -> np.ndarray:
    """float32 [n, DIM] unit vectors of the texts; EmbedderMissing without the package."""
    return load_embedder().embed(texts)


def store_missing_vectors(engine: Engine, *, source_id: int | None = None,
                          batch: int = 2000) -> int:
    """Embed every explanation (of one source, or all) that has no vector from this embedder
    yet, and store the vectors; commits every `batch` explanations, so an interrupted run keeps
    what it wrote. Returns how many it stored; EmbedderMissing without the package."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    embedder = load_embedder()
    done = 0
    after = 0
    while True:
        q = (select(Explanation.id, Explanation.text)
             .outerjoin(ExplanationVector, (ExplanationVector.explanation_id == Explanation.id)
                        & (ExplanationVector.embedder == embedder.name))
             .where(ExplanationVector.explanation_id.is_(None), Explanation.id > after)
             .order_by(Explanation.id).limit(batch))
        if source_id is not None:
            q = q.where(Explanation.source_id == source_id)
        with Session(engine) as session, session.begin():
            rows = session.execute(q).all()
            if not rows:
                return done
            vectors = embedder.embed([r.text for r in rows]).astype(VECTOR)
            # An explanation keeps one vector: one from another embedder gives way.
            ids = [r.id for r in rows]
            session.execute(ExplanationVector.__table__.delete().where(
                ExplanationVector.explanation_id.in_(ids)))
            session.execute(insert(ExplanationVector), [
                {"explanation_id": i, "embedder": embedder.name, "vector": v.tobytes()}
                for i, v in zip(ids, vectors, strict=True)])
        done += len(rows)
        after = rows[-1].id
        log.info("stored %d explanation vectors", done)
