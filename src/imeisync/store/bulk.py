"""Bulk writes to ``records`` and ``change_log``, and the ordered read of open records, for the
feed and the snapshot, which move up to millions of rows.

Rows go through the driver's ``executemany``: SQLAlchemy's per-row parameter processing would
cost more than the database. Values are converted here, once, to what the store's column
types would have bound (SQLite keeps times as text), so this is where the dialects differ.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import select, tuple_
from sqlalchemy.engine import Connection

from imeisync.store.models import Record

# The registry's own time form (``registry.service.rfc3339``), stored without re-parsing.
REGISTRY_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")

# A record row's values, in this order, wherever rows go to the driver (``Bulk.insert_sql``).
RECORD_COLUMNS = ("imei_key", "owner_id", "owner_country", "kind", "reason", "source",
                  "opened_at", "opened_by", "registry_seq", "closed_at", "closed_by",
                  "close_reason", "imei_key_last")
_LOCAL_PAGE = 20000
_FEED_CACHE_KIB = 131072  # 128 MiB


class OpenRecord(NamedTuple):
    """An open record as ``open_records_in_order`` reads it."""

    imei_key: str
    owner_id: str
    owner_country: str
    kind: str
    reason: str
    id: int
    imei_key_last: str | None  # a range record's last key


def parse_at(at: str) -> datetime:
    """A feed or snapshot time (RFC 3339, already checked) as an aware UTC datetime."""
    return datetime.fromisoformat(at.replace("Z", "+00:00")).astimezone(UTC)


class Bulk:
    """The dialect's SQL and bound values for bulk record writes on one connection."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.sqlite = conn.dialect.name == "sqlite"
        mark = "?" if self.sqlite else "%s"
        self.insert_sql = (f"INSERT INTO records ({', '.join(RECORD_COLUMNS)}) "
                           f"VALUES ({', '.join([mark] * len(RECORD_COLUMNS))})")
        self.close_sql = (f"UPDATE records SET closed_at = {mark}, closed_by = {mark}, "
                          f"close_reason = {mark} WHERE id = {mark}")
        self.log_sql = ("INSERT INTO change_log (imei_key, subject, op, kind, at, imei_key_last) "
                        f"VALUES ({mark}, 'record', {mark}, {mark}, {mark}, {mark})")

    def time(self, moment: datetime) -> Any:
        """As ``UTCDateTime`` stores it: SQLAlchemy's SQLite text form, or an aware UTC
        datetime for PostgreSQL."""
        moment = moment.astimezone(UTC)
        return moment.strftime("%Y-%m-%d %H:%M:%S.%f") if self.sqlite else moment

    def time_checked(self, at: str) -> Any:
        """A time already checked to be in the registry's form (``REGISTRY_TIME``)."""
        return f"{at[:10]} {at[11:26]}" if self.sqlite else datetime.fromisoformat(at)

    def time_of(self, at: str) -> Any:
        """A feed or snapshot time (RFC 3339) as the store binds it."""
        if self.sqlite and len(at) == 27 and REGISTRY_TIME.fullmatch(at):
            return f"{at[:10]} {at[11:26]}"
        return self.time(parse_at(at))

    def insert_records(self, rows: Any) -> None:
        """Insert rows, each the values of ``insert_sql`` in its column order, from any
        iterable (a generator streams a snapshot)."""
        with self._cursor() as cursor:
            cursor.executemany(self.insert_sql, rows)

    def write(self, opens: list[tuple[Any, ...]], closes: list[tuple[Any, str, str, int]],
              log: list[tuple[str, str, str, Any, str | None]]) -> None:
        """Closes first (a record reopened in the same batch needs its slot), then opens,
        then the change_log rows in the order the changes happened. Each row is the values of
        ``insert_sql``, ``close_sql`` or ``log_sql`` as a plain tuple: there are millions,
        and the driver binds named tuples a third slower."""
        with self._cursor() as cursor:
            if closes:
                cursor.executemany(self.close_sql, closes)
            if opens:
                cursor.executemany(self.insert_sql, opens)
            if log:
                cursor.executemany(self.log_sql, log)

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[Any]:
        """The driver's own cursor on this connection (inside its transaction)."""
        cursor = self.conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            yield cursor
        finally:
            cursor.close()


