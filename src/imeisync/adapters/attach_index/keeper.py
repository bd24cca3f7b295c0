"""``IndexKeeper`` keeps one index current in a process:

1. start-up: load the persisted file (``[eir] index_file``) if it is intact and belongs to this
   database, else build from the store (one streamed scan of the open records) and write it;
2. a follower thread polls ``change_log`` (``seq > last_seq``, every 200 ms) and recomputes the
   state of the keys that changed from ``records``/``exceptions`` (batched ``IN`` queries), so an
   order accepted by any process is answered within a second;
3. when the database is unreachable it keeps the last good index and says how stale it is
   (``health()``); it rewrites the file now and then so a restart catches up from a recent seq.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from imeisync.adapters.attach_index.index import AttachIndex
from imeisync.adapters.attach_index.index_file import Anchor, IndexFileError
from imeisync.adapters.attach_index.store_reader import (
    anchor_at,
    build_from_store,
    changes_after,
    key_states,
    load_tacs,
    newest_seq,
    reader_engine,
    window_state,
)
from imeisync.adapters.attach_index.violations import ViolationAudit
from imeisync.domain.imei import key_to_int
from imeisync.domain.times import rfc3339_millis
from imeisync.store.db import describe_url

log = logging.getLogger("imeisync.adapters.attach_index")

_PAGE = 20_000  # change_log rows per poll query
_REBUILD_AFTER = 500_000  # a backlog this long is cheaper to rebuild than to replay


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
        unknown_tac: str = "ignore",
    ):
        self.database_url = database_url
        self.index_file = Path(index_file) if index_file else None
        self.unknown_tac = unknown_tac  # [eir] unknown_tac, applied while a TAC table is loaded
        self.tac_count = 0
        self._tacs_loaded = False
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
        self.audit = ViolationAudit()  # BLACKLISTED answers for devices lifted > 1 min ago

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
            "last_refresh": rfc3339_millis(refreshed) if refreshed else None,
            "staleness_seconds": round(now - (refreshed or self.started_at), 3),
            "database_reachable": self.database_reachable,
            "last_error": self.last_error,
            "violations": self.audit.count,
            # [eir] unknown_tac and whether it applies (only while a TAC table is loaded)
            "unknown_tac": self.unknown_tac,
            "tac_table_size": self.tac_count,
            "unknown_tac_applied": index is not None and index.tacs is not None,
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
                    self._load_tacs(index)
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
                here = anchor_at(conn, anchor.seq)
                newest = newest_seq(conn)
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
                self._set_tacs(index, load_tacs(conn))
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
            if not self._tacs_loaded:
                with self.engine.connect() as conn:
                    self._set_tacs(index, load_tacs(conn))
            while True:
                behind = 0
                with self.engine.connect() as conn:
                    rows = changes_after(conn, index.seq, _PAGE)
                    if not rows:
                        break
                    if len(rows) == _PAGE:
                        behind = newest_seq(conn) - index.seq
                    if behind <= _REBUILD_AFTER:
                        # Singles by key; a range by its window of keys; the TAC table whole.
                        keys = list(dict.fromkeys(
                            row[1] for row in rows if row[2] is None and row[3] != "tacs"))
                        records, exceptions = key_states(conn, keys)
                        windows = {(row[1], row[2]): window_state(conn, row[1], row[2])
                                   for row in rows if row[2] is not None}
                        tacs = (load_tacs(conn) if any(row[3] == "tacs" for row in rows)
                                else None)
                if behind > _REBUILD_AFTER:
                    return self._rebuild(reason=f"{behind} changes behind")
                index.apply(records, exceptions, [key_to_int(k) for k in keys])
                for (first, last), (blocked, tracked) in windows.items():
                    index.apply_window(key_to_int(first), key_to_int(last), blocked, tracked)
                if tacs is not None:
                    self._set_tacs(index, tacs)
                index.seq = rows[-1][0]
                if len(rows) < _PAGE:
                    break
            if self.audit.pending(index):
                with self.engine.connect() as conn:
                    self.audit.check(conn, index)
        except Exception as exc:
            self._unreachable(exc)
            return False
        self._reachable()
        return True

    def _load_tacs(self, index: AttachIndex) -> None:
        """The TAC table for an index loaded from its file (the file holds no TACs); with the
        database unreachable the policy waits for the first poll that reaches it."""
        try:
            with self.engine.connect() as conn:
                self._set_tacs(index, load_tacs(conn))
        except Exception as exc:
            log.warning("attach index: TAC table not loaded (%s); [eir] unknown_tac applies "
                        "once the database is reachable", exc)

    def _set_tacs(self, index: AttachIndex, tacs: Any) -> None:
        self.tac_count = len(tacs)
        self._tacs_loaded = True
        index.set_tacs(tacs, self.unknown_tac)

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
                    anchor = anchor_at(conn, seq)
            started = time.monotonic()
            size = index.save(self.index_file, anchor)
        except Exception as exc:
            log.warning("attach index: could not write %s: %s", self.index_file, exc)
            self._saved_at = time.monotonic()  # try again after the next interval
            return
        self._saved_seq, self._saved_at = seq, time.monotonic()
        log.info("attach index: wrote %s (%s entries, seq %s, %.1f MB) in %.2fs",
                 self.index_file, len(index), seq, size / 1e6, time.monotonic() - started)
