"""Alembic's environment: always run on a connection that ``migrations.upgrade`` / ``stamp`` passes in (no
alembic.ini, no URL here), against the service's own table metadata."""

from alembic import context

from retrogen.service.core.tables import Base

connection = context.config.attributes["connection"]
# SQLite cannot ALTER most things in place; batch mode copies the table, so later revisions work on both engines
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
