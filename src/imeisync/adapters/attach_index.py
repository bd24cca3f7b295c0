"""The attach index: which 14-digit keys are blocked or tracked, in memory, at GSMA scale.

The attach check answers from here and never from the database. Three structures:

* ``blocked`` and ``tracked`` -- ``pyroaring.BitMap64`` over the key as an integer
  (``domain.imei.key_to_int``). IMEIs cluster by TAC (the device model), so a compressed bitmap
  holds ~2.5 bytes per entry where a Python set needs ~75, and a lookup costs ~0.3 µs.
* ``exceptions`` -- key → frozenset of IMSIs allowed through a block (a few, at most thousands).

The verdict itself is ``domain.verdict.verdict()``: the index only tabulates it once for the
eight combinations of (blocked, tracked, excepted), so the rule stays written in one place.

``IndexKeeper`` keeps one index current in a process:

1. start-up: load the persisted file (``[eir] index_file``) if it is intact and belongs to this
   database, else build from the store (one streamed scan of the open records) and write it;
2. a follower thread polls ``change_log`` (``seq > last_seq``, every 200 ms) and recomputes the
   state of the keys that changed from ``records``/``exceptions`` (batched ``IN`` queries), so an
   order accepted by any process is answered within a second;
3. when the database is unreachable it keeps the last good index and says how stale it is
   (``health()``); it rewrites the file now and then so a restart catches up from a recent seq.

The file is written atomically (temporary file, fsync, rename, fsync of the folder) with a
header carrying the change sequence it reflects, the change at that sequence (so a file made
from another database, or a database restored from an older backup, is not trusted) and a
SHA-256 over header and payload (so a torn or corrupted file is detected and rebuilt).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroaring import BitMap64
from sqlalchemy import Connection, Engine, bindparam, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from imeisync.domain.imei import key_to_int
from imeisync.domain.verdict import Status, verdict
from imeisync.store.db import create_db_engine, describe_url

log = logging.getLogger(__name__)

__all__ = [
    "AttachIndex",
    "IndexFileError",
    "IndexKeeper",
    "build_from_store",
]

# The verdict for every (blocked, tracked, excepted), computed by the one rule in domain.verdict.
_TABLE: tuple[Status, ...] = tuple(
    verdict(blocked=bool(i & 4), tracked=bool(i & 2), excepted=bool(i & 1)) for i in range(8)
)
_NO_IMSIS: frozenset[str] = frozenset()

_IN_CHUNK = 500  # keys per IN (...) query
_PAGE = 20_000  # change_log rows per poll query
_REBUILD_AFTER = 500_000  # a backlog this long is cheaper to rebuild than to replay
_STREAM = 50_000  # rows per fetch when building from the store


class AttachIndex:
    """Blocked and tracked keys, exceptions, and the change sequence they reflect.

    ``lookup`` may run concurrently with ``apply`` (the follower thread): every change adds
    the new state before removing the old one, so a reader sees either state, never neither.
    """

    __slots__ = ("blocked", "exceptions", "seq", "tracked")

    def __init__(
        self,
        blocked: BitMap64 | None = None,
        tracked: BitMap64 | None = None,
        exceptions: dict[int, frozenset[str]] | None = None,
        seq: int = 0,
    ):
        self.blocked = blocked if blocked is not None else BitMap64()
        self.tracked = tracked if tracked is not None else BitMap64()
        self.exceptions = exceptions if exceptions is not None else {}
        self.seq = seq

    def lookup(self, key: int, imsi: str | None = None) -> Status:
        """The verdict for a key (``key_to_int``) and, optionally, the subscriber's IMSI."""
        i = 4 if key in self.blocked else 0
        if key in self.tracked:
            i |= 2
        if imsi is not None and imsi in self.exceptions.get(key, _NO_IMSIS):
            i |= 1
        return _TABLE[i]

    def __len__(self) -> int:
        """Entries: keys with at least one open record (blocked, tracked or both)."""
        return len(self.blocked) + len(self.tracked) - self.blocked.intersection_cardinality(
            self.tracked
        )

    def counts(self) -> dict[str, int]:
        return {
            "entries": len(self),
            "blocked": len(self.blocked),
            "tracked": len(self.tracked),
            "exception_keys": len(self.exceptions),
        }

    # -- changes --------------------------------------------------------------------------

    def apply(
        self,
        records: dict[int, set[str]],
        exceptions: dict[int, frozenset[str]],
        keys: Iterable[int],
    ) -> None:
        """Set the state of ``keys``: open record kinds per key, active IMSIs per key.

        A key absent from ``records``/``exceptions`` has none. Adds come before removals.
        """
        add_blocked: list[int] = []
        add_tracked: list[int] = []
        drop_blocked: list[int] = []
        drop_tracked: list[int] = []
        for key in keys:
            kinds = records.get(key, ())
            (add_blocked if "block" in kinds else drop_blocked).append(key)
            (add_tracked if "track" in kinds else drop_tracked).append(key)
            imsis = exceptions.get(key)
            if imsis:
                self.exceptions[key] = imsis
            else:
                self.exceptions.pop(key, None)
        self.blocked.update(add_blocked)
        self.tracked.update(add_tracked)
        for key in drop_blocked:
            self.blocked.discard(key)
        for key in drop_tracked:
            self.tracked.discard(key)

    # -- persistence ----------------------------------------------------------------------

    def save(self, path: Path, anchor: Anchor) -> int:
        """Write the index to ``path`` atomically; returns the file's size in bytes."""
        blocked = self.blocked.serialize()
        tracked = self.tracked.serialize()
        exc = json.dumps(
            {str(k): sorted(v) for k, v in self.exceptions.items()}, separators=(",", ":")
        ).encode()
        anchor_bytes = anchor.encode()
        header = _HEADER.pack(
            MAGIC, FORMAT_VERSION, 0, self.seq, time.time(),
            len(self.blocked), len(self.tracked), len(self.exceptions),
            len(blocked), len(tracked), len(exc), len(anchor_bytes),
        )
        digest = hashlib.sha256(header)
        for part in (anchor_bytes, blocked, tracked, exc):
            digest.update(part)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                for part in (header, digest.digest(), anchor_bytes, blocked, tracked, exc):
                    handle.write(part)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return _HEADER.size + 32 + len(anchor_bytes) + len(blocked) + len(tracked) + len(exc)

    @classmethod
    def load(cls, path: Path) -> tuple[AttachIndex, Anchor]:
        """Read a file written by ``save``; ``IndexFileError`` says why it is unusable."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IndexFileError(f"{path} does not exist", missing=True) from None
        except OSError as exc:
            raise IndexFileError(f"{path} cannot be read: {exc.strerror}") from None
        if len(data) < _HEADER.size + 32:
            raise IndexFileError(f"{path} is truncated ({len(data)} bytes)")
        (magic, version, _flags, seq, _written, n_blocked, n_tracked, n_exc,
         len_blocked, len_tracked, len_exc, len_anchor) = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise IndexFileError(f"{path} is not an imeisync attach index (bad magic)")
        if version != FORMAT_VERSION:
            raise IndexFileError(f"{path} has format version {version}, expected {FORMAT_VERSION}")
        start = _HEADER.size + 32
        end = start + len_anchor + len_blocked + len_tracked + len_exc
        if end != len(data):
            raise IndexFileError(
                f"{path} has {len(data)} bytes, its header announces {end} (truncated or padded)"
            )
        view = memoryview(data)
        digest = hashlib.sha256(view[: _HEADER.size])
        digest.update(view[start:end])
        if digest.digest() != data[_HEADER.size : start]:
            raise IndexFileError(f"{path} fails its SHA-256 checksum (corrupted)")
        try:
            anchor = Anchor.decode(bytes(view[start : start + len_anchor]))
            start += len_anchor
            # pyroaring reads any buffer (no copy of the bitmap); its stub says bytes only.
            blocked = BitMap64.deserialize(view[start : start + len_blocked])  # type: ignore[arg-type]
            start += len_blocked
            tracked = BitMap64.deserialize(view[start : start + len_tracked])  # type: ignore[arg-type]
            start += len_tracked
            raw = json.loads(bytes(view[start:end]))
            exceptions = {int(k): frozenset(v) for k, v in raw.items()}
        except Exception as exc:  # checksum passed: a writer bug, not bit rot
            raise IndexFileError(f"{path} cannot be decoded: {exc}") from None
        if (len(blocked), len(tracked), len(exceptions)) != (n_blocked, n_tracked, n_exc):
            raise IndexFileError(f"{path}: entry counts do not match its header")
        del view, data
        release_free_memory()
        return cls(blocked, tracked, exceptions, seq), anchor


MAGIC = b"IMSYAIX\x00"
FORMAT_VERSION = 1
# magic, version, flags, seq, written_at, n_blocked, n_tracked, n_exceptions,
# len_blocked, len_tracked, len_exceptions, len_anchor; then 32 bytes of SHA-256.
_HEADER = struct.Struct("<8sHHqdQQQQQQQ")


class IndexFileError(Exception):
    """The persisted index cannot be used (missing, truncated, corrupted, foreign)."""

    def __init__(self, message: str, *, missing: bool = False):
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class Anchor:
    """The change at the file's sequence: a database that does not hold it is another one."""

    seq: int
    imei_key: str | None  # None at seq 0 (nothing ever changed)
    at: str | None

    def encode(self) -> bytes:
        return json.dumps([self.seq, self.imei_key, self.at]).encode()

    @classmethod
    def decode(cls, data: bytes) -> Anchor:
        seq, key, at = json.loads(data)
        return cls(int(seq), key, at)


