"""Relations between features: similar directions, co-firing, matches across sources

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 12:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'relations',
        sa.Column('source_id', sa.Integer(), nullable=False),
        sa.Column('feature_idx', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('other_source_id', sa.Integer(), nullable=False),
        sa.Column('rank', sa.SmallInteger(), nullable=False),
        sa.Column('other_idx', sa.Integer(), nullable=False),
        sa.Column('value', sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(['source_id'], ['sources.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['other_source_id'], ['sources.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('source_id', 'feature_idx', 'kind', 'other_source_id', 'rank'),
        sqlite_with_rowid=False,
    )
    op.create_index('ix_relations_other', 'relations', ['other_source_id', 'other_idx'])


def downgrade() -> None:
    op.drop_index('ix_relations_other', table_name='relations')
    op.drop_table('relations')
