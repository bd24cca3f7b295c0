"""Opening the database: engine set-up, one serialised writer, schema upgrades, clear errors.

Writes that touch the change sequence or the audit chain are serialised: SQLite by
``BEGIN IMMEDIATE``, PostgreSQL by a transaction-scoped advisory lock. That makes commit order
equal ``change_log.seq`` order (a reader following the sequence can never skip a row that
commits late) and lets each audit event name its predecessor. Orders are few; this costs nothing
measurable and removes a whole class of races.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from imeisync.domain.errors import BadInput, Unavailable

WRITE_LOCK_KEY = 0x1BE15_C  # pg_advisory_xact_lock key for the writer lock
# How long a writer waits for another one before giving up (exit 3): SQLite's busy timeout,
# PostgreSQL's lock_timeout on the writer lock. A module constant so that tests can lower it.
LOCK_TIMEOUT_MS = 10_000
_WRITE = "imeisync_write"


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (see "begin" below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(LOCK_TIMEOUT_MS)}")
        cursor.execute("PRAGMA foreign_keys = ON")
        mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()
        # FULL: an order reported accepted survives a power cut, not only a crash.
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.close()
        del mode

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _postgres_setup(engine: Engine) -> None:
    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get(_WRITE, False):
            # Without a limit a stuck writer would hang every other writer for ever.
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {int(LOCK_TIMEOUT_MS)}")
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE touched (``Session.execute`` types every result as a plain
    ``Result``; for those statements it is a ``CursorResult``)."""
    return cast(CursorResult[Any], result).rowcount


def describe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparseable database url)"


def create_db_engine(url: str, **kwargs: Any) -> Engine:
    try:
        parsed = make_url(url)
    except Exception:
        raise BadInput(
            f"[database] url {url[:60]!r} is not a database URL",
            "use sqlite:///var/imeisync.db or postgresql+psycopg://user@host/db",
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        # "file:..." is an SQLite URI (sqlite:///file:/path?mode=ro&uri=true): not a folder path.
        if database and database != ":memory:" and not database.startswith("file:"):
            folder = Path(database).parent
            if not folder.is_dir():
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise Unavailable(
                        f"database folder {folder} does not exist and cannot be created: "
                        f"{exc.strerror}",
                        "create it or fix [database] url",
                    ) from None
        engine = create_engine(url, **kwargs)
        _sqlite_setup(engine)
    elif backend == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        engine = create_engine(url, **kwargs)
        _postgres_setup(engine)
    else:
        raise BadInput(
            f"[database] url uses {backend!r}; imeisync supports sqlite and postgresql+psycopg"
        )
    return engine


# PostgreSQL refusing writes: a standby or default_transaction_read_only (25006), a role
# without write privileges (42501). Like a read-only SQLite file, that is "unavailable" (exit 3).
_CANNOT_WRITE_SQLSTATES = frozenset({"25006", "42501"})


def _cannot_write(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in _CANNOT_WRITE_SQLSTATES


def unavailable(exc: Exception, url: str) -> Unavailable:
    """Turn a driver error into one line for the person: what failed, what to do."""
    detail = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc) else repr(exc)
    lower = detail.lower()
    if "readonly" in lower or "read-only" in lower or "read only" in lower:
        hint = ("the database is read-only: check the file's and folder's permissions "
                "(PostgreSQL: that the server is the primary and the role may write)")
    elif "locked" in lower or "busy" in lower or "lock timeout" in lower:
        hint = "another process holds the database lock; try again, or find the stuck process"
    elif "unable to open" in lower:
        hint = "the database file cannot be opened: check the path in [database] url"
    else:
        hint = "check that the database is running and reachable, then try again"
    return Unavailable(f"database {describe_url(url)} unavailable: {detail}", hint)


class Database:
    """The store's entry point: sessions for reading and for serialised writing."""

    def __init__(self, url: str, *, engine: Engine | None = None):
        self.url = url
        self.engine = engine or create_db_engine(url)
        self.dialect = self.engine.dialect.name
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(
            self.engine.execution_options(**{_WRITE: True}), expire_on_commit=False
        )

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """One serialised transaction: commits on success, rolls back on any exception."""
        try:
            with self._writer() as session, session.begin():
                yield session
        except (OperationalError, ProgrammingError) as exc:
            if (isinstance(exc, ProgrammingError) and "does not exist" not in str(exc)
                    and not _cannot_write(exc)):
                raise
            raise unavailable(exc, self.url) from None
        except DBAPIError as exc:
            if exc.connection_invalidated or _cannot_write(exc):
                raise unavailable(exc, self.url) from None
            raise
        except self._driver_operational_error as exc:
            # Bulk paths (feed pages, snapshots) use the driver's cursor directly; a full disk
            # or an I/O error there is the same "unavailable" as anywhere else.
            raise unavailable(exc, self.url) from None

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        try:
            with self._reader() as session, session.begin():
                yield session
        except OperationalError as exc:
            raise unavailable(exc, self.url) from None

    @property
    def _driver_operational_error(self) -> type[Exception]:
        return self.engine.dialect.loaded_dbapi.OperationalError

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def dispose(self) -> None:
        self.engine.dispose()