# -- reading the store ---------------------------------------------------------------------

_MAX_SEQ = text("SELECT COALESCE(MAX(seq), 0) FROM change_log")
_ANCHOR = text("SELECT imei_key, at FROM change_log WHERE seq = :seq")
_CHANGES = text(
    "SELECT seq, imei_key FROM change_log WHERE seq > :after ORDER BY seq LIMIT :limit"
)
_OPEN_KINDS = text(
    "SELECT imei_key, kind FROM records WHERE closed_at IS NULL AND imei_key IN :keys"
).bindparams(bindparam("keys", expanding=True))
_ACTIVE_IMSIS = text(
    "SELECT imei_key, imsi FROM exceptions WHERE removed_at IS NULL AND imei_key IN :keys"
).bindparams(bindparam("keys", expanding=True))
_ALL_OPEN_SQL = "SELECT kind, CAST(imei_key AS BIGINT) FROM records WHERE closed_at IS NULL"
_ALL_IMSIS = text("SELECT imei_key, imsi FROM exceptions WHERE removed_at IS NULL")


def _anchor(conn: Connection, seq: int) -> Anchor:
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
    seq = int(conn.execute(_MAX_SEQ).scalar_one())
    anchor = _anchor(conn, seq)
    blocked, tracked = BitMap64(), BitMap64()
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
            blocked.update([key for kind, key in rows if kind == "block"])
            tracked.update([key for kind, key in rows if kind == "track"])
    finally:
        cursor.close()
    maps = [blocked, tracked]
    imsis: dict[int, set[str]] = {}
    for key, imsi in conn.execute(_ALL_IMSIS):
        imsis.setdefault(key_to_int(key), set()).add(imsi)
    exceptions = {k: frozenset(v) for k, v in imsis.items()}
    for bitmap in maps:
        bitmap.run_optimize()
        bitmap.shrink_to_fit()
    release_free_memory()
    return AttachIndex(blocked, tracked, exceptions, seq), anchor


