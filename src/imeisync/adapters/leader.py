"""Which daemon runs the sync jobs: one leader per database.

Several daemons may share one PostgreSQL database (scale-out): all serve attach checks and
orders, but only the leader pushes, pulls, reconciles, purges and verifies, so the registry
sees one writer per operator and no job runs twice.

* **PostgreSQL** — a session advisory lock (``pg_try_advisory_lock``) held on a dedicated
  connection for as long as the daemon leads. Advisory locks are per database, released by the
  server when the session ends: a leader that crashes, is killed or loses its host drops its
  connection and the lock with it (TCP keepalives and ``tcp_user_timeout`` bound how long a
  silent network failure takes to notice). Followers try again every tick; the leader checks
  every tick that its connection still works and steps down at once if not.
* **SQLite** — one node by definition (a file on one machine). The daemon takes an exclusive
  ``flock`` on ``<database>.daemon.lock`` at start and keeps it; a second daemon on the same
  file refuses to start and names the holder's pid. The kernel drops the lock when the process
  dies, however it dies, so there is never a stale lease to clean up.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.pool import NullPool

from imeisync.domain.errors import BadInput, Unavailable
from imeisync.store.db import describe_url

log = logging.getLogger(__name__)

LEADER_LOCK_KEY = 0x1BE15_D  # next to store.db.WRITE_LOCK_KEY (0x1BE15C), never equal to it
APPLICATION_NAME = "imeisync leader"


def node_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Leadership(Protocol):
    mode: str
    is_leader: bool
    since: float | None

    def tick(self) -> bool:
        """Keep or try to take the lead; True while this node leads."""

    def release(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


def leadership_for(url: str, node: str | None = None) -> Leadership:
    backend = make_url(url).get_backend_name()
    if backend == "postgresql":
        return PostgresLeadership(url, node=node or node_name())
    return SqliteLeadership(url)


class PostgresLeadership:
    mode = "postgresql-advisory-lock"

    def __init__(self, url: str, *, node: str, key: int = LEADER_LOCK_KEY):
        self.url = url
        self.node = node
        self.key = key
        # A connection of its own, never pooled: the lock lives exactly as long as it does.
        self.engine = create_engine(url, poolclass=NullPool, connect_args={
            "application_name": f"{APPLICATION_NAME} {node}"[:63],
            "connect_timeout": 5,
            "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
            "keepalives_count": 3, "tcp_user_timeout": 10_000,
        })
        self.conn: Connection | None = None
        self.is_leader = False
        self.since: float | None = None
        self.last_error: str | None = None

    def tick(self) -> bool:
        if self.is_leader:
            try:
                assert self.conn is not None
                self.conn.exec_driver_sql("SELECT 1")
                return True
            except Exception as exc:
                self._step_down(f"lock connection lost: {_one_line(exc)}")
        try:
            if self.conn is None:
                self.conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                # Let the server notice a vanished leader too (not only the client).
                for name, value in (("tcp_keepalives_idle", 5), ("tcp_keepalives_interval", 2),
                                    ("tcp_keepalives_count", 3)):
                    with contextlib.suppress(Exception):
                        self.conn.exec_driver_sql(f"SET {name} = {int(value)}")
            got = bool(self.conn.execute(text("SELECT pg_try_advisory_lock(:key)"),
                                         {"key": self.key}).scalar())
        except Exception as exc:
            message = _one_line(exc)
            if message != self.last_error:
                log.warning("leader election: database %s unreachable (%s); retrying",
                            describe_url(self.url), message)
            self.last_error = message
            self._close()
            return False
        self.last_error = None
        if got:
            self.is_leader = True
            self.since = time.time()
        return got

    def _step_down(self, why: str) -> None:
        log.error("leadership lost: %s; sync jobs stop on this node until it leads again", why)
        self.is_leader = False
        self.since = None
        self._close()

    def _close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    def release(self) -> None:
        if self.is_leader and self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
        self.is_leader = False
        self.since = None
        self._close()
        self.engine.dispose()

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "this_node": self.is_leader, "node": self.node,
                "since": self.since, "last_error": self.last_error}


class SqliteLeadership:
    mode = "sqlite-single-node"

    def __init__(self, url: str):
        database = make_url(url).database or ""
        if not database or database == ":memory:" or database.startswith("file:"):
            raise BadInput(
                f"[database] url {url!r}: the daemon needs a database file it shares with its "
                "worker processes", "use sqlite:///path/to/imeisync.db or PostgreSQL")
        self.lock_path = Path(database + ".daemon.lock")
        self.fd: int | None = None
        self.is_leader = False
        self.since: float | None = None

    def acquire(self) -> None:
        """Take the node lock or refuse to start (another daemon serves this database)."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise Unavailable(
                f"another imeisync daemon (pid {holder}) already serves the SQLite database "
                f"{self.lock_path.with_suffix('').with_suffix('')}",
                "run one daemon per SQLite database; to run several nodes, use PostgreSQL "
                "([database] url = postgresql+psycopg://…)", code="single_node") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        self.is_leader = True
        self.since = time.time()

    def tick(self) -> bool:
        if self.fd is None:
            self.acquire()
        return True

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None
        self.is_leader = False
        self.since = None

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "this_node": self.is_leader, "node": node_name(),
                "since": self.since, "last_error": None}


def who_leads(url: str) -> dict[str, Any]:
    """Who holds the lead on this database, for ``imeisync sync status`` (any process)."""
    backend = make_url(url).get_backend_name()
    if backend == "postgresql":
        return _pg_leader(url)
    try:
        lock = SqliteLeadership(url).lock_path
    except BadInput:
        return {"mode": "sqlite-single-node", "running": False}
    if not lock.exists():
        return {"mode": "sqlite-single-node", "running": False}
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return {"mode": "sqlite-single-node", "running": None}
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            return {"mode": "sqlite-single-node", "running": True,
                    "node": f"{socket.gethostname()}:{holder}"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return {"mode": "sqlite-single-node", "running": False}
    finally:
        os.close(fd)


def _pg_leader(url: str) -> dict[str, Any]:
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            row = conn.execute(text(
                "SELECT a.application_name, a.backend_start FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :hi "
                "AND l.objid = :lo AND l.objsubid = 1 "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ), {"hi": LEADER_LOCK_KEY >> 32, "lo": LEADER_LOCK_KEY & 0xFFFFFFFF}).first()
    except Exception as exc:
        return {"mode": PostgresLeadership.mode, "running": None, "error": _one_line(exc)}
    finally:
        engine.dispose()
    if row is None:
        return {"mode": PostgresLeadership.mode, "running": False}
    name = row[0] or ""
    node = name[len(APPLICATION_NAME) + 1:] if name.startswith(APPLICATION_NAME) else None
    return {"mode": PostgresLeadership.mode, "running": True, "node": node or "(unknown)",
            "since": row[1].isoformat() if row[1] is not None else None}


def _one_line(exc: Exception) -> str:
    detail = str(getattr(exc, "orig", exc)).strip().splitlines()
    return f"{type(exc).__name__}: {detail[0] if detail else ''}"[:300]
