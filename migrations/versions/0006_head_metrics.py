"""Attention heads: every head's metrics, per heads source

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
    with op.batch_alter_table('sources') as batch:
        batch.add_column(sa.Column('head_metrics', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('sources') as batch:
        batch.drop_column('head_metrics')
