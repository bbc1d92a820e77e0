"""Text corpora -> fixed-length token sequences, with their provenance.

A *dataset* is a corpus tokenized into sequences of ``seq_len`` tokens. Corpora come from

- built-in sources that work offline (``BUILTIN_DATASETS``): Python's own ``pydoc_data``
  topics, Jane Austen's novels and the Unix fortunes from Debian packages;
- local files: ``.txt`` (one document per file), ``.jsonl`` (one JSON object per line),
  ``.parquet`` (one row per document), each optionally gzipped except parquet, or a directory
  of such files (read in sorted order);
- the Hugging Face hub, ``hf:NAME``, ``hf:NAME:SPLIT`` or ``hf:NAME:CONFIG:SPLIT``, through the
  ``datasets`` library when it is installed.

Documents are joined with the EOS token between them and cut into sequences; when the tokenizer
has a BOS token every sequence starts with it (see ``tokenize_documents``). Reading and
tokenizing stream: asking for ``max_tokens`` reads only as many documents as that needs.

Beside this module: the readers of files and of the hub (workers/documents.py), the fetching of
Debian packages (workers/debian.py) and the reader of R data (workers/rdata.py).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import platform
import re
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.config import default_cache_dir
from app.db.tables import BosPolicy
from workers.debian import DebianError, DebianFiles, package_root, provenance
from workers.documents import Corpus, CorpusError, file_corpus, hf_corpus
from workers.rdata import RDataError, read_lazyload_db

log = logging.getLogger(__name__)

BUILTIN_DATASETS: dict[str, str] = {
    "pydoc": "Python's pydoc topics (pydoc_data.topics): English prose mixed with code, ~140k "
    "GPT-2 tokens; always available",
    "austen": "Jane Austen's six novels (Debian r-cran-janeaustenr), ~1M GPT-2 tokens",
    "fortunes": "Unix fortune cookies (Debian fortunes, fortunes-min), one document each",
}


@dataclass(frozen=True)
class TokenizedDataset:
    """A corpus cut into ``tokens`` [n_sequences, seq_len] (int64), with its provenance."""

    name: str
    source: str
    slice: str
    seq_len: int
    bos_policy: str
    tokenizer_hash: str
    tokens: torch.Tensor

    @property
    def n_sequences(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def slug(self) -> str:
        """``{name}-{hash}``: URL-safe, lowercase, and the same whenever the tokens are."""
        key = json.dumps(
            [self.source, self.slice, self.seq_len, self.bos_policy, self.tokenizer_hash]
        )
        return f"{_sanitize(self.name)}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48].strip("-") or "dataset"


# ---------------------------------------------------------------------------- public API


def iter_documents(
    spec: str, *, text_field: str = "text", cache_dir: Path | None = None
) -> Iterator[str]:
    """The documents of a corpus, in a fixed order.

    ``spec`` is a built-in name (``BUILTIN_DATASETS``); a path to a ``.txt`` file (one
    document), a ``.jsonl`` file (the ``text_field`` string of each line's object), a
    ``.parquet`` file (the ``text_field`` column), or a directory of such files (sorted,
    recursively); or ``hf:NAME[:SPLIT]`` / ``hf:NAME:CONFIG:SPLIT`` through ``datasets``.
    Unknown names and missing files raise ``CorpusError`` at once; bad records raise it while
    iterating.
    """
    return _resolve(spec, text_field=text_field, cache_dir=cache_dir).documents()


def tokenize_documents(
    docs: Iterable[str], tokenizer, *, seq_len: int = 128, max_tokens: int | None = None
) -> tuple[torch.Tensor, str]:
    """Concatenate documents separated by EOS and cut them into sequences of ``seq_len``.

    With a BOS token every sequence is ``[bos] + seq_len - 1`` corpus tokens (policy
    ``bos-prepended``), else ``seq_len`` corpus tokens (policy ``none``). The incomplete last
    sequence is dropped. ``max_tokens`` caps the total at ``max_tokens // seq_len`` sequences,
    and documents are read only until those are filled. Text that spells a special token
    (``<|endoftext|>``) is tokenized as plain text, never as the control token.

    Returns ``(tokens int64 [n_sequences, seq_len], policy)``.
    """
    tokens, policy, _ = _tokenize(docs, tokenizer, seq_len=seq_len, max_tokens=max_tokens)
    return tokens, policy


def load_dataset(
    spec: str,
    tokenizer,
    *,
    seq_len: int = 128,
    max_tokens: int | None = None,
    text_field: str = "text",
    cache_dir: Path | None = None,
) -> TokenizedDataset:
    """Read and tokenize a corpus (see ``iter_documents``) into a ``TokenizedDataset``."""
    corpus = _resolve(spec, text_field=text_field, cache_dir=cache_dir)
    with closing(corpus.documents()) as docs:
        tokens, policy, n_corpus = _tokenize(
            docs, tokenizer, seq_len=seq_len, max_tokens=max_tokens
        )
    n_seq = int(tokens.shape[0])
    if n_seq == 0:
        body = seq_len - (1 if policy == BosPolicy.prepended else 0)
        if max_tokens is not None and max_tokens < seq_len:
            why = f"max_tokens={max_tokens} is less than seq_len={seq_len}"
        else:
            why = (
                f"the corpus has only {n_corpus} tokens and one sequence of seq_len={seq_len} "
                f"needs {body} corpus tokens ({policy})"
            )
        raise CorpusError(f"dataset {spec!r} gives no sequences: {why}")
    full = max_tokens is None or n_seq < max_tokens // seq_len
    ds = TokenizedDataset(
        name=corpus.name,
        source=corpus.source,
        slice="all" if full else f"first {n_seq * seq_len} tokens",
        seq_len=seq_len,
        bos_policy=policy,
        tokenizer_hash=tokenizer_hash(tokenizer),
        tokens=tokens,
    )
    log.info(
        "dataset %s: %d sequences x %d tokens (%s, %s) from %s",
        ds.slug,
        n_seq,
        seq_len,
        ds.slice,
        policy,
        ds.source,
    )
    return ds


def tokenizer_hash(tokenizer) -> str:
    """sha256 hex of a stable serialization of the tokenizer (vocab, merges, special tokens).

    Fast tokenizers: the backend's JSON without its run-time truncation and padding state.
    Others: the vocabulary and the special tokens. Both add the BOS and EOS ids.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = {
            "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0])),
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        }
    # Which token is BOS and EOS changes the sequences (separators, first token): hash them too.
    state = {"tokenizer": state, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    blob = json.dumps(state, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare_builtin(name: str, cache_dir: Path | None = None) -> Path | None:
    """Make a built-in corpus available offline ahead of time; its files' root, or None.

    ``pydoc`` needs nothing; the Debian corpora are fetched with ``apt-get download`` and
    unpacked with ``dpkg-deb -x`` under ``cache_dir/corpora/NAME/`` unless installed system-wide.
    """
    if name not in BUILTIN_DATASETS:
        raise CorpusError(_unknown_message(name))
    if name == "pydoc":
        return None
    return _debian_root(name, default_cache_dir() if cache_dir is None else Path(cache_dir))


# ---------------------------------------------------------------------------- tokenizing

_MAX_BATCH_CHARS = 1 << 20  # characters per tokenizer call when the whole corpus is wanted
_MIN_BATCH_CHARS = 1 << 12
_CHARS_PER_TOKEN_GUESS = 4  # sizes batches when a cap is known; too low only costs a call
_HUGE_DOC_CHARS = 1 << 18  # with a cap, a longer document is tokenized by prefixes
_PREFIX_MARGIN_CHARS = 1024  # tokens ending this close to a prefix's cut are not trusted


def _tokenize(
    docs: Iterable[str], tokenizer, *, seq_len: int, max_tokens: int | None
) -> tuple[torch.Tensor, str, int]:
    """``tokenize_documents`` plus the number of corpus tokens read (for error messages)."""
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    policy = BosPolicy.prepended if bos is not None else BosPolicy.none
    body = seq_len - (1 if bos is not None else 0)
    if body < 1:
        raise CorpusError(f"seq_len={seq_len} leaves no room for corpus tokens ({policy})")
    if max_tokens is not None and max_tokens < 0:
        raise CorpusError(f"max_tokens must be >= 0, got {max_tokens}")
    need = None if max_tokens is None else (max_tokens // seq_len) * body

    chunks: list[torch.Tensor] = []
    have = 0
    n_docs = 0

    def add(ids_per_doc: list[list[int]]) -> None:
        nonlocal have, n_docs
        flat: list[int] = []
        for ids in ids_per_doc:
            if n_docs and eos is not None:
                flat.append(eos)
            flat.extend(ids)
            n_docs += 1
        chunks.append(torch.tensor(flat, dtype=torch.int64))
        have += len(flat)

    def done() -> bool:
        return need is not None and have >= need

    batch: list[str] = []
    batch_chars = 0
    if need != 0:
        for doc in docs:
            if not doc:
                continue
            if need is not None and len(doc) > _HUGE_DOC_CHARS:
                if batch:
                    add(_encode(tokenizer, batch))
                    batch, batch_chars = [], 0
                    if done():
                        break
                add([_encode_prefix(tokenizer, doc, need - have)])
                if done():
                    break
                continue
            batch.append(doc)
            batch_chars += len(doc)
            if need is None:
                limit = _MAX_BATCH_CHARS
            else:
                limit = (need - have) * _CHARS_PER_TOKEN_GUESS
                limit = min(max(limit, _MIN_BATCH_CHARS), _MAX_BATCH_CHARS)
            if batch_chars >= limit:
                add(_encode(tokenizer, batch))
                batch, batch_chars = [], 0
                if done():
                    break
        if batch and not done():
            add(_encode(tokenizer, batch))

    stream = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int64)
    n_seq = stream.numel() // body
    if max_tokens is not None:
        n_seq = min(n_seq, max_tokens // seq_len)
    tokens = stream[: n_seq * body].view(n_seq, body)
    if bos is not None:
        tokens = torch.cat([torch.full((n_seq, 1), bos, dtype=torch.int64), tokens], dim=1)
    log.debug("tokenized %d documents into %d tokens -> %d sequences", n_docs, have, n_seq)
    return tokens.contiguous(), policy, have


def _encode(tokenizer, texts: list[str], **kwargs: Any):
    out = tokenizer(
        texts, add_special_tokens=False, split_special_tokens=True, verbose=False, **kwargs
    )
    return out if kwargs else out["input_ids"]


def _encode_prefix(tokenizer, text: str, n_needed: int) -> list[int]:
    """At least ``n_needed`` leading tokens of ``text`` (or all of it), tokenizing a prefix.

    Tokens are kept only if they end well before the cut, where tokenizing the prefix and
    the whole text agree. Slow tokenizers have no offsets: they tokenize the whole text.
    """
    if not getattr(tokenizer, "is_fast", False):
        return _encode(tokenizer, [text])[0]
    cut = max(n_needed * _CHARS_PER_TOKEN_GUESS * 2, _MIN_BATCH_CHARS)
    while cut + _PREFIX_MARGIN_CHARS < len(text):
        enc = _encode(tokenizer, [text[: cut + _PREFIX_MARGIN_CHARS]], return_offsets_mapping=True)
        ids, offsets = enc["input_ids"][0], enc["offset_mapping"][0]
        keep = 0
        while keep < len(ids) and offsets[keep][1] <= cut:
            keep += 1
        if keep >= n_needed:
            return ids[:keep]
        cut *= 4
    return _encode(tokenizer, [text])[0]


# ---------------------------------------------------------------------------- resolving specs


def _resolve(spec: str, *, text_field: str, cache_dir: Path | None) -> Corpus:
    cache = default_cache_dir() if cache_dir is None else Path(cache_dir)
    if spec == "pydoc":
        return Corpus(
            "pydoc", f"python:pydoc_data.topics (Python {platform.python_version()})", _pydoc_docs
        )
    if spec == "austen":
        root = _debian_root("austen", cache)
        return Corpus("austen", provenance(_DEBIAN["austen"], root), lambda: _austen_docs(root))
    if spec == "fortunes":
        root = _debian_root("fortunes", cache)
        return Corpus("fortunes", provenance(_DEBIAN["fortunes"], root),
                       lambda: _fortune_docs(root))
    if spec.startswith("hf:"):
        return hf_corpus(spec, text_field)
    path = Path(spec).expanduser()
    if not path.exists():
        raise CorpusError(_unknown_message(spec))
    return file_corpus(path.resolve(), text_field)


def _unknown_message(spec: str) -> str:
    names = ", ".join(BUILTIN_DATASETS)
    msg = (
        f"unknown dataset {spec!r}: not a built-in ({names}), not 'hf:NAME[:SPLIT]', "
        f"and no file or directory at {Path(spec).expanduser().absolute()}"
    )
    close = difflib.get_close_matches(spec, list(BUILTIN_DATASETS), n=1)
    return msg + (f"; did you mean {close[0]!r}?" if close else "")


# ---------------------------------------------------------------------------- built-ins


def _pydoc_docs() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


_DEBIAN = {  # the packages of each Debian corpus, and files of theirs its documents are read from
    "austen": DebianFiles(
        ("r-cran-janeaustenr",),
        (
            "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb",
            "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx",
        ),
    ),
    "fortunes": DebianFiles(
        ("fortunes", "fortunes-min"),
        ("usr/share/games/fortunes/fortunes", "usr/share/games/fortunes/computers"),
    ),
}


def _debian_root(name: str, cache_dir: Path) -> Path:
    """Where the package files of a Debian corpus lie: ``/`` if installed, else the cache."""
    try:
        return package_root(_DEBIAN[name], cache_dir / "corpora" / name / "root",
                            purpose=f"the {name!r} corpus")
    except DebianError as exc:
        raise CorpusError(str(exc)) from exc


# Publication order; the package's index lists them alphabetically.
_AUSTEN_NOVELS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)


def _austen_docs(root: Path) -> Iterator[str]:
    """The six novels, one document each: the book's lines joined by newlines."""
    data = root / "usr/lib/R/site-library/janeaustenr/data"
    novels = read_lazyload_db(data / "Rdata.rdx", data / "Rdata.rdb", _AUSTEN_NOVELS)
    try:
        for name, lines in novels:
            if not isinstance(lines, list) or any(not isinstance(v, str | None) for v in lines):
                raise CorpusError(f"{data}: {name} is not a character vector")
            yield "\n".join(line or "" for line in lines)
    except RDataError as exc:
        raise CorpusError(f"{data}: {exc}") from exc


def _fortune_docs(root: Path) -> Iterator[str]:
    """Every fortune of every file (sorted), one document each."""
    folder = root / "usr/share/games/fortunes"
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for cookie in re.split(r"^%$", text, flags=re.MULTILINE):
            cookie = cookie.strip("\n")
            if cookie.strip():
                yield cookie
