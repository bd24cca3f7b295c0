"""The registry's snapshot: every open record a member receives, streamed at one position."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from imeisync.registry import canaries
from imeisync.registry.config import Member
from imeisync.registry.models import FeedEntry
from imeisync.store.db import Database

# imei_last: empty for a single device, the last key of a range record
SNAPSHOT_COLUMNS = "imei,owner,country,kind,reason,seq,at,imei_last"
_SNAPSHOT_ROWS_PER_CHUNK = 5000


class Snapshot:
    """All open records ``member`` receives at one feed position, streamed from one read
    transaction (repeatable read), in (imei, owner) order. ``open()`` fixes the position;
    iterate ``lines()`` once; ``close()`` always (iteration does it at the end)."""

    def __init__(self, db: Database, member: Member):
        self.db = db
        self.member = member
        self.conn: Connection | None = None
        self.seq = 0
        self.records = 0
        self.digest = hashlib.sha256()

    def open(self) -> int:
        conn = self.db.engine.connect()
        if self.db.dialect == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        conn.begin()
        self.conn = conn
        self.seq = conn.execute(select(func.coalesce(func.max(FeedEntry.seq), 0))).scalar_one()
        return self.seq

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.rollback()
            finally:
                self.conn.close()
                self.conn = None

    def lines(self, trailer: Callable[[str, int, int], str]) -> Iterator[bytes]:
        """The body: the column line, one line per record, then ``trailer(sha256, n, seq)``.

        Read through the driver's cursor (a server-side one on PostgreSQL), 5,000 rows at a
        time: at ten million records, SQLAlchemy's row objects cost more than the query.
        """
        assert self.conn is not None, "open() first"
        postgres = self.db.dialect == "postgresql"

        def param(name: str) -> str:
            return f"%({name})s" if postgres else f":{name}"

        cursor = None
        try:
            member = self.member
            where, params = "closed_seq IS NULL", {}
            if member.receives == "country":
                where += f" AND (owner_country = {param('country')} OR owner_id = {param('me')})"
                params = {"country": member.country, "me": member.id}
            elif member.receives != "all":
                names = [*member.receives, member.id]
                marks = ", ".join(param(f"o{i}") for i in range(len(names)))
                where += f" AND owner_id IN ({marks})"
                params = {f"o{i}": name for i, name in enumerate(names)}
            collate = ' COLLATE "C"' if postgres else ""
            query = ("SELECT imei_key, owner_id, owner_country, kind, reason, opened_seq, "
                     "opened_at, COALESCE(imei_key_last, '') "
                     f"FROM registry_records WHERE {where} "
                     f"ORDER BY imei_key, owner_id{collate}")
            head = (SNAPSHOT_COLUMNS + "\n").encode()
            self.digest.update(head)
            yield head
            # The member's own canaries, read in this transaction, join the stream in order.
            pending = canaries.snapshot_lines(self.conn, member, self.seq)
            driver = self.conn.connection.driver_connection
            assert driver is not None
            cursor = driver.cursor(name="imeisync_snapshot") if postgres else driver.cursor()
            cursor.execute(query, params)
            while True:
                rows = cursor.fetchmany(_SNAPSHOT_ROWS_PER_CHUNK)
                if rows:
                    rows = canaries.merge(rows, pending)
                elif pending:  # those after the last record
                    rows, pending = pending, []
                else:
                    break
                chunk = "".join(
                    [f"{k},{o},{c},{kind},{r},{s},{at},{last}\n"
                     for k, o, c, kind, r, s, at, last in rows]
                ).encode()
                self.records += len(rows)
                self.digest.update(chunk)
                yield chunk
            yield trailer(self.digest.hexdigest(), self.records, self.seq).encode()
        finally:
            if cursor is not None:
                cursor.close()
            self.close()
