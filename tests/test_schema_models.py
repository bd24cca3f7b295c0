"""The migrations and the models describe one schema: a migrated database matches
``store.models`` exactly (tables, columns, types, indexes), on SQLite and PostgreSQL."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from imeisync.store.db import Database
from imeisync.store.models import Base
from imeisync.store.schema import ensure_schema


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    db = Database(database_url)
    try:
        ensure_schema(db)
        with db.engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        db.dispose()
    assert differences == []
