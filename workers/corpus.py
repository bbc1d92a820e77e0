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
"""

from __future__ import annotations

import bz2
import difflib
import gzip
import hashlib
import itertools
import json
import logging
import lzma
import os
import platform
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.config import default_cache_dir
from app.db.tables import BosPolicy

log = logging.getLogger(__name__)

BUILTIN_DATASETS: dict[str, str] = {
    "pydoc": "Python's pydoc topics (pydoc_data.topics): English prose mixed with code, ~140k "
    "GPT-2 tokens; always available",
    "austen": "Jane Austen's six novels (Debian r-cran-janeaustenr), ~1M GPT-2 tokens",
    "fortunes": "Unix fortune cookies (Debian fortunes, fortunes-min), one document each",
}

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
FILE_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


class CorpusError(ValueError):
    """A corpus cannot be found, read or tokenized; the message says what to do about it."""


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


@dataclass(frozen=True)
class _Corpus:
    name: str
    source: str
    documents: Callable[[], Iterator[str]]


def _resolve(spec: str, *, text_field: str, cache_dir: Path | None) -> _Corpus:
    cache = default_cache_dir() if cache_dir is None else Path(cache_dir)
    if spec == "pydoc":
        return _Corpus(
            "pydoc", f"python:pydoc_data.topics (Python {platform.python_version()})", _pydoc_docs
        )
    if spec == "austen":
        root = _debian_root("austen", cache)
        return _Corpus("austen", _debian_source("austen", root), lambda: _austen_docs(root))
    if spec == "fortunes":
        root = _debian_root("fortunes", cache)
        return _Corpus("fortunes", _debian_source("fortunes", root), lambda: _fortune_docs(root))
    if spec.startswith("hf:"):
        return _hf_corpus(spec, text_field)
    path = Path(spec).expanduser()
    if not path.exists():
        raise CorpusError(_unknown_message(spec))
    path = path.resolve()
    files = _corpus_files(path)
    name = path.name if path.is_dir() else _strip_suffix(path.name)
    source = f"file:{path} sha256:{_hash_files(path, files)}"
    return _Corpus(name, source, lambda: _file_docs(files, text_field))


def _unknown_message(spec: str) -> str:
    names = ", ".join(BUILTIN_DATASETS)
    msg = (
        f"unknown dataset {spec!r}: not a built-in ({names}), not 'hf:NAME[:SPLIT]', "
        f"and no file or directory at {Path(spec).expanduser().absolute()}"
    )
    close = difflib.get_close_matches(spec, list(BUILTIN_DATASETS), n=1)
    return msg + (f"; did you mean {close[0]!r}?" if close else "")


def _strip_suffix(filename: str) -> str:
    for suffix in sorted(FILE_SUFFIXES, key=len, reverse=True):
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return filename


def _corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        if not path.name.endswith(FILE_SUFFIXES):
            raise CorpusError(
                f"{path}: unsupported file type; expected one of {', '.join(FILE_SUFFIXES)}"
            )
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.name.endswith(FILE_SUFFIXES)
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise CorpusError(f"{path}: no {', '.join(FILE_SUFFIXES)} files in this directory")
    return files


def _hash_files(root: Path, files: list[Path]) -> str:
    """sha256 of one file's bytes, or of (relative path, sha256) over a directory's files."""
    if len(files) == 1 and files[0] == root:
        return _sha256_file(root)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{_sha256_file(f)}\n".encode())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- local files


def _file_docs(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        if path.name.endswith(TEXT_SUFFIXES):
            yield _open_text(path).read()
        elif path.name.endswith(JSONL_SUFFIXES):
            yield from _jsonl_docs(path, text_field)
        else:
            yield from _parquet_docs(path, text_field)


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace")


def _jsonl_docs(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise CorpusError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                )
            if text_field not in record:
                keys = ", ".join(map(repr, record)) or "none"
                raise CorpusError(
                    f"{path}:{lineno}: no field {text_field!r} (fields: {keys}); "
                    "choose the text field with text_field="
                )
            text = record[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise CorpusError(
                    f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string"
                )
            yield text


def _parquet_docs(path: Path, text_field: str, batch_size: int = 1024) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise CorpusError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from exc
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"{path}: not a readable parquet file ({exc})") from exc
    with closing(pf):
        schema = pf.schema_arrow
        if text_field not in schema.names:
            raise CorpusError(
                f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); "
                "choose the text column with text_field="
            )
        kind = schema.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise CorpusError(f"{path}: column {text_field!r} is {kind}, not a string column")
        for batch in pf.iter_batches(batch_size=batch_size, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text


# ---------------------------------------------------------------------------- Hugging Face


def _hf_corpus(spec: str, text_field: str) -> _Corpus:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise CorpusError(f"bad spec {spec!r}: use hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name = parts[0]
    config = parts[1] if len(parts) == 3 else None
    split = parts[-1] if len(parts) > 1 else "train"
    try:
        import datasets
    except ImportError as exc:
        raise CorpusError(
            f"{spec!r} needs the `datasets` package (pip install datasets) and access to the "
            "Hugging Face hub; without them, export the text to .jsonl or .parquet and load "
            "the file"
        ) from exc
    source = f"hf:{name} split={split}" + (f" config={config}" if config else "")

    def documents() -> Iterator[str]:
        try:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
            rows = iter(ds)
            first = next(rows, None)
        except Exception as exc:  # noqa: BLE001 - the hub and loaders raise many kinds
            raise CorpusError(f"could not load {spec!r} from the Hugging Face hub: {exc}") from exc
        if first is None:
            return
        if text_field not in first:
            raise CorpusError(
                f"{spec!r}: no column {text_field!r} (columns: {', '.join(first)}); "
                "choose the text column with text_field="
            )
        for row in itertools.chain([first], rows):
            text = row[text_field]
            if text:
                yield text

    return _Corpus(f"hf:{name}", source, documents)


# ---------------------------------------------------------------------------- built-ins


def _pydoc_docs() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


@dataclass(frozen=True)
class _DebianCorpus:
    packages: tuple[str, ...]
    marker_files: tuple[str, ...]  # present once the packages are unpacked


_DEBIAN = {
    "austen": _DebianCorpus(
        ("r-cran-janeaustenr",),
        (
            "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb",
            "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx",
        ),
    ),
    "fortunes": _DebianCorpus(
        ("fortunes", "fortunes-min"),
        ("usr/share/games/fortunes/fortunes", "usr/share/games/fortunes/computers"),
    ),
}
_VERSIONS_FILE = ".debian-versions.json"


def _debian_root(name: str, cache_dir: Path) -> Path:
    """Where the package files of a Debian corpus lie: ``/`` if installed, else the cache."""
    spec = _DEBIAN[name]
    if all((Path("/") / f).is_file() for f in spec.marker_files):
        return Path("/")
    root = cache_dir / "corpora" / name / "root"
    if all((root / f).is_file() for f in spec.marker_files):
        return root
    _fetch_debian(name, spec, root)
    return root


def _fetch_debian(name: str, spec: _DebianCorpus, root: Path) -> None:
    """``apt-get download`` the packages and ``dpkg-deb -x`` them into ``root``, atomically."""
    hint = (
        f"the {name!r} corpus needs the Debian package(s) {', '.join(spec.packages)}: "
        f"install them (apt-get install {' '.join(spec.packages)}) or let featurescope fetch "
        "them with apt-get download (needs apt, dpkg-deb and fresh package lists: apt-get update)"
    )
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise CorpusError(f"{hint}; apt-get or dpkg-deb is not available here")
    root.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s for the %r corpus into %s", ", ".join(spec.packages), name, root)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fetch-") as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", *spec.packages], cwd=work, hint=hint)
        tree = work / "root"
        versions = {}
        for deb in sorted(work.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(tree)], cwd=work, hint=hint)
            pkg, _, rest = deb.name.partition("_")
            versions[pkg] = rest.partition("_")[0].replace("%3a", ":")
        missing = [f for f in spec.marker_files if not (tree / f).is_file()]
        if missing:
            raise CorpusError(f"{hint}; the downloaded packages lack {', '.join(missing)}")
        (tree / _VERSIONS_FILE).write_text(json.dumps(versions, sort_keys=True))
        try:
            os.replace(tree, root)
        except OSError:
            if not root.is_dir():  # else another process unpacked it first: keep theirs
                raise


def _run(cmd: list[str], *, cwd: Path, hint: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CorpusError(f"{hint}; `{' '.join(cmd)}` failed: {exc}") from exc
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise CorpusError(f"{hint}; `{' '.join(cmd)}` failed: {' | '.join(err[-3:])}")


def _debian_source(name: str, root: Path) -> str:
    packages = _DEBIAN[name].packages
    versions: dict[str, str] = {}
    stamp = root / _VERSIONS_FILE
    if stamp.is_file():
        versions = json.loads(stamp.read_text())
    else:
        try:
            out = subprocess.run(
                ["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", *packages],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
            versions = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "debian:" + ",".join(f"{p}={versions[p]}" if p in versions else p for p in packages)


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
    for name, value in _read_lazyload_db(data / "Rdata.rdx", data / "Rdata.rdb", _AUSTEN_NOVELS):
        if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
            raise CorpusError(f"{data}: {name} is not a character vector")
        yield "\n".join(line or "" for line in value)


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


# ---------------------------------------------------------------------------- R lazy-load DBs


def _read_lazyload_db(rdx: Path, rdb: Path, order: Iterable[str] = ()) -> Iterator[tuple[str, Any]]:
    """The objects of an R lazy-load database (``.rdx`` index + ``.rdb`` blobs), no R needed.

    ``order`` names come first, then the rest in the index's order.
    """
    index = _RReader(gzip.decompress(rdx.read_bytes())).read()
    fields = dict(zip(index.attrs.get("names", []), index, strict=False))
    variables = fields.get("variables")
    if variables is None:
        raise CorpusError(f"{rdx}: not an R lazy-load index")
    entries = dict(zip(variables.attrs.get("names", []), variables, strict=False))
    compressed = fields.get("compressed", [True])[0]
    names = [n for n in order if n in entries] + [n for n in entries if n not in order]
    with rdb.open("rb") as fh:
        for name in names:
            offset, length = (int(x) for x in entries[name])
            fh.seek(offset)
            blob = _decompress_r(fh.read(length), compressed)
            yield name, _RReader(blob).read()


def _decompress_r(blob: bytes, compressed: Any) -> bytes:
    """One ``.rdb`` chunk: a 4-byte big-endian length, then the compressed stream."""
    body = blob[4:]
    if compressed in (True, 1):
        return zlib.decompress(body)
    if compressed == 2:
        return bz2.decompress(body)
    kind = body[:1]  # compressed == 3: a type byte first
    payload = body[1:]
    if kind == b"Z":
        return zlib.decompress(payload)
    if kind == b"2":
        return bz2.decompress(payload)
    if kind == b"X":
        return lzma.decompress(payload)
    if kind == b"0":
        return payload
    raise CorpusError(f"unknown R compression {compressed!r} / {kind!r}")


class _RVector(list):
    """An R vector as a list, with its attributes (names, class, ...)."""

    def __init__(self, items: Iterable[Any] = (), attrs: dict[str, Any] | None = None):
        super().__init__(items)
        self.attrs = attrs or {}


class _RReader:
    """A reader of R's XDR serialization (format 2 and 3) for data: vectors, lists, pairlists.

    Environments, closures and byte code are out of scope and raise ``CorpusError``.
    """

    _NULLS = {254, 253, 252, 251, 250, 242, 241}  # NULL, global/empty/base env, unbound, ...
    _PAIRLISTS = {2, 6, 239, 240}  # LISTSXP, LANGSXP, ATTRLISTSXP, ATTRLANGSXP

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def read(self) -> Any:
        if self.data[:2] != b"X\n":
            raise CorpusError("not an R XDR serialization")
        self.pos = 2
        version = self._int()
        self._int()  # the writer's R version
        self._int()  # the oldest R that can read it
        if version == 3:
            n = self._int()
            self.pos += n  # skip the native encoding's name
        return self._item()

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _array(self, code: str, n: int) -> tuple:
        values = struct.unpack_from(f">{n}{code}", self.data, self.pos)
        self.pos += n * struct.calcsize(code)
        return values

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two 32-bit halves
            n = (self._int() << 32) + self._int()
        return n

    def _item(self) -> Any:
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in self._NULLS:
            return None
        if kind == 255:  # REFSXP
            return self.refs[(flags >> 8 or self._int()) - 1]
        if kind == 1:  # SYMSXP
            sym = self._item()
            self.refs.append(sym)
            return sym
        if kind in self._PAIRLISTS:
            return self._pairlist(has_attr, has_tag)
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None  # NA_character_
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if flags & (1 << 14) else "utf-8", errors="replace")
        if kind == 238:  # ALTREP_SXP
            return self._altrep()
        if kind in (10, 13):  # LGLSXP, INTSXP
            value = _RVector(self._array("i", self._length()))
        elif kind == 14:  # REALSXP
            value = _RVector(self._array("d", self._length()))
        elif kind == 15:  # CPLXSXP
            flat = self._array("d", 2 * self._length())
            value = _RVector(complex(*flat[i : i + 2]) for i in range(0, len(flat), 2))
        elif kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            value = _RVector(self._item() for _ in range(self._length()))
        elif kind == 24:  # RAWSXP
            n = self._length()
            value = _RVector(self.data[self.pos : self.pos + n])
            self.pos += n
        else:
            raise CorpusError(f"R object of SEXP type {kind} is not supported by this reader")
        if has_attr:
            value.attrs = self._attrs(self._item())
        return value

    def _pairlist(self, has_attr: int, has_tag: int) -> _RVector:
        items, tags = [], []
        while True:
            if has_attr:
                self._item()
            tags.append(self._item() if has_tag else None)
            items.append(self._item())
            flags = self._int()
            kind = flags & 0xFF
            if kind in self._PAIRLISTS:
                has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
                continue
            self.pos -= 4
            tail = self._item()
            if tail is not None:
                tags.append(None)
                items.append(tail)
            return _RVector(items, {"names": tags})

    @staticmethod
    def _attrs(pairlist: Any) -> dict[str, Any]:
        if not isinstance(pairlist, _RVector):
            return {}
        return dict(zip(pairlist.attrs["names"], pairlist, strict=True))

    def _altrep(self) -> Any:
        info, state, attr = self._item(), self._item(), self._item()
        cls = info[0] if isinstance(info, list) and info else None
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = state
            value = _RVector(start + i * step for i in range(int(n)))
            if cls == "compact_intseq":
                value = _RVector(int(v) for v in value)
        elif isinstance(cls, str) and cls.startswith("wrap_"):
            value = _RVector(state[0])
        else:
            raise CorpusError(f"R ALTREP class {cls!r} is not supported by this reader")
        value.attrs = self._attrs(attr)
        return value
