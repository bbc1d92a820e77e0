"""Relations: index the other source alone (lists pointing at a source are found and deleted
by it), so that writing a wide source's lists appends to the index instead of inserting at
random places in it

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 16:00:00
"""
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index('ix_relations_other', table_name='relations')
    op.create_index('ix_relations_other_source', 'relations', ['other_source_id'])


def downgrade() -> None:
    op.drop_index('ix_relations_other_source', table_name='relations')
    op.create_index('ix_relations_other', 'relations', ['other_source_id', 'other_idx'])
