"""Reconcile: repair the foreign records from a verified snapshot of the registry.

It pulls first, downloads the snapshot to a spool file (verified end to end), then merges it in
(imei, owner) order against the open records: foreign records missing locally are opened,
extra ones closed, drifted ones (kind, reason, country) closed and reopened; our own are never
touched, only counted. If it would close more than ``max_shrink`` of the foreign records it
refuses, alerts and changes nothing, unless forced. Small repairs are computed outside the
write lock and applied in a short transaction; a bootstrap (no foreign records yet) or a large
repair streams inside one transaction.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client import Counter
from sqlalchemy import func, insert, literal, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from imeisync.adapters.registry_client import SnapshotFile
from imeisync.domain.errors import ImeisyncError, Unavailable
from imeisync.domain.times import rfc3339
from imeisync.services import audit
from imeisync.services.notices import pending_notices
from imeisync.services.sync.push import SYSTEM_ACTOR
from imeisync.services.sync.results import ReconcileResult, ShrinkRefused
from imeisync.services.sync.snapshot import SnapshotRow, snapshot_rows
from imeisync.store import sync_state
from imeisync.store.bulk import (
    Bulk,
    OpenRecord,
    RecordBatch,
    bulk_pragmas,
    open_records_in_order,
)
from imeisync.store.models import ChangeLog, Record

if TYPE_CHECKING:
    from imeisync.services.sync.service import SyncService

log = logging.getLogger(__package__)

SHRINK_REFUSED = Counter("imeisync_sync_reconcile_refused",
                         "Reconciliations refused by the shrink guard")

_WRITE_BATCH = 5000
_SMALL_REPAIR = 100_000  # repairs computed outside the write lock up to this many


class Repair(NamedTuple):
    """One difference the merge found: open a snapshot record, close a local one, or both
    (a drifted record is closed and reopened)."""

    close: OpenRecord | None
    open: SnapshotRow | None


def reconcile(sync: SyncService, force: bool) -> ReconcileResult:
    """Repair foreign records from a verified snapshot, under the shrink guard."""
    bootstrap = sync.cursor_or_none() is None
    if not bootstrap:
        sync.pull()  # the snapshot is then at or after our feed position
    with tempfile.TemporaryDirectory(prefix="imeisync-snapshot-",
                                     dir=sync.spool_dir) as folder:
        snapshot = sync.client.snapshot(Path(folder) / "snapshot.csv")
        try:
            return _reconcile(sync, snapshot, force, bootstrap)
        except ShrinkRefused as refused:
            _refused(sync, refused)
            raise


def _cursor(session: Session) -> int | None:
    return sync_state.read(session, (sync_state.CURSOR,)).cursor


def _reconcile(sync: SyncService, snapshot: SnapshotFile, force: bool, bootstrap: bool,
               ) -> ReconcileResult:
    with sync.db.read() as session:
        cursor_before = _cursor(session)
        foreign = session.execute(select(func.count()).select_from(Record).where(
            Record.closed_at.is_(None), Record.source == "registry")).scalar_one()
    if foreign and not bootstrap:
        # Compute the repair outside the write lock; apply it in a short transaction if
        # nothing moved meanwhile.
        result = ReconcileResult(seq=snapshot.seq, forced=force, mode="short")
        with sync.db.read() as session:
            repairs = _collect(_merge(sync.me, session.connection(), snapshot, result),
                               _SMALL_REPAIR)
        if repairs is not None:
            _guard(sync, result, force)
            with sync.db.write() as session:
                if _cursor(session) == cursor_before:
                    _check_position(session, snapshot)
                    batch = RecordBatch(session.connection(), sync.clock(), _WRITE_BATCH)
                    _apply(batch, repairs, snapshot.seq)
                    batch.flush()
                    _finish(sync, session, result)
                    return result
    # Bootstrap, a large repair, or the feed moved: merge inside one write transaction.
    result = ReconcileResult(seq=snapshot.seq, forced=force,
                             mode="bootstrap" if not foreign else "streamed")
    with sync.db.write() as session:
        _check_position(session, snapshot)
        conn = session.connection()
        with bulk_pragmas(conn):
            empty = conn.execute(select(Record.id).where(Record.closed_at.is_(None))
                                 .limit(1)).first() is None
            if empty:  # nothing to merge against: insert straight from the spool
                _load(sync, conn, snapshot, result)
            else:
                batch = RecordBatch(conn, sync.clock(), _WRITE_BATCH)
                _apply(batch, _merge(sync.me, conn, snapshot, result), snapshot.seq)
                _guard(sync, result, force)  # raises: the transaction rolls back
                batch.flush()
        if _cursor(session) is None:
            sync_state.put(session, sync_state.CURSOR, str(snapshot.seq), sync.clock())
        _finish(sync, session, result)
    return result


def _apply(batch: RecordBatch, repairs: Iterable[Repair], seq: int) -> None:
    opened_by, closed_by = f"snapshot@{seq}", f"reconcile@{seq}"
    time_checked = batch.bulk.time_checked
    for close, new in repairs:
        if close is not None:
            batch.close(close.id, close.imei_key, close.kind, closed_by, "reconcile",
                        close.imei_key_last)
        if new is not None:
            batch.open(new.imei_key, new.owner_id, new.owner_country, new.kind, new.reason,
                       time_checked(new.at), opened_by, new.seq, new.imei_key_last)


def _load(sync: SyncService, conn: Connection, snapshot: SnapshotFile,
          result: ReconcileResult) -> None:
    """An empty store: every snapshot record is opened (ours are only counted), then their
    change_log rows are written in one statement, in id order."""
    bulk = Bulk(conn)
    opened_by = f"snapshot@{snapshot.seq}"
    me = sync.me
    time_of = bulk.time_checked
    first_id = conn.execute(select(func.coalesce(func.max(Record.id), 0))).scalar_one()
    withdrawn = pending_notices(conn)  # closed by a lift notice: never reopened from here

    def rows() -> Iterator[tuple[Any, ...]]:
        for key, owner, country, kind, reason, seq, at, last in snapshot_rows(snapshot.path):
            result.records += 1
            if owner == me:
                result.own_missing += 1
                continue
            if withdrawn and (key, owner) in withdrawn:
                result.unchanged += 1
                continue
            # insert_sql's values (a plain tuple: millions of rows)
            yield (key, owner, country, kind, reason, "registry", time_of(at), opened_by, seq,
                   None, None, None, last)

    bulk.insert_records(rows())
    result.opened = result.records - result.own_missing - result.unchanged
    conn.execute(
        insert(ChangeLog.__table__).from_select(
            ["imei_key", "subject", "op", "kind", "at", "imei_key_last"],
            select(Record.imei_key, literal("record"), literal("open"), Record.kind,
                   literal(sync.clock(), Record.__table__.c.opened_at.type),
                   Record.imei_key_last)
            .where(Record.id > first_id).order_by(Record.id)))


def _check_position(session: Session, snapshot: SnapshotFile) -> None:
    cursor = _cursor(session)
    if cursor is not None and cursor > snapshot.seq:
        raise Unavailable(
            f"the feed moved past the snapshot (position {cursor} > {snapshot.seq}) while "
            "it was downloaded; nothing was changed", "run `imeisync sync reconcile` again",
            code="snapshot_outdated")


def _guard(sync: SyncService, result: ReconcileResult, force: bool) -> None:
    closing = result.closed
    if (result.foreign_before and closing / result.foreign_before > sync.max_shrink
            and not force):
        raise ShrinkRefused(closing, result.foreign_before, sync.max_shrink, result.seq)


def _finish(sync: SyncService, session: Session, result: ReconcileResult) -> None:
    now = sync.clock()
    sync_state.put(session, sync_state.RECONCILE_RESULT,
                   json.dumps({"at": rfc3339(now), **result.as_dict()}), now)
    sync_state.drop(session, sync_state.RECONCILE_REFUSED)
    audit.append(session, [audit.Event(
        actor=SYSTEM_ACTOR, role="system", action="sync.reconcile",
        outcome="forced" if result.forced and result.closed else "ok", at=now,
        detail=result.as_dict())])
    if result.own_missing or result.own_extra or result.own_mismatch:
        log.warning("reconcile: our own records differ from the registry's (%d there only, "
                    "%d here only, %d of another kind)", result.own_missing,
                    result.own_extra, result.own_mismatch)


def _refused(sync: SyncService, refused: ShrinkRefused) -> None:
    SHRINK_REFUSED.inc()
    log.error("%s", refused)
    now = sync.clock()
    with contextlib.suppress(ImeisyncError), sync.db.write() as session:
        sync_state.put(session, sync_state.RECONCILE_REFUSED, json.dumps({
            "at": rfc3339(now), "seq": refused.seq, "closing": refused.closing,
            "foreign": refused.foreign, "share": round(refused.share, 4),
            "max_shrink": sync.max_shrink}), now)
        audit.append(session, [audit.Event(
            actor=SYSTEM_ACTOR, role="system", action="sync.reconcile", outcome="refused",
            at=now, detail={"seq": refused.seq, "closing": refused.closing,
                            "foreign": refused.foreign})])


def _merge(me: str, conn: Connection, snapshot: SnapshotFile,
           result: ReconcileResult) -> Iterator[Repair]:
    """Walk the snapshot and the open records in (imei, owner) order; yield the repairs."""
    withdrawn = pending_notices(conn)  # closed by a lift notice: never reopened from here
    local = open_records_in_order(conn)
    remote = snapshot_rows(snapshot.path)
    loc = next(local, None)
    rem = next(remote, None)
    while loc is not None or rem is not None:
        if loc is None or (rem is not None and rem[:2] < loc[:2]):
            assert rem is not None
            result.records += 1
            if rem.owner_id == me:
                result.own_missing += 1
            elif (rem.imei_key, rem.owner_id) in withdrawn:
                result.unchanged += 1
            else:
                result.opened += 1
                yield Repair(None, rem)
            rem = next(remote, None)
        elif rem is None or rem[:2] > loc[:2]:
            if loc.owner_id == me:
                result.own_extra += 1
            else:
                result.foreign_before += 1
                result.closed += 1
                yield Repair(loc, None)
            loc = next(local, None)
        else:
            result.records += 1
            if loc.owner_id == me:
                if loc.kind != rem.kind:
                    result.own_mismatch += 1
            else:
                result.foreign_before += 1
                if ((loc.owner_country, loc.kind, loc.reason, loc.imei_key_last)
                        != (rem.owner_country, rem.kind, rem.reason, rem.imei_key_last)):
                    result.replaced += 1
                    yield Repair(loc, rem)
                else:
                    result.unchanged += 1
            loc = next(local, None)
            rem = next(remote, None)


def _collect(repairs: Iterable[Repair], limit: int) -> list[Repair] | None:
    """The repairs as a list, or None when there are more than ``limit``."""
    collected: list[Repair] = []
    for repair in repairs:
        collected.append(repair)
        if len(collected) > limit:
            return None
    return collected
