"""Reading the store for the index: a full build (one streamed scan of the open records),
the changes after a sequence, the state of the keys that changed, and the anchor that ties an
index file to its database."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pyroaring import BitMap, BitMap64
from sqlalchemy import Connection, Engine, bindparam, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from imeisync.adapters.attach_index.index import AttachIndex, release_free_memory
from imeisync.adapters.attach_index.index_file import Anchor
from imeisync.domain.imei import key_to_int
from imeisync.store.db import create_db_engine

_IN_CHUNK = 500  # keys per IN (...) query
_STREAM = 50_000  # rows per fetch when building from the store

_MAX_SEQ = text("SELECT COALESCE(MAX(seq), 0) FROM change_log")
_ANCHOR = text("SELECT imei_key, at FROM change_log WHERE seq = :seq")
_CHANGES = text(
    "SELECT seq, imei_key, imei_key_last, subject FROM change_log WHERE seq > :after "
    "ORDER BY seq LIMIT :limit"
)
_OPEN_KINDS = text(
    "SELECT imei_key, kind FROM records WHERE closed_at IS NULL AND imei_key_last IS NULL "
    "AND imei_key IN :keys"
).bindparams(bindparam("keys", expanding=True))
# Open ranges that may cover keys of one TAC (a range never leaves its TAC).
_OPEN_RANGES = text(
    "SELECT imei_key, imei_key_last, kind FROM records WHERE closed_at IS NULL "
    "AND imei_key_last IS NOT NULL AND imei_key BETWEEN :low AND :high AND imei_key_last >= :first"
)
_ALL_TACS = text("SELECT tac FROM tacs")
_ACTIVE_IMSIS = text(
    "SELECT imei_key, imsi FROM exceptions WHERE removed_at IS NULL AND imei_key IN :keys"
).bindparams(bindparam("keys", expanding=True))
_ALL_OPEN_SQL = (
    "SELECT kind, CAST(imei_key AS BIGINT), CAST(imei_key_last AS BIGINT) FROM records "
    "WHERE closed_at IS NULL"
)
_ALL_IMSIS = text("SELECT imei_key, imsi FROM exceptions WHERE removed_at IS NULL")


def anchor_at(conn: Connection, seq: int) -> Anchor:
    if seq == 0:
        return Anchor(0, None, None)
    row = conn.execute(_ANCHOR, {"seq": seq}).first()
    if row is None:
        return Anchor(seq, None, None)
    return Anchor(seq, row[0], _iso(row[1]))


def _iso(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def build_from_store(conn: Connection) -> tuple[AttachIndex, Anchor]:
    """One consistent pass over the open records and active exceptions.

    The sequence is read first: records may then already include later changes, which the
    follower applies again (recomputing a key's state is idempotent), so nothing is missed.
    """
    seq = newest_seq(conn)
    anchor = anchor_at(conn, seq)
    blocked, tracked = BitMap64(), BitMap64()
    range_blocked, range_tracked = BitMap64(), BitMap64()
    # The DBAPI cursor directly: SQLAlchemy rows cost 4x the scan itself at 10M+ rows.
    # PostgreSQL streams through a server-side (named) cursor; SQLite steps lazily anyway.
    # Any: the driver's own connection (psycopg's cursor takes a name; PEP 249's does not).
    dbapi: Any = conn.connection.dbapi_connection
    assert dbapi is not None
    if conn.dialect.name == "postgresql":
        cursor = dbapi.cursor(name="attach_index_build")
        cursor.itersize = _STREAM
    else:
        cursor = dbapi.cursor()
    try:
        cursor.execute(_ALL_OPEN_SQL)
        while rows := cursor.fetchmany(_STREAM):
            blocked.update([key for kind, key, last in rows if kind == "block" and last is None])
            tracked.update([key for kind, key, last in rows if kind == "track" and last is None])
            for kind, key, last in rows:
                if last is not None:  # a range: its run of keys, a few bytes in its bitmap
                    (range_blocked if kind == "block" else range_tracked).add_range(key, last + 1)
    finally:
        cursor.close()
    maps = [blocked, tracked, range_blocked, range_tracked]
    imsis: dict[int, set[str]] = {}
    for key, imsi in conn.execute(_ALL_IMSIS):
        imsis.setdefault(key_to_int(key), set()).add(imsi)
    exceptions = {k: frozenset(v) for k, v in imsis.items()}
    for bitmap in maps:
        bitmap.run_optimize()
        bitmap.shrink_to_fit()
    release_free_memory()
    return AttachIndex(blocked, tracked, exceptions, seq, range_blocked, range_tracked), anchor


def newest_seq(conn: Connection) -> int:
    return int(conn.execute(_MAX_SEQ).scalar_one())


def changes_after(conn: Connection, seq: int, limit: int) -> Sequence[Any]:
    """(seq, imei_key, imei_key_last, subject) of the next ``limit`` changes after ``seq``."""
    return conn.execute(_CHANGES, {"after": seq, "limit": limit}).all()


def _chunks(items: Sequence[str], size: int = _IN_CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def key_states(
    conn: Connection, keys: Sequence[str]
) -> tuple[dict[int, set[str]], dict[int, frozenset[str]]]:
    """Open single-record kinds and active IMSIs of each key (ranges have their own bitmaps,
    set by ``window_state``)."""
    records: dict[int, set[str]] = {}
    imsis: dict[int, set[str]] = {}
    for chunk in _chunks(keys):
        for key, kind in conn.execute(_OPEN_KINDS, {"keys": list(chunk)}):
            records.setdefault(key_to_int(key), set()).add(kind)
        for key, imsi in conn.execute(_ACTIVE_IMSIS, {"keys": list(chunk)}):
            imsis.setdefault(key_to_int(key), set()).add(imsi)
    return records, {k: frozenset(v) for k, v in imsis.items()}


def _open_ranges(conn: Connection, tac: str, first: str, last: str) -> Sequence[Any]:
    """(first, last, kind) of the open ranges of ``tac`` overlapping ``first..last``."""
    return conn.execute(
        _OPEN_RANGES, {"low": tac + "000000", "high": last, "first": first}
    ).all()


def window_state(conn: Connection, first: str, last: str) -> tuple[BitMap64, BitMap64]:
    """Keys of ``first..last`` (one TAC) inside open ranges, blocking and tracking: the part
    of every open range overlapping it."""
    blocked, tracked = BitMap64(), BitMap64()
    low, high = key_to_int(first), key_to_int(last)
    for r_first, r_last, kind in _open_ranges(conn, first[:8], first, last):
        start, stop = max(low, key_to_int(r_first)), min(high, key_to_int(r_last))
        (blocked if kind == "block" else tracked).add_range(start, stop + 1)
    return blocked, tracked


def load_tacs(conn: Connection) -> BitMap:
    """The TAC table's TACs as integers (empty: no table loaded)."""
    return BitMap(int(tac) for (tac,) in conn.execute(_ALL_TACS))


def reader_engine(url: str) -> Engine:
    """An engine for the index's reads. SQLite: read-only and unpooled, so an unreachable file
    is never re-created empty and a file put back is seen at the next poll."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database).resolve()
        engine = create_engine(
            f"sqlite:///file:{path}?mode=ro&uri=true", poolclass=NullPool,
            connect_args={"timeout": 5},
        )
        return engine
    return create_db_engine(url, pool_size=2, max_overflow=2, pool_recycle=300)
