"""workers.corpus: built-in and file corpora -> token sequences, with the real GPT-2 tokenizer."""

from __future__ import annotations

import gzip
import itertools
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from support import gpt2_tokenizer

from app.config import DEFAULT_DATASET
from workers.corpus import (
    BUILTIN_DATASETS,
    CorpusError,
    TokenizedDataset,
    iter_documents,
    load_dataset,
    prepare_builtin,
    tokenize_documents,
    tokenizer_hash,
)

EOT = "<|endoftext|>"
EOT_ID = 50256


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def pydoc_docs() -> list[str]:
    return list(iter_documents("pydoc"))


class Recording:
    """A tokenizer proxy that counts the characters it was asked to tokenize."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.chars = 0
        self.longest = 0

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, texts, **kwargs):
        self.chars += sum(map(len, texts))
        self.longest = max([self.longest, *map(len, texts)])
        return self._tok(texts, **kwargs)


def brute_force(docs: list[str], tokenizer) -> list[int]:
    """The concatenated text, EOS between documents, tokenized in one call."""
    assert not any(EOT in d for d in docs)
    return tokenizer(EOT.join(d for d in docs if d), add_special_tokens=False)["input_ids"]


def small_docs() -> list[str]:
    return [
        "The quick brown fox jumps over the lazy dog.\n\nIt was not amused.",
        '{"json": "looking", "text": [1, 2, 3]}\n',
        "Ünïcödé — «quotes» and emoji 🦊 and CJK 漢字 and tabs\tinside.",
        "def f(x):\n    return x ** 2  # code\n",
        "",  # empty documents are skipped
        "A last line without newline",
    ] * 8


# ---------------------------------------------------------------------------- pydoc


def test_pydoc_matches_brute_force(tok, pydoc_docs):
    ds = load_dataset("pydoc", tok, seq_len=64)
    assert DEFAULT_DATASET == "pydoc" and {"pydoc", "austen"} <= set(BUILTIN_DATASETS)
    assert len(pydoc_docs) > 50
    assert ds.name == "pydoc" and ds.source.startswith("python:pydoc_data.topics (Python 3.")
    assert ds.slice == "all" and ds.bos_policy == "bos-prepended" and ds.seq_len == 64
    assert ds.tokens.dtype == torch.int64 and ds.tokens.shape == (ds.n_sequences, 64)
    assert ds.n_tokens == ds.n_sequences * 64 and ds.n_sequences > 2000
    assert (ds.tokens[:, 0] == EOT_ID).all()

    expected = brute_force(pydoc_docs, tok)
    assert ds.n_sequences == len(expected) // 63  # only the incomplete last sequence dropped
    assert ds.tokens[:, 1:].flatten().tolist() == expected[: ds.n_sequences * 63]
    text = tok.decode(ds.tokens[:, 1:].flatten().tolist())
    assert EOT.join(pydoc_docs).startswith(text) and len(text) > 0.99 * len(EOT.join(pydoc_docs))
    assert ds.tokenizer_hash == tokenizer_hash(tok) and re.fullmatch(
        r"[0-9a-f]{64}", ds.tokenizer_hash
    )


def test_max_tokens_caps_exactly_and_is_a_prefix(tok):
    full = load_dataset("pydoc", tok, seq_len=64)
    capped = load_dataset("pydoc", tok, seq_len=64, max_tokens=1000)
    assert capped.n_sequences == 1000 // 64 and capped.n_tokens == 960
    assert capped.slice == "first 960 tokens"
    assert torch.equal(capped.tokens, full.tokens[: capped.n_sequences])
    assert capped.slug != full.slug
    assert load_dataset("pydoc", tok, seq_len=64, max_tokens=10**9).slug == full.slug


def test_max_tokens_streams_documents(tok):
    consumed = 0

    def endless():
        nonlocal consumed
        for i in itertools.count():
            consumed += 1
            if consumed > 200:
                raise AssertionError("read far more documents than needed")
            yield f"Document {i}. " + "Some words of ordinary prose, repeated. " * 20

    needed_docs = 10 * 127 // len(brute_force([next(endless())], tok)) + 1
    consumed = 0
    tokens, policy = tokenize_documents(endless(), tok, seq_len=128, max_tokens=10 * 128 + 5)
    assert tokens.shape == (10, 128) and policy == "bos-prepended"
    assert needed_docs <= consumed <= 2 * needed_docs + 2


def test_huge_document_is_tokenized_by_prefix(tok, pydoc_docs):
    huge = "\n\n".join(pydoc_docs)  # one document of ~470k characters
    rec = Recording(tok)
    tokens, _ = tokenize_documents(
        ["short one", huge, "never read"], rec, seq_len=128, max_tokens=4096
    )
    assert tokens.shape == (32, 128)
    assert rec.longest < len(huge) / 4  # the whole document was never tokenized
    expected = brute_force(["short one", huge], tok)[: 32 * 127]
    assert tokens[:, 1:].flatten().tolist() == expected


def test_literal_special_token_text_is_plain_text(tok):
    tokens, _ = tokenize_documents([f"a{EOT}b", "c"], tok, seq_len=6)
    body = tokens[:, 1:].flatten().tolist()
    plain = tok(f"a{EOT}b", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert body == (plain + [EOT_ID] + tok.encode("c"))[: len(body)]
    assert EOT_ID not in plain and body.count(EOT_ID) == 1


def test_tokenizer_without_bos_gives_policy_none(tok):
    no_bos = gpt2_tokenizer()
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None and no_bos.eos_token_id == EOT_ID
    docs = small_docs()
    tokens, policy = tokenize_documents(docs, no_bos, seq_len=16)
    expected = brute_force(docs, tok)
    assert policy == "none" and tokens.shape == (len(expected) // 16, 16)
    assert tokens.flatten().tolist() == expected[: tokens.numel()]

    with_bos = load_dataset("pydoc", tok, seq_len=32, max_tokens=320)
    without = load_dataset("pydoc", no_bos, seq_len=32, max_tokens=320)
    assert without.bos_policy == "none" and without.slug != with_bos.slug
    assert without.tokens[0].tolist() == with_bos.tokens[:2, 1:].flatten().tolist()[:32]


# ---------------------------------------------------------------------------- files


def write_formats(root: Path, docs: list[str]) -> dict[str, Path]:
    """The same documents as a directory of .txt files, .jsonl, .jsonl.gz and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [d for d in docs if d]
    txt_dir = root / "txts"
    (txt_dir / "nested").mkdir(parents=True)
    for i, d in enumerate(docs):  # sorted by relative path: "00.txt" < ... < "nested/..."
        target = txt_dir / ("nested" if i >= 10 else "") / f"{i:02d}.txt"
        target.write_text(d, encoding="utf-8")
    (txt_dir / ".hidden.txt").write_text("never read")
    lines = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs))
    (root / "corpus.jsonl").write_text(lines + "\n", encoding="utf-8")
    (root / "zipped.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    table = pa.table({"id": list(range(len(docs))), "body": docs})
    pq.write_table(table, root / "corpus.parquet", row_group_size=7)
    return {
        "txt": txt_dir,
        "jsonl": root / "corpus.jsonl",
        "gz": root / "zipped.jsonl.gz",
        "parquet": root / "corpus.parquet",
    }


def test_file_formats_give_the_same_tokens(tok, tmp_path):
    docs = small_docs()
    paths = write_formats(tmp_path, docs)
    loaded = {
        kind: load_dataset(
            str(p), tok, seq_len=16, text_field="body" if kind == "parquet" else "text"
        )
        for kind, p in paths.items()
    }
    expected = brute_force(docs, tok)
    for kind, ds in loaded.items():
        assert ds.tokens[:, 1:].flatten().tolist() == expected[: ds.n_sequences * 15], kind
        assert ds.n_sequences == len(expected) // 15
        assert re.fullmatch(r"file:/\S+ sha256:[0-9a-f]{64}", ds.source), ds.source
    assert [loaded[k].name for k in paths] == ["txts", "corpus", "zipped", "corpus"]
    assert len({ds.slug for ds in loaded.values()}) == 4  # provenance differs
    assert list(iter_documents(str(paths["jsonl"]))) == [d for d in docs if d]

    single = tmp_path / "one.txt"
    single.write_text("".join(docs))
    assert list(iter_documents(str(single))) == ["".join(docs)]


def test_source_hash_follows_file_content(tok, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("Some text. " * 200)
    first = load_dataset(str(path), tok, seq_len=32)
    assert first.slug == load_dataset(str(path), tok, seq_len=32).slug
    path.write_text("Other text. " * 200)
    assert load_dataset(str(path), tok, seq_len=32).slug != first.slug


@pytest.mark.parametrize(
    "spec, match",
    [
        ("austin", r"unknown dataset 'austin'.*did you mean 'austen'"),
        ("no/such/file.txt", r"no file or directory at /\S+no/such/file\.txt"),
        ("hf:", r"use hf:NAME"),
    ],
)
def test_unknown_specs_fail_at_once(spec, match):
    with pytest.raises(CorpusError, match=match):
        iter_documents(spec)  # not only when iterated


def test_bad_files_raise_helpful_errors(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "x", "id": 2}\n')
    with pytest.raises(
        CorpusError, match=r"bad\.jsonl:2: no field 'text' \(fields: 'content', 'id'\)"
    ):
        list(iter_documents(str(bad)))
    bad.write_text('{"content": "x", "id": 2}\n\n{"content": null}\n')
    assert list(iter_documents(str(bad), text_field="content")) == ["x"]  # nulls are skipped

    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: not valid JSON"):
        load_dataset(str(bad), tok)
    bad.write_text('{"text": 3}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:1: field 'text' is int, not a string"):
        load_dataset(str(bad), tok)

    pq.write_table(pa.table({"content": ["a", "b"], "n": [1, 2]}), tmp_path / "t.parquet")
    with pytest.raises(CorpusError, match=r"no column 'text' \(columns: content, n\)"):
        load_dataset(str(tmp_path / "t.parquet"), tok)
    with pytest.raises(CorpusError, match=r"column 'n' is int64, not a string column"):
        load_dataset(str(tmp_path / "t.parquet"), tok, text_field="n")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match="not a readable parquet file"):
        load_dataset(str(tmp_path / "junk.parquet"), tok)

    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(CorpusError, match="unsupported file type"):
        load_dataset(str(tmp_path / "data.csv"), tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .txt, .txt.gz, .jsonl.* files in this directory"):
        load_dataset(str(tmp_path / "empty"), tok)


def test_too_short_corpus(tok, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("Hello world")
    with pytest.raises(CorpusError, match=r"only 2 tokens .* seq_len=128 needs 127 corpus tokens"):
        load_dataset(str(path), tok)
    with pytest.raises(CorpusError, match=r"max_tokens=100 is less than seq_len=128"):
        load_dataset("pydoc", tok, max_tokens=100)
    with pytest.raises(CorpusError, match="leaves no room"):
        tokenize_documents(["text"], tok, seq_len=1)
    assert load_dataset(str(path), tok, seq_len=3).tokens.tolist() == [[EOT_ID, 15496, 995]]


def test_hf_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed, wherever it is
    with pytest.raises(CorpusError, match=r"needs the `datasets` package"):
        iter_documents("hf:roneneldan/TinyStories:validation")


# ---------------------------------------------------------------------------- slugs


def test_slug_is_stable_url_safe_and_tracks_settings(tok):
    a = load_dataset("pydoc", tok, seq_len=32, max_tokens=640)
    b = load_dataset("pydoc", tok, seq_len=32, max_tokens=640)
    c = load_dataset("pydoc", tok, seq_len=64, max_tokens=640)
    assert a.slug == b.slug and a.slug != c.slug
    assert re.fullmatch(r"pydoc-[0-9a-f]{10}", a.slug)

    other_tok = gpt2_tokenizer()
    other_tok.add_tokens(["featurescope"])
    assert tokenizer_hash(other_tok) != tokenizer_hash(tok)
    tok("warm up", truncation=True, max_length=4)  # run-time state must not change the hash
    assert tokenizer_hash(tok) == a.tokenizer_hash

    # The recipe itself is pinned: the same fields give the same slug in any process.
    fixed = TokenizedDataset(
        name="My Corpus (v2)!",
        source="file:/data/x.txt sha256:00",
        slice="all",
        seq_len=128,
        bos_policy="bos-prepended",
        tokenizer_hash="0" * 64,
        tokens=torch.zeros(0, 128, dtype=torch.int64),
    )
    assert fixed.slug == "my-corpus-v2-9e7e7779df"


# ---------------------------------------------------------------------------- Debian corpora


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus-cache")


def _prepare_or_skip(name: str, cache: Path) -> None:
    try:
        prepare_builtin(name, cache)
    except CorpusError as exc:
        pytest.skip(f"the {name} corpus cannot be obtained here: {exc}")


def test_austen(tok, corpus_cache):
    _prepare_or_skip("austen", corpus_cache)
    novels = list(iter_documents("austen", cache_dir=corpus_cache))
    assert len(novels) == 6
    assert novels[0].startswith("SENSE AND SENSIBILITY") and novels[1].startswith(
        "PRIDE AND PREJUDICE"
    )
    assert "Elizabeth Bennet" in novels[1] and "Mr. Darcy" in novels[1]
    assert "\n\n" in novels[1] and sum(map(len, novels)) > 3_000_000
    ds = load_dataset("austen", tok, seq_len=128, max_tokens=4096, cache_dir=corpus_cache)
    assert ds.n_sequences == 32 and ds.source.startswith("debian:r-cran-janeaustenr")
    assert ds.tokens[:, 1:].flatten().tolist() == brute_force(novels[:1], tok)[: 32 * 127]
    assert prepare_builtin("austen", corpus_cache) is not None  # now a no-op


def test_fortunes(tok, corpus_cache):
    _prepare_or_skip("fortunes", corpus_cache)
    docs = iter_documents("fortunes", cache_dir=corpus_cache)
    first = list(itertools.islice(docs, 200))
    assert len(first) == 200 and not any("\n%\n" in d for d in first)
    ds = load_dataset("fortunes", tok, seq_len=64, max_tokens=640, cache_dir=corpus_cache)
    assert ds.n_sequences == 10 and ds.source.startswith("debian:fortunes")


def test_without_a_cache_folder_the_settings_one_is_used(corpus_cache, monkeypatch):
    _prepare_or_skip("fortunes", corpus_cache)
    monkeypatch.setenv("FEATURESCOPE_CACHE", str(corpus_cache))
    root = prepare_builtin("fortunes")
    assert root == prepare_builtin("fortunes", corpus_cache)
    assert root in (Path("/"), corpus_cache / "corpora" / "fortunes" / "root")


def test_a_debian_corpus_that_cannot_be_had_is_a_corpus_error(tmp_path, monkeypatch):
    if Path("/usr/share/games/fortunes/fortunes").is_file():
        pytest.skip("fortunes is installed here: nothing to fetch")
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-deb
    with pytest.raises(CorpusError, match=r"'fortunes' corpus needs the Debian package\(s\) "
                       r"fortunes, fortunes-min.*apt-get or dpkg-deb is not available"):
        prepare_builtin("fortunes", tmp_path)


def test_unreadable_r_data_is_a_corpus_error(tmp_path):
    data = tmp_path / "corpora/austen/root/usr/lib/R/site-library/janeaustenr/data"
    if Path("/", *data.parts[-6:]).is_dir():
        pytest.skip("r-cran-janeaustenr is installed here: its files are read instead")
    data.mkdir(parents=True)
    (data / "Rdata.rdx").write_bytes(gzip.compress(b"not R data"))
    (data / "Rdata.rdb").write_bytes(b"")
    with pytest.raises(CorpusError, match=r"janeaustenr/data: not an R XDR serialization"):
        list(iter_documents("austen", cache_dir=tmp_path))


def test_prepare_builtin(tmp_path):
    assert prepare_builtin("pydoc", tmp_path) is None
    with pytest.raises(CorpusError, match="unknown dataset"):
        prepare_builtin("wikipedia", tmp_path)


def test_hf_path_with_a_stand_in_datasets_module(tok, monkeypatch):
    import types

    calls = []

    def fake_load_dataset(name, config, *, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "missing/set":
            raise FileNotFoundError("Dataset 'missing/set' doesn't exist on the Hub")
        return iter([{"text": d, "meta": 1} for d in small_docs()])

    monkeypatch.setitem(
        sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset)
    )
    ds = load_dataset("hf:org/stories:en:validation", tok, seq_len=16, max_tokens=64)
    assert calls == [("org/stories", "en", "validation", True)]
    assert ds.name == "hf:org/stories" and ds.slug.startswith("hf-org-stories-")
    assert ds.source == "hf:org/stories split=validation config=en"
    assert ds.tokens[:, 1:].flatten().tolist() == brute_force(small_docs(), tok)[: 4 * 15]
    assert load_dataset("hf:org/stories", tok, seq_len=16).source == "hf:org/stories split=train"
    with pytest.raises(CorpusError, match=r"could not load 'hf:missing/set'.*doesn't exist"):
        load_dataset("hf:missing/set", tok)
    with pytest.raises(CorpusError, match=r"no column 'body' \(columns: text, meta\)"):
        load_dataset("hf:org/stories", tok, text_field="body")
