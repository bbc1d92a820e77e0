"""explanations, their scores and embeddings; full-text search over their text

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 02:00:00

SQLite: an FTS5 table with external content, kept by triggers. PostgreSQL: a GIN index on
to_tsvector('english', text), which queries must spell the same way to use.

`explanations_version` holds one row whose counter triggers move on every write to the three
tables (per row on SQLite, per statement on PostgreSQL): pages that show explanations carry it
in their ETag, and the server reloads its search index and scorer judgements when it moves.
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

SQLITE_FTS = [
    "CREATE VIRTUAL TABLE explanations_fts USING fts5(text, content='explanations', "
    "content_rowid='id', tokenize='porter unicode61')",
    "CREATE TRIGGER explanations_ai AFTER INSERT ON explanations BEGIN "
    "INSERT INTO explanations_fts(rowid, text) VALUES (new.id, new.text); END",
    "CREATE TRIGGER explanations_ad AFTER DELETE ON explanations BEGIN "
    "INSERT INTO explanations_fts(explanations_fts, rowid, text) "
    "VALUES ('delete', old.id, old.text); END",
    "CREATE TRIGGER explanations_au AFTER UPDATE OF text ON explanations BEGIN "
    "INSERT INTO explanations_fts(explanations_fts, rowid, text) "
    "VALUES ('delete', old.id, old.text); "
    "INSERT INTO explanations_fts(rowid, text) VALUES (new.id, new.text); END",
]

VERSIONED = ("explanations", "explanation_scores", "explanation_vectors")
SQLITE_VERSION = [
    f"CREATE TRIGGER {table}_version_{op[0].lower()} AFTER {op} ON {table} BEGIN "
    "UPDATE explanations_version SET version = version + 1 WHERE id = 1; END"
    for table in VERSIONED for op in ("INSERT", "UPDATE", "DELETE")
]
POSTGRES_VERSION = [
    "CREATE FUNCTION explanations_version_bump() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN UPDATE explanations_version SET version = version + 1 WHERE id = 1; RETURN NULL; "
    "END $$",
    *(f"CREATE TRIGGER {table}_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} "
      "FOR EACH STATEMENT EXECUTE FUNCTION explanations_version_bump()" for table in VERSIONED),
]


def upgrade() -> None:
    op.create_table(
        'explanations',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('source_id', sa.Integer(), nullable=False),
        sa.Column('feature_idx', sa.Integer(), nullable=False),
        sa.Column('text', sa.Text(), nullable=False),
        sa.Column('explainer', sa.String(length=32), nullable=False),
        sa.Column('explainer_model', sa.String(length=200), nullable=False),
        sa.Column('prompt_version', sa.String(length=32), nullable=False),
        sa.Column('author', sa.String(length=128), nullable=True),
        sa.Column('tokens_used', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['source_id'], ['sources.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_explanations_feature', 'explanations', ['source_id', 'feature_idx'])
    op.create_table(
        'explanation_scores',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('explanation_id', sa.Integer(), nullable=False),
        sa.Column('scorer', sa.String(length=32), nullable=False),
        sa.Column('scorer_model', sa.String(length=200), nullable=False),
        sa.Column('value', sa.Float(), nullable=False),
        sa.Column('control', sa.Float(), nullable=True),
        sa.Column('details', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['explanation_id'], ['explanations.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_explanation_scores_explanation', 'explanation_scores',
                    ['explanation_id'])
    op.create_table(
        'explanation_vectors',
        sa.Column('explanation_id', sa.Integer(), nullable=False),
        sa.Column('embedder', sa.String(length=100), nullable=False),
        sa.Column('vector', sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(['explanation_id'], ['explanations.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('explanation_id'),
        sqlite_with_rowid=False,
    )
    version = op.create_table(
        'explanations_version',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('version', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.bulk_insert(version, [{'id': 1, 'version': 0}])
    if op.get_bind().dialect.name == 'sqlite':
        for statement in SQLITE_FTS + SQLITE_VERSION:
            op.execute(statement)
    else:
        op.execute("CREATE INDEX ix_explanations_text_search ON explanations "
                   "USING gin (to_tsvector('english', text))")
        for statement in POSTGRES_VERSION:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'sqlite':
        for name in ('explanations_au', 'explanations_ad', 'explanations_ai'):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        for table in VERSIONED:
            for suffix in ('i', 'u', 'd'):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_version_{suffix}")
        op.execute("DROP TABLE IF EXISTS explanations_fts")
    else:
        for table in VERSIONED:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_version ON {table}")
        op.execute("DROP FUNCTION IF EXISTS explanations_version_bump()")
    op.drop_table('explanations_version')
    op.drop_table('explanation_vectors')
    op.drop_index('ix_explanation_scores_explanation', table_name='explanation_scores')
    op.drop_table('explanation_scores')
    op.drop_index('ix_explanations_feature', table_name='explanations')
    op.drop_table('explanations')
