"""Alembic environment of the registry's database: the connection is handed in by
``imeisync.registry.schema``; versions are kept in ``registry_alembic_version`` so that the
registry's schema can never be mistaken for the daemon's."""

from alembic import context

from imeisync.registry.models import RegistryBase

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=RegistryBase.metadata,
    version_table="registry_alembic_version",
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
