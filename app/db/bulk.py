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
                 arrays: Sequence[np.ndarray]) -> None:
    """Rows given as one numpy array per column, written with PostgreSQL's binary COPY built
    in bulk by numpy: no Python object per row or per value. A 1-D array is a fixed-width
    column (int16 for smallint, int32 for integer, int64 for bigint, float64 for double
    precision); a 2-D array [n, k] is a bytea column of k items' raw bytes per row.

    On SQLite (no COPY) the same rows go through `bulk_insert`."""
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError("every column needs one value per row")
    conn = session.connection()
    if conn.dialect.name != "postgresql":
        values = [a.tolist() if a.ndim == 1 else [r.tobytes() for r in a] for a in arrays]
        bulk_insert(session, table, columns, zip(*values, strict=True))
        return
    fields: list[tuple[str, str]] = [("count", ">i2")]
    for i, a in enumerate(arrays):
        width = a.shape[1] * a.itemsize if a.ndim == 2 else a.itemsize
        kind = f"V{width}" if a.ndim == 2 else a.dtype.newbyteorder(">").str
        fields += [(f"len{i}", ">i4"), (f"val{i}", kind)]
    rec = np.empty(n, dtype=fields)
    rec["count"] = len(arrays)
    for i, a in enumerate(arrays):
        if a.ndim == 2:
            width = a.shape[1] * a.itemsize
            rec[f"len{i}"] = width
            rec[f"val{i}"] = np.ascontiguousarray(a).view(f"V{width}").reshape(n)
        else:
            rec[f"len{i}"] = a.itemsize
            rec[f"val{i}"] = a
    cols = ", ".join(f'"{c}"' for c in columns)
    raw = conn.connection.driver_connection
    with raw.cursor() as cur, cur.copy(
            f'COPY "{table.name}" ({cols}) FROM STDIN (FORMAT BINARY)') as copy:
        copy.write(_PG_SIGNATURE)
        for lo in range(0, n, COPY_CHUNK_ROWS):
            copy.write(rec[lo:lo + COPY_CHUNK_ROWS].tobytes())
        copy.write(_PG_TRAILER)
