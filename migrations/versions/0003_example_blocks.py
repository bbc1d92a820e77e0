"""example_blocks: one row per (feature, group) holding its examples packed, instead of one
row per example

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 22:00:00

Each record of `data` is seq_idx (int32), window start (int16), peak position (int16), the peak
value (float32), then the window's activations (float16), all little-endian. The layout is
spelled out here rather than imported, so the migration keeps meaning what it meant.
"""
import itertools
import struct

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

HEAD = struct.Struct("<ihhf")
BATCH = 5000


def _blocks_table():
    return op.create_table(
        'example_blocks',
        sa.Column('source_id', sa.Integer(), nullable=False),
        sa.Column('feature_idx', sa.Integer(), nullable=False),
        sa.Column('group', sa.SmallInteger(), nullable=False),
        sa.Column('n', sa.SmallInteger(), nullable=False),
        sa.Column('window', sa.SmallInteger(), nullable=False),
        sa.Column('data', sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(['source_id'], ['sources.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('source_id', 'feature_idx', 'group'),
    )


def _examples_table():
    return op.create_table(
        'examples',
        sa.Column('source_id', sa.Integer(), nullable=False),
        sa.Column('feature_idx', sa.Integer(), nullable=False),
        sa.Column('group', sa.SmallInteger(), nullable=False),
        sa.Column('rank', sa.SmallInteger(), nullable=False),
        sa.Column('seq_idx', sa.Integer(), nullable=False),
        sa.Column('start', sa.SmallInteger(), nullable=False),
        sa.Column('peak_pos', sa.SmallInteger(), nullable=False),
        sa.Column('peak_value', sa.Float(), nullable=False),
        sa.Column('acts', sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(['source_id'], ['sources.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('source_id', 'feature_idx', 'group', 'rank'),
        sqlite_with_rowid=False,
    )


def _flush(table, rows: list) -> None:
    if rows:
        op.bulk_insert(table, rows)
        rows.clear()


def upgrade() -> None:
    blocks = _blocks_table()
    conn = op.get_bind()
    for (source_id,) in conn.execute(sa.text("SELECT id FROM sources ORDER BY id")).fetchall():
        rows = conn.execute(sa.text(
            'SELECT feature_idx, "group", seq_idx, start, peak_pos, peak_value, acts '
            'FROM examples WHERE source_id = :s ORDER BY feature_idx, "group", "rank"'),
            {"s": source_id})
        batch: list[dict] = []
        for (feature_idx, group), exs in itertools.groupby(rows, key=lambda r: (r[0], r[1])):
            exs = list(exs)
            window = len(exs[0][6]) // 2
            data = b"".join(HEAD.pack(seq, start, peak, value) + bytes(acts)
                            for _, _, seq, start, peak, value, acts in exs)
            batch.append({"source_id": source_id, "feature_idx": feature_idx, "group": group,
                          "n": len(exs), "window": window, "data": data})
            if len(batch) >= BATCH:
                _flush(blocks, batch)
        _flush(blocks, batch)
    op.drop_table('examples')


def downgrade() -> None:
    examples = _examples_table()
    conn = op.get_bind()
    rows = conn.execute(sa.text(
        'SELECT source_id, feature_idx, "group", n, "window", data FROM example_blocks '
        'ORDER BY source_id, feature_idx, "group"'))
    batch: list[dict] = []
    for source_id, feature_idx, group, n, window, data in rows:
        data = bytes(data)
        size = HEAD.size + 2 * window
        for rank in range(n):
            at = rank * size
            seq, start, peak, value = HEAD.unpack_from(data, at)
            batch.append({"source_id": source_id, "feature_idx": feature_idx, "group": group,
                          "rank": rank, "seq_idx": seq, "start": start, "peak_pos": peak,
                          "peak_value": value, "acts": data[at + HEAD.size:at + size]})
        if len(batch) >= BATCH:
            _flush(examples, batch)
    _flush(examples, batch)
    op.drop_table('example_blocks')
