"""Alembic environment: runs on the connection handed over by app.db.engine.upgrade,
or on FEATURESCOPE_DATABASE_URL / the default SQLite file when run by the alembic CLI."""

from alembic import context

from app.db.tables import Base

target_metadata = Base.metadata
config = context.config


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    from app.config import Settings
    from app.db.engine import make_engine

    engine = make_engine(Settings().db_url)
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
