"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-21 15:44:10.056496
"""
import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('datasets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('slug', sa.String(length=160), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('slice', sa.String(length=128), nullable=False),
    sa.Column('n_sequences', sa.Integer(), nullable=False),
    sa.Column('seq_len', sa.Integer(), nullable=False),
    sa.Column('bos_policy', sa.String(length=32), nullable=False),
    sa.Column('tokenizer_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('slug')
    )
    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('slug', sa.String(length=128), nullable=False),
    sa.Column('hub_id', sa.Text(), nullable=False),
    sa.Column('revision', sa.String(length=64), nullable=True),
    sa.Column('arch', sa.String(length=64), nullable=False),
    sa.Column('n_layers', sa.Integer(), nullable=False),
    sa.Column('d_model', sa.Integer(), nullable=False),
    sa.Column('d_mlp', sa.Integer(), nullable=False),
    sa.Column('vocab_size', sa.Integer(), nullable=False),
    sa.Column('tokenizer_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('slug')
    )
    op.create_table('sequences',
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('idx', sa.Integer(), nullable=False),
    sa.Column('tokens', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('dataset_id', 'idx'),
    sqlite_with_rowid=False
    )
    op.create_table('sources',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('slug', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('hook_name', sa.String(length=128), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('n_features', sa.Integer(), nullable=False),
    sa.Column('sae_config', sa.JSON(), nullable=True),
    sa.Column('harvest_config', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('progress_tokens', sa.BigInteger(), nullable=False),
    sa.Column('total_tokens', sa.BigInteger(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('version_hash', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], ),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('model_id', 'slug')
    )
    op.create_table('vocabularies',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('tokens', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id')
    )
    op.create_table('examples',
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
    sqlite_with_rowid=False
    )
    op.create_table('features',
    sa.Column('source_id', sa.Integer(), nullable=False),
    sa.Column('idx', sa.Integer(), nullable=False),
    sa.Column('max_act', sa.Float(), nullable=False),
    sa.Column('min_act', sa.Float(), nullable=False),
    sa.Column('mean_act', sa.Float(), nullable=False),
    sa.Column('std_act', sa.Float(), nullable=False),
    sa.Column('frac_active', sa.Float(), nullable=False),
    sa.Column('n_active', sa.BigInteger(), nullable=False),
    sa.Column('n_tokens', sa.BigInteger(), nullable=False),
    sa.Column('histogram', sa.JSON(), nullable=False),
    sa.Column('top_logits', sa.JSON(), nullable=False),
    sa.Column('bottom_logits', sa.JSON(), nullable=False),
    sa.Column('top_tokens', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['source_id'], ['sources.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('source_id', 'idx'),
    sqlite_with_rowid=False
    )
    with op.batch_alter_table('features', schema=None) as batch_op:
        batch_op.create_index('ix_features_source_density', ['source_id', 'frac_active', 'idx'], unique=False)
        batch_op.create_index('ix_features_source_max', ['source_id', 'max_act', 'idx'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('features', schema=None) as batch_op:
        batch_op.drop_index('ix_features_source_max')
        batch_op.drop_index('ix_features_source_density')

    op.drop_table('features')
    op.drop_table('examples')
    op.drop_table('vocabularies')
    op.drop_table('sources')
    op.drop_table('sequences')
    op.drop_table('models')
    op.drop_table('datasets')
