"""workers/rdata.py: R's XDR serialization and lazy-load databases, written byte by byte here
as R writes them, read back without R."""

from __future__ import annotations

import gzip
import struct
import zlib

import pytest

from workers.rdata import RDataError, RReader, read_lazyload_db


def _xdr(*ints: int) -> bytes:
    return struct.pack(f">{len(ints)}i", *ints)


def _charsxp(s: str | None, latin1: bool = False) -> bytes:
    if s is None:
        return _xdr(9, -1)
    raw = s.encode("latin-1" if latin1 else "utf-8")
    return _xdr(9 | ((4 if latin1 else 8) << 12), len(raw)) + raw


def _names_attr(names: list[str], first_symbol: bool) -> bytes:
    """A pairlist `names = c(...)`; the symbol is written once, then by reference."""
    sym = _xdr(1) + _charsxp("names") if first_symbol else _xdr((1 << 8) | 255)
    return _xdr(2 | 0x400) + sym + _strsxp(names) + _xdr(254)


def _strsxp(items: list[str | None], names: bytes = b"") -> bytes:
    flags = 16 | (0x200 if names else 0)
    return _xdr(flags, len(items)) + b"".join(_charsxp(s) for s in items) + names


def _serialize(body: bytes) -> bytes:
    return b"X\n" + _xdr(3, 0x40201, 0x30500, 5) + b"UTF-8" + body


def test_r_reader_reads_character_vectors_and_lists():
    lines = ["It is a truth universally acknowledged,", None, "café"]
    inner = _strsxp(lines, names=_names_attr(["a", "b", "c"], first_symbol=True))
    ints = _xdr(13, 2, 7, -3)
    latin = _xdr(16, 1) + _charsxp("naïve", latin1=True)
    body = _xdr(19 | 0x200, 3) + inner + ints + latin + _names_attr(["s", "i", "l"], False)
    value = RReader(_serialize(body)).read()
    assert value == [lines, [7, -3], ["naïve"]]
    assert value.attrs["names"] == ["s", "i", "l"]
    assert value[0].attrs["names"] == ["a", "b", "c"]
    with pytest.raises(RDataError, match="SEXP type 4"):
        RReader(_serialize(_xdr(4))).read()  # environments are out of scope


def test_lazyload_db_reader(tmp_path):
    books = {"zeta": ["Z line", "", "end"], "prideprejudice": ["PRIDE AND PREJUDICE", "x"]}
    rdb, entries = b"", []
    for lines in books.values():
        blob = _serialize(_strsxp(lines))
        chunk = struct.pack(">I", len(blob)) + zlib.compress(blob)
        entries.append(_xdr(13, 2, len(rdb), len(chunk)))
        rdb += chunk
    variables = _xdr(19 | 0x200, 2) + b"".join(entries) + _names_attr(list(books), True)
    logical = _xdr(10, 1, 1)
    index = _xdr(19 | 0x200, 2) + variables + logical
    index += _names_attr(["variables", "compressed"], False)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_serialize(index)))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    got = list(
        read_lazyload_db(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb", ["prideprejudice"])
    )
    assert got == [("prideprejudice", books["prideprejudice"]), ("zeta", books["zeta"])]
