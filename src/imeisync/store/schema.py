"""Schema upgrades with Alembic, run in-process (``imeisync db upgrade``).

An empty database is brought to the current schema by the daemon and the CLI themselves; an
older one needs an explicit ``imeisync db upgrade``, so a schema change never happens by surprise
on a production database.
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
from imeisync.store.db import _WRITE, Database, unavailable

MIGRATIONS = Path(__file__).parent / "migrations"


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
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise unavailable(exc, db.url) from None


def upgrade(db: Database, revision: str = "head") -> tuple[str | None, str]:
    """Apply migrations; returns (before, after) revisions."""
    before = current_revision(db)
    config = _alembic_config()
    try:
        with db.engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    except OperationalError as exc:
        raise unavailable(exc, db.url) from None
    return before, head_revision()


def _create_schema(db: Database) -> None:
    """Bring an empty database to the current schema, under the writer lock.

    Two processes meeting the same empty database at once (a daemon and a CLI call, two
    workers) take turns: the second looks again under the lock and finds the schema made.
    """
    config = _alembic_config()
    try:
        with db.engine.execution_options(**{_WRITE: True}).begin() as conn:
            if MigrationContext.configure(conn).get_current_revision() is not None:
                return
            if inspect(conn).get_table_names():
                raise Unavailable(
                    "the database holds tables but no imeisync schema version",
                    "point [database] url at an imeisync database, or an empty one",
                )
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    except OperationalError as exc:
        raise unavailable(exc, db.url) from None


def ensure_schema(db: Database) -> None:
    """Create the schema in an empty database; refuse to run against an outdated one."""
    current = current_revision(db)
    head = head_revision()
    if current == head:
        return
    if current is None:
        _create_schema(db)
        return
    raise Unavailable(
        f"the database schema is at revision {current}; this imeisync needs {head}",
        "run `imeisync db upgrade` (take a backup first)",
    )
