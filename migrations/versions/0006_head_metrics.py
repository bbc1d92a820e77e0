"""Attention heads: every head's metrics per heads source, the attention rows of top examples

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 12:45:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('sources', sa.Column('head_metrics', sa.JSON(), nullable=True))
    op.create_table(
        'attention_rows',
        sa.Column('source_id', sa.Integer(), nullable=False),
        sa.Column('feature_idx', sa.Integer(), nullable=False),
        sa.Column('rank', sa.SmallInteger(), nullable=False),
        sa.Column('window', sa.SmallInteger(), nullable=False),
        sa.Column('data', sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(['source_id'], ['sources.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('source_id', 'feature_idx', 'rank'),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table('attention_rows')
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35+), not a batch copy of `sources`: dropping the
    # old copy would cascade to every feature and example of every source.
    op.drop_column('sources', 'head_metrics')
