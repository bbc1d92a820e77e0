"""Fast bulk writes inside an open session's transaction: COPY on PostgreSQL, executemany of
plain tuples on SQLite. Values must already be in their stored form (JSON as text)."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import numpy as np
from sqlalchemy import Table
from sqlalchemy.orm import Session


def bulk_insert(session: Session, table: Table, columns: Sequence[str],
                rows: Iterable[tuple]) -> None:
    conn = session.connection()
    cols = ", ".join(f'"{c}"' for c in columns)
    if conn.dialect.name == "postgresql":
        raw = conn.connection.driver_connection
        with raw.cursor() as cur, cur.copy(f'COPY "{table.name}" ({cols}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row(row)
        return
    marks = ", ".join("?" * len(columns))
    cur = conn.connection.driver_connection.cursor()
    try:
        cur.executemany(f'INSERT INTO "{table.name}" ({cols}) VALUES ({marks})', rows)
    finally:
        cur.close()


_PG_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_PG_TRAILER = struct.pack(">h", -1)
COPY_CHUNK_ROWS = 50_000


def copy_columns(session: Session, table: Table, columns: Sequence[str],
                 arrays: Sequence[np.ndarray | list]) -> None:
    """Rows given as one numpy array per column, written with PostgreSQL's binary COPY built
    in bulk by numpy: no Python object per value of a fixed-width column. A 1-D array is a
    fixed-width column (int16 for smallint, int32 for integer, int64 for bigint, float64 for
    double precision); a 2-D array [n, k] is a bytea column of k items' raw bytes per row; a
    list of bytes (or memoryviews of bytes) is a bytea column of any length per row.

    On SQLite (no COPY) the same rows go through `bulk_insert`."""
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError("every column needs one value per row")
    conn = session.connection()
    if conn.dialect.name != "postgresql":
        values = [a if isinstance(a, list) else a.tolist() if a.ndim == 1
                  else [r.tobytes() for r in a] for a in arrays]
        bulk_insert(session, table, columns, zip(*values, strict=True))
        return
    # Each row is its fixed-width parts, built for all rows at once as numpy records, with the
    # bytes of each variable-length column between them.
    parts: list[np.ndarray | list] = []
    fields: list[tuple[str, str]] = [("count", ">i2")]
    fills: dict[str, object] = {"count": len(arrays)}

    def close() -> None:
        rec = np.empty(n, dtype=fields)
        for name, value in fills.items():
            rec[name] = value
        parts.append(rec)

    for i, a in enumerate(arrays):
        if isinstance(a, list):
            fields.append((f"len{i}", ">i4"))
            fills[f"len{i}"] = np.fromiter(map(len, a), dtype=np.int32, count=n)
            close()
            parts.append(a)
            fields, fills = [], {}
            continue
        width = a.shape[1] * a.itemsize if a.ndim == 2 else a.itemsize
        kind = f"V{width}" if a.ndim == 2 else a.dtype.newbyteorder(">").str
        fields += [(f"len{i}", ">i4"), (f"val{i}", kind)]
        fills[f"len{i}"] = width
        fills[f"val{i}"] = (np.ascontiguousarray(a).view(f"V{width}").reshape(n) if a.ndim == 2
                            else a)
    if fields:
        close()
    cols = ", ".join(f'"{c}"' for c in columns)
    raw = conn.connection.driver_connection
    with raw.cursor() as cur, cur.copy(
            f'COPY "{table.name}" ({cols}) FROM STDIN (FORMAT BINARY)') as copy:
        copy.write(_PG_SIGNATURE)
        for lo in range(0, n, COPY_CHUNK_ROWS):
            hi = min(lo + COPY_CHUNK_ROWS, n)
            if len(parts) == 1:
                copy.write(parts[0][lo:hi].tobytes())
                continue
            columns_of_rows = [_split(p[lo:hi].tobytes(), p.itemsize, hi - lo)
                               if isinstance(p, np.ndarray) else p[lo:hi] for p in parts]
            copy.write(b"".join(x for row in zip(*columns_of_rows, strict=True) for x in row))
        copy.write(_PG_TRAILER)


def _split(buf: bytes, size: int, n: int) -> list[bytes]:
    return [buf[j * size:(j + 1) * size] for j in range(n)]