class RecordBatch:
    """Record opens and closes with their change_log rows, in the order they happen, written
    in bulk: a feed page's writes, or a reconcile's repairs (flushed every ``flush_every``).
    The rows it builds are the values of ``Bulk``'s statements, named by its parameters."""

    def __init__(self, conn: Connection, now: datetime, flush_every: int | None = None):
        self.bulk = Bulk(conn)
        self.now = self.bulk.time(now)
        self.flush_every = flush_every
        self.opens: list[tuple[Any, ...]] = []  # insert_sql's values
        self.closes: list[tuple[Any, str, str, int]] = []  # closed_at, closed_by, reason, id
        # imei_key, op, kind, at, imei_key_last
        self.log: list[tuple[str, str, str, Any, str | None]] = []
        self.opened = 0  # rows inserted, all flushes together
        self.closed = 0  # existing records closed (a row opened and closed here is not)

    def open(self, imei_key: str, owner_id: str, owner_country: str, kind: str, reason: str,
             opened_at: Any, opened_by: str, registry_seq: int,
             imei_key_last: str | None = None) -> int:
        """Queue a registry record (``opened_at`` as bound: ``Bulk.time_of``; a range when
        ``imei_key_last`` is given); returns its place, for ``close_new`` before the next
        flush."""
        self.opens.append((imei_key, owner_id, owner_country, kind, reason, "registry",
                           opened_at, opened_by, registry_seq, None, None, None, imei_key_last))
        self.log.append((imei_key, "open", kind, self.now, imei_key_last))
        self.opened += 1
        if self.flush_every is not None and len(self.log) >= self.flush_every:
            self.flush()
        return len(self.opens) - 1

    def close(self, record_id: int, key: str, kind: str, closed_by: str, reason: str,
              key_last: str | None = None) -> None:
        self.closes.append((self.now, closed_by, reason, record_id))
        self.log.append((key, "close", kind, self.now, key_last))
        self.closed += 1
        if self.flush_every is not None and len(self.log) >= self.flush_every:
            self.flush()

    def close_new(self, place: int, closed_by: str, reason: str) -> None:
        """Close a row queued by ``open`` and not yet written (no flush in between)."""
        key, owner, country, kind, why, source, at, by, seq, *_, last = self.opens[place]
        self.opens[place] = (key, owner, country, kind, why, source, at, by, seq,
                             self.now, closed_by, reason, last)
        self.log.append((key, "close", kind, self.now, last))

    def flush(self) -> None:
        self.bulk.write(self.opens, self.closes, self.log)
        self.opens, self.closes, self.log = [], [], []


def open_records_in_order(conn: Connection) -> Iterator[OpenRecord]:
    """Open records (own and foreign) in (imei, owner) byte order, page by page (each page is
    read whole, so writes made meanwhile behind the position are never seen)."""
    records = Record.__table__
    owner = (records.c.owner_id.collate("C") if conn.dialect.name == "postgresql"
             else records.c.owner_id)
    columns = (records.c.imei_key, records.c.owner_id, records.c.owner_country,
               records.c.kind, records.c.reason, records.c.id, records.c.imei_key_last)
    after: tuple[str, str] | None = None
    while True:
        query = select(*columns).where(records.c.closed_at.is_(None))
        if after is not None:
            query = query.where(tuple_(records.c.imei_key, owner) > tuple_(*after))
        rows = [OpenRecord(*row) for row in
                conn.execute(query.order_by(records.c.imei_key, owner).limit(_LOCAL_PAGE))]
        yield from rows
        if len(rows) < _LOCAL_PAGE:
            return
        after = (rows[-1].imei_key, rows[-1].owner_id)


def feed_cache(conn: Connection) -> None:
    """Give the connection applying feed pages a page cache that holds the records' indexes'
    working set. SQLite's default (2 MiB) makes every page of a large pull evict and re-read
    index pages (10x slower at 1M changes). Kept on the pooled connection: it only grows
    when used, and the next page applied benefits from the pages cached."""
    if conn.dialect.name == "sqlite":
        current = conn.exec_driver_sql("PRAGMA cache_size").scalar() or 0
        if -int(current) < _FEED_CACHE_KIB:
            conn.exec_driver_sql(f"PRAGMA cache_size = -{_FEED_CACHE_KIB}")


@contextlib.contextmanager
def bulk_pragmas(conn: Connection) -> Iterator[None]:
    """A larger page cache for a bulk merge on SQLite (restored afterwards)."""
    if conn.dialect.name != "sqlite":
        yield
        return
    before = conn.exec_driver_sql("PRAGMA cache_size").scalar_one()
    conn.exec_driver_sql("PRAGMA cache_size = -262144")  # 256 MiB
    try:
        yield
    finally:
        conn.exec_driver_sql(f"PRAGMA cache_size = {int(before)}")