def release_free_memory() -> None:
    """Hand the heap freed by a build or load back to the system (glibc), so the resident
    size is the index and not the peak of making it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _chunks(items: Sequence[str], size: int = _IN_CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _states(
    conn: Connection, keys: Sequence[str]
) -> tuple[dict[int, set[str]], dict[int, frozenset[str]]]:
    records: dict[int, set[str]] = {}
    imsis: dict[int, set[str]] = {}
    for chunk in _chunks(keys):
        for key, kind in conn.execute(_OPEN_KINDS, {"keys": list(chunk)}):
            records.setdefault(key_to_int(key), set()).add(kind)
        for key, imsi in conn.execute(_ACTIVE_IMSIS, {"keys": list(chunk)}):
            imsis.setdefault(key_to_int(key), set()).add(imsi)
    return records, {k: frozenset(v) for k, v in imsis.items()}


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


# -- keeping it current --------------------------------------------------------------------


class IndexKeeper:
    """One process's attach index: loaded or built at start, then following ``change_log``.

    ``index`` is always the last good index (or ``None`` before the first one exists);
    readers fetch the attribute once per lookup. ``health()`` reports its freshness.
    """

    def __init__(
        self,
        database_url: str,
        index_file: str | os.PathLike[str] | None,
        *,
        poll_interval: float = 0.2,
        persist_interval: float = 300.0,
        engine: Engine | None = None,
    ):
        self.database_url = database_url
        self.index_file = Path(index_file) if index_file else None
        self.poll_interval = poll_interval
        self.persist_interval = persist_interval
        self.engine = engine or reader_engine(database_url)
        self.index: AttachIndex | None = None
        self.source = "none"  # file | store
        self.database_reachable = False
        self.last_refresh: float | None = None  # wall time of the last successful poll
        self.last_error: str | None = None
        self.started_at = time.time()
        self._anchor_checked = False
        self._file_anchor: Anchor | None = None
        self._saved_seq: int | None = None
        self._saved_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0

    # -- life cycle -----------------------------------------------------------------------

    def start(self, *, follow: bool = True) -> IndexKeeper:
        """Load or build the index (blocking), then follow the change sequence in a thread.

        Never raises for an unreachable database: the keeper then serves the file if there
        is one, or is not ready and keeps trying.
        """
        with self._file_lock():
            self._load_or_build()
        if follow:
            self._thread = threading.Thread(
                target=self._follow, name="attach-index-follower", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, *, persist: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if persist and self.index is not None and self.index.seq != self._saved_seq:
            self._persist()
        self.engine.dispose()

    @property
    def ready(self) -> bool:
        return self.index is not None

    def health(self) -> dict[str, Any]:
        now = time.time()
        index = self.index
        refreshed = self.last_refresh
        return {
            "ready": index is not None,
            "source": self.source,
            "seq": index.seq if index is not None else None,
            **(index.counts() if index is not None else {"entries": 0}),
            "last_refresh": _utc(refreshed) if refreshed else None,
            "staleness_seconds": round(now - (refreshed or self.started_at), 3),
            "database_reachable": self.database_reachable,
            "last_error": self.last_error,
        }

    # -- start-up -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Several workers start together: one builds and writes the file, the others load it."""
        if self.index_file is None:
            yield
            return
        lock_path = self.index_file.with_name(self.index_file.name + ".lock")
        try:
            self.index_file.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "a")  # noqa: SIM115 -- closed by the with below
        except OSError as exc:
            log.warning("attach index: cannot lock %s (%s); going on without", lock_path, exc)
            yield
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _load_or_build(self) -> None:
        started = time.monotonic()
        if self.index_file is not None:
            try:
                index, anchor = AttachIndex.load(self.index_file)
            except IndexFileError as exc:
                if exc.missing:
                    log.info("attach index: no persisted index at %s; building it from the store",
                             self.index_file)
                else:
                    log.warning("attach index: persisted index unusable: %s; rebuilding it from "
                                "the store", exc)
            else:
                verdict_ = self._check_anchor(anchor)
                if verdict_ is False:
                    log.warning(
                        "attach index: %s was written for another database or a newer state of "
                        "it (change %s is not in %s); rebuilding it from the store",
                        self.index_file, anchor.seq, describe_url(self.database_url))
                else:
                    self.index, self.source = index, "file"
                    self._file_anchor = anchor
                    self._saved_seq, self._saved_at = index.seq, time.monotonic()
                    log.info("attach index: loaded %s entries at seq %s from %s in %.2fs%s",
                             len(index), index.seq, self.index_file,
                             time.monotonic() - started,
                             "" if verdict_ else " (database unreachable: serving the file)")
                    self._poll()  # catch up now, before the first answer
                    return
        self._rebuild(reason="start")

    def _check_anchor(self, anchor: Anchor) -> bool | None:
        """True: the file belongs to this database; False: it does not; None: cannot tell."""
        try:
            with self.engine.connect() as conn:
                here = _anchor(conn, anchor.seq)
                newest = int(conn.execute(_MAX_SEQ).scalar_one())
        except Exception as exc:
            self._unreachable(exc)
            return None
        self._anchor_checked = True
        return anchor.seq <= newest and here == anchor

    def _rebuild(self, *, reason: str) -> bool:
        started = time.monotonic()
        try:
            with self.engine.connect() as conn, conn.begin():
                index, anchor = build_from_store(conn)
        except Exception as exc:
            self._unreachable(exc)
            if self.index is None:
                log.error("attach index: cannot build from the store (%s); not ready, retrying",
                          self.last_error)
            return False
        self.index, self.source = index, "store"
        self._anchor_checked = True
        self._reachable()
        log.info("attach index: built %s entries at seq %s from the store in %.2fs (%s)",
                 len(index), index.seq, time.monotonic() - started, reason)
        self._persist(anchor)
        return True

    # -- following ------------------------------------------------------------------------

    def _follow(self) -> None:
        while not self._stop.wait(self._next_wait()):
            if self.index is None:
                with self._file_lock():
                    if self.index is None:
                        self._load_or_build()
                continue
            self._poll()
            if (
                self.index is not None
                and self.index.seq != self._saved_seq
                and time.monotonic() - self._saved_at >= self.persist_interval
            ):
                self._persist()

    def _next_wait(self) -> float:
        # Back off to at most 5 s while the database is down; poll fast while it is up.
        return min(self.poll_interval * (2.0 ** min(self._failures, 5)), 5.0)

    def poll(self) -> bool:
        """One catch-up step now (tests, and callers that just wrote); True if it succeeded."""
        return self._poll()

    def _poll(self) -> bool:
        index = self.index
        if index is None:
            return False
        try:
            # Loaded from the file while the database was unreachable: check it now.
            if (not self._anchor_checked and self._file_anchor is not None
                    and self._check_anchor(self._file_anchor) is False):
                log.warning("attach index: the database does not hold change %s the "
                            "persisted index was written at; rebuilding from the store",
                            self._file_anchor.seq)
                return self._rebuild(reason="foreign index file")
            while True:
                behind = 0
                with self.engine.connect() as conn:
                    rows = conn.execute(_CHANGES, {"after": index.seq, "limit": _PAGE}).all()
                    if not rows:
                        break
                    if len(rows) == _PAGE:
                        behind = int(conn.execute(_MAX_SEQ).scalar_one()) - index.seq
                    if behind <= _REBUILD_AFTER:
                        keys = list(dict.fromkeys(row[1] for row in rows))
                        records, exceptions = _states(conn, keys)
                if behind > _REBUILD_AFTER:
                    return self._rebuild(reason=f"{behind} changes behind")
                index.apply(records, exceptions, [key_to_int(k) for k in keys])
                index.seq = rows[-1][0]
                if len(rows) < _PAGE:
                    break
        except Exception as exc:
            self._unreachable(exc)
            return False
        self._reachable()
        return True

    def _reachable(self) -> None:
        if not self.database_reachable and self.last_error is not None:
            log.warning("attach index: database %s reachable again; following changes",
                        describe_url(self.database_url))
        self.database_reachable = True
        self.last_refresh = time.time()
        self.last_error = None
        self._failures = 0

    def _unreachable(self, exc: Exception) -> None:
        detail = str(getattr(exc, "orig", exc)).strip().splitlines()
        message = f"{type(exc).__name__}: {detail[0] if detail else ''}"[:300]
        if self.database_reachable or self.last_error is None:
            log.warning("attach index: database %s unreachable (%s); answering from the last "
                        "good index", describe_url(self.database_url), message)
        self.database_reachable = False
        self.last_error = message
        self._failures += 1
        with contextlib.suppress(Exception):
            self.engine.dispose()

    # -- persisting -----------------------------------------------------------------------

    def _persist(self, anchor: Anchor | None = None) -> None:
        index = self.index
        if self.index_file is None or index is None:
            return
        seq = index.seq
        try:
            if anchor is None or anchor.seq != seq:
                with self.engine.connect() as conn:
                    anchor = _anchor(conn, seq)
            started = time.monotonic()
            size = index.save(self.index_file, anchor)
        except Exception as exc:
            log.warning("attach index: could not write %s: %s", self.index_file, exc)
            self._saved_at = time.monotonic()  # try again after the next interval
            return
        self._saved_seq, self._saved_at = seq, time.monotonic()
        log.info("attach index: wrote %s (%s entries, seq %s, %.1f MB) in %.2fs",
                 self.index_file, len(index), seq, size / 1e6, time.monotonic() - started)


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"
