"""Alembic environment: the target metadata is relay.models' SQLModel tables."""

from alembic import context
from sqlmodel import SQLModel

import relay.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from relay.db import make_engine

config = context.config
target_metadata = SQLModel.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is not None:
        _run(connectable)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


def _run(connection) -> None:
    if connection.dialect.name == "sqlite":
        # Batch mode rebuilds tables (drop + rename); with foreign keys enforced, dropping a referenced table
        # fails. The pragma is ignored inside a transaction, so it is set before Alembic opens one.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
    # render_as_batch: SQLite cannot ALTER most things, batch mode rebuilds the table instead.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
