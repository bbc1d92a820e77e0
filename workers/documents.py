"""The documents of a corpus that is not a built-in: local files (``.txt``, ``.jsonl``,
``.parquet``, gzipped or not but parquet, or a directory of them) and Hugging Face datasets
(``hf:NAME``), each as a `Corpus` with its provenance. Bad records raise `CorpusError` while
iterating, with the file and line."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
FILE_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


class CorpusError(ValueError):
    """A corpus cannot be found, read or tokenized; the message says what to do about it."""


@dataclass(frozen=True)
class Corpus:
    """A corpus resolved from its spec: its name, its provenance and its documents, in a fixed
    order (each call of `documents` starts over)."""

    name: str
    source: str
    documents: Callable[[], Iterator[str]]


def file_corpus(path: Path, text_field: str) -> Corpus:
    """A file (``.txt``: one document; ``.jsonl``: the `text_field` string of each line's object;
    ``.parquet``: the `text_field` column) or a directory of such files, sorted, recursively.
    Its provenance holds the path and the sha256 of the files' bytes."""
    files = _corpus_files(path)
    name = path.name if path.is_dir() else _strip_suffix(path.name)
    source = f"file:{path} sha256:{_hash_files(path, files)}"
    return Corpus(name, source, lambda: _file_docs(files, text_field))


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


def hf_corpus(spec: str, text_field: str) -> Corpus:
    """`hf:NAME`, `hf:NAME:SPLIT` or `hf:NAME:CONFIG:SPLIT` through the `datasets` library."""
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

    return Corpus(f"hf:{name}", source, documents)
