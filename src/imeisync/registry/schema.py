"""The registry database's schema, upgraded with its own Alembic scripts.

Same policy as the daemon (``imeisync.store.schema``): an empty database is created at the
current revision when the registry starts; an older one needs an explicit
``imeisync registry upgrade --config REGISTRY.toml``. The version table is
``registry_alembic_version``, so pointing the registry at an operator's database (or the
reverse) is refused instead of mixing the two.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError

from imeisync.domain.errors import Unavailable
from imeisync.store.db import Database, unavailable

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "registry_alembic_version"


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(db: Database) -> str | None:
    try:
        with db.engine.connect() as conn:
            return MigrationContext.configure(
                conn, opts={"version_table": VERSION_TABLE}
            ).get_current_revision()
    except OperationalError as exc:
        raise unavailable(exc, db.url) from None


def upgrade(db: Database, revision: str = "head") -> tuple[str | None, str]:
    before = current_revision(db)
    config = _alembic_config()
    try:
        with db.engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    except OperationalError as exc:
        raise unavailable(exc, db.url) from None
    return before, head_revision()


def ensure_schema(db: Database) -> None:
    current = current_revision(db)
    head = head_revision()
    if current == head:
        return
    if current is None:
        try:
            with db.engine.connect() as conn:
                tables = inspect(conn).get_table_names()
        except OperationalError as exc:
            raise unavailable(exc, db.url) from None
        if tables:
            raise Unavailable(
                "the registry database holds tables but no registry schema version",
                "point [server] database_url at a registry database, or an empty one",
            )
        upgrade(db)
        return
    raise Unavailable(
        f"the registry database schema is at revision {current}; this imeisync needs {head}",
        "run `imeisync registry upgrade --config REGISTRY.toml` (take a backup first)",
    )
