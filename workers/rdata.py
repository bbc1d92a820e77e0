"""A reader of R's lazy-load databases (``.rdx`` index + ``.rdb`` blobs) and of R's XDR
serialization, for data (vectors, lists, pairlists), with no R installed.

The built-in ``austen`` corpus comes this way: Debian's ``r-cran-janeaustenr`` ships the novels
as R character vectors.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class RDataError(ValueError):
    """A file is not R data this reader understands; the message says what it met."""


def read_lazyload_db(rdx: Path, rdb: Path, order: Iterable[str] = ()) -> Iterator[tuple[str, Any]]:
    """The objects of an R lazy-load database (``.rdx`` index + ``.rdb`` blobs), no R needed.

    ``order`` names come first, then the rest in the index's order.
    """
    index = RReader(gzip.decompress(rdx.read_bytes())).read()
    fields = dict(zip(index.attrs.get("names", []), index, strict=False))
    variables = fields.get("variables")
    if variables is None:
        raise RDataError(f"{rdx}: not an R lazy-load index")
    entries = dict(zip(variables.attrs.get("names", []), variables, strict=False))
    compressed = fields.get("compressed", [True])[0]
    names = [n for n in order if n in entries] + [n for n in entries if n not in order]
    with rdb.open("rb") as fh:
        for name in names:
            offset, length = (int(x) for x in entries[name])
            fh.seek(offset)
            blob = _decompress(fh.read(length), compressed)
            yield name, RReader(blob).read()


def _decompress(blob: bytes, compressed: Any) -> bytes:
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
    raise RDataError(f"unknown R compression {compressed!r} / {kind!r}")


class RVector(list):
    """An R vector as a list, with its attributes (names, class, ...)."""

    def __init__(self, items: Iterable[Any] = (), attrs: dict[str, Any] | None = None):
        super().__init__(items)
        self.attrs = attrs or {}


class RReader:
    """A reader of R's XDR serialization (format 2 and 3) for data: vectors, lists, pairlists.

    Environments, closures and byte code are out of scope and raise ``RDataError``.
    """

    _NULLS = {254, 253, 252, 251, 250, 242, 241}  # NULL, global/empty/base env, unbound, ...
    _PAIRLISTS = {2, 6, 239, 240}  # LISTSXP, LANGSXP, ATTRLISTSXP, ATTRLANGSXP

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def read(self) -> Any:
        if self.data[:2] != b"X\n":
            raise RDataError("not an R XDR serialization")
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
            value = RVector(self._array("i", self._length()))
        elif kind == 14:  # REALSXP
            value = RVector(self._array("d", self._length()))
        elif kind == 15:  # CPLXSXP
            flat = self._array("d", 2 * self._length())
            value = RVector(complex(*flat[i : i + 2]) for i in range(0, len(flat), 2))
        elif kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            value = RVector(self._item() for _ in range(self._length()))
        elif kind == 24:  # RAWSXP
            n = self._length()
            value = RVector(self.data[self.pos : self.pos + n])
            self.pos += n
        else:
            raise RDataError(f"R object of SEXP type {kind} is not supported by this reader")
        if has_attr:
            value.attrs = self._attrs(self._item())
        return value

    def _pairlist(self, has_attr: int, has_tag: int) -> RVector:
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
            return RVector(items, {"names": tags})

    @staticmethod
    def _attrs(pairlist: Any) -> dict[str, Any]:
        if not isinstance(pairlist, RVector):
            return {}
        return dict(zip(pairlist.attrs["names"], pairlist, strict=True))

    def _altrep(self) -> Any:
        info, state, attr = self._item(), self._item(), self._item()
        cls = info[0] if isinstance(info, list) and info else None
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = state
            value = RVector(start + i * step for i in range(int(n)))
            if cls == "compact_intseq":
                value = RVector(int(v) for v in value)
        elif isinstance(cls, str) and cls.startswith("wrap_"):
            value = RVector(state[0])
        else:
            raise RDataError(f"R ALTREP class {cls!r} is not supported by this reader")
        value.attrs = self._attrs(attr)
        return value
