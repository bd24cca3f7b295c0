"""Schema upgrades with Alembic, run in-process (``imeisync db upgrade``).

An empty database is brought to the current schema by the program itself; an older one needs an
explicit upgrade command, so a schema change never happens by surprise on a production database.
The operator's store and the reference registry each have their own migrations and version
table (``Migrations`` below, one instance each), so pointing one at the other's database is
refused instead of mixing the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect
from sqlalchemy.exc import OperationalError

from imeisync.domain.errors import Unavailable
from imeisync.store.db import _WRITE, Database, unavailable


@dataclass(frozen=True)
class Migrations:
    location: Path
    version_table: str  # must match what the migrations' env.py configures
    what: str  # "imeisync" / "registry", for messages
    url_key: str  # the config key naming the database
    upgrade_command: str  # what the person runs for an outdated schema

    def _alembic_config(self) -> AlembicConfig:
        config = AlembicConfig()
        config.set_main_option("script_location", str(self.location))
        return config

    def _context(self, conn: Connection) -> MigrationContext:
        return MigrationContext.configure(conn, opts={"version_table": self.version_table})

    def head_revision(self) -> str:
        head = ScriptDirectory.from_config(self._alembic_config()).get_current_head()
        assert head is not None
        return head

    def current_revision(self, db: Database) -> str | None:
        try:
            with db.engine.connect() as conn:
                return self._context(conn).get_current_revision()
        except OperationalError as exc:
            raise unavailable(exc, db.url) from None

    def upgrade(self, db: Database, revision: str = "head") -> tuple[str | None, str]:
        """Apply migrations; returns (before, after) revisions."""
        before = self.current_revision(db)
        config = self._alembic_config()
        try:
            with db.engine.begin() as conn:
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
        except OperationalError as exc:
            raise unavailable(exc, db.url) from None
        return before, self.head_revision()

    def _create_schema(self, db: Database) -> None:
        """Bring an empty database to the current schema, under the writer lock.

        Two processes meeting the same empty database at once (a daemon and a CLI call, two
        workers) take turns: the second looks again under the lock and finds the schema made.
        """
        config = self._alembic_config()
        try:
            with db.engine.execution_options(**{_WRITE: True}).begin() as conn:
                if self._context(conn).get_current_revision() is not None:
                    return
                if inspect(conn).get_table_names():
                    raise Unavailable(
                        f"the database holds tables but no {self.what} schema version",
                        f"point {self.url_key} at a {self.what} database, or an empty one",
                    )
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
        except OperationalError as exc:
            raise unavailable(exc, db.url) from None

    def ensure_schema(self, db: Database) -> None:
        """Create the schema in an empty database; refuse to run against an outdated one."""
        current = self.current_revision(db)
        head = self.head_revision()
        if current == head:
            return
        if current is None:
            self._create_schema(db)
            return
        raise Unavailable(
            f"the {self.what} database schema is at revision {current}; this imeisync needs "
            f"{head}",
            f"run `{self.upgrade_command}` (take a backup first)",
        )


STORE = Migrations(
    location=Path(__file__).parent / "migrations",
    version_table="alembic_version",
    what="imeisync",
    url_key="[database] url",
    upgrade_command="imeisync db upgrade",
)
head_revision = STORE.head_revision
current_revision = STORE.current_revision
upgrade = STORE.upgrade
ensure_schema = STORE.ensure_schema
