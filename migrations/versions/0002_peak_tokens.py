"""peak_tokens: the top tokens of every feature, indexed by token

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 19:10:00
"""
import json

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        'peak_tokens',
        sa.Column('source_id', sa.Integer(), nullable=False),
        sa.Column('token_id', sa.Integer(), nullable=False),
        sa.Column('feature_idx', sa.Integer(), nullable=False),
        sa.Column('count', sa.SmallInteger(), nullable=False),
        sa.ForeignKeyConstraint(['source_id'], ['sources.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('source_id', 'token_id', 'feature_idx'),
        sqlite_with_rowid=False,
    )
    # Fill it from the features already stored.
    conn = op.get_bind()
    for (source_id,) in conn.execute(sa.text("SELECT id FROM sources")).fetchall():
        rows = conn.execute(sa.text("SELECT idx, top_tokens FROM features WHERE source_id = :s"),
                            {"s": source_id}).fetchall()
        batch = []
        for idx, top_tokens in rows:
            pairs = json.loads(top_tokens) if isinstance(top_tokens, str) else top_tokens
            batch += [{"source_id": source_id, "token_id": t, "feature_idx": idx, "count": c}
                      for t, c in pairs or []]
        if batch:
            op.bulk_insert(table, batch)


def downgrade() -> None:
    op.drop_table('peak_tokens')
