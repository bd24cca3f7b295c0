"""Sighting notices through the registry (issue 13 item 5), both ways.

Push: ``sent`` notices (written by the sighting writer: another operator's tracked device seen
on our network) go to ``POST /v1/sightings`` in id order — notice id, IMEI key and time, and
nothing else: the row has no subscriber and no node to send. As with the outbox, rows are
marked ``sent`` before the request, so a lost answer means a resend, which the registry answers
by notice id without a second feed entry; each is then ``accepted`` or ``rejected`` (with the
registry's code in ``last_error``). A row the registry could not even parse is rejected here
(``0011``) so that it cannot hold the others back.

Pull: ``sighting`` feed entries become ``received`` notices for OUR open track records, with an
audit event in the case's history ("seen on a network of op-b (SE) at …"). An entry addressed
to another operator, reported by ourselves, or for a device we do not track (any more) is
refused, counted and writes nothing; a replayed one is recognised by its notice id.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from imeisync.adapters.registry_client import SightingEntry
from imeisync.domain.errors import ImeisyncError
from imeisync.domain.fields import REFERENCE_ID
from imeisync.domain.imei import is_key
from imeisync.domain.times import rfc3339_micro
from imeisync.services.sync.push import claim, note_failure
from imeisync.services.sync.results import PullResult, SightingsResult
from imeisync.store.bulk import parse_at
from imeisync.store.models import Record, SightingAlert, SightingNotice
from imeisync.store.ranges import records_over

if TYPE_CHECKING:
    from imeisync.services.sync.service import SyncService

log = logging.getLogger(__package__)

MAX_BATCH = 1000
_CHUNK = 500
MALFORMED = "0011"  # the registry's code for a malformed field (registry/codes.py)

NOTICES = Counter("imeisync_sync_sighting_notices",
                  "Sighting notices between operators: sent (accepted, duplicate, rejected) and "
                  "received (recorded, duplicate, refused)", ["direction", "result"])


# -- push ------------------------------------------------------------------------------------


def push(sync: SyncService, batch_size: int = MAX_BATCH) -> SightingsResult:
    """Send pending (and unanswered sent) notices; mark each with the registry's answer."""
    batch_size = max(1, min(batch_size, MAX_BATCH))
    result = SightingsResult()
    while True:
        rows = _claim(sync, batch_size)
        if not rows:
            break
        wire = [_wire(row) for row in rows]
        sendable = [(row, notice) for row, notice in zip(rows, wire, strict=True) if notice]
        answers: list[dict[str, Any]] = []
        if sendable:
            try:
                answers = sync.client.push_sightings([n for _r, n in sendable])
            except ImeisyncError as exc:
                note_failure(sync, SightingNotice.__table__,
                             [row["id"] for row, _n in sendable], str(exc))
                raise
        result.sent += len(sendable)
        _record(sync, rows, wire, answers, result)
        if len(rows) < batch_size:
            break
    return result


def _claim(sync: SyncService, batch_size: int) -> list[dict[str, Any]]:
    table = SightingNotice.__table__
    return claim(sync, table, [table.c.id, table.c.notice_id, table.c.imei_key,
                               table.c.seen_at],
                 (table.c.direction == "sent") & table.c.state.in_(("pending", "sent")),
                 batch_size)


def _wire(row: dict[str, Any]) -> dict[str, str] | None:
    """The notice as the registry takes it (None when the row cannot be one)."""
    if not REFERENCE_ID.fullmatch(row["notice_id"] or "") or not is_key(row["imei_key"]):
        return None
    seen = row["seen_at"]
    if seen.tzinfo is None:
        seen = seen.replace(tzinfo=UTC)
    return {"notice_id": row["notice_id"], "imei": row["imei_key"],
            "seen_at": rfc3339_micro(seen)}


def _record(sync: SyncService, rows: list[dict[str, Any]], wire: list[dict[str, str] | None],
            answers: list[dict[str, Any]], result: SightingsResult) -> None:
    table = SightingNotice.__table__
    replies = iter(answers)
    updates = []
    for row, notice in zip(rows, wire, strict=True):
        if notice is None:
            answer = {"result": "rejected", "code": MALFORMED,
                      "message": "not sent: the row's notice id or IMEI key is malformed"}
        else:
            answer = next(replies)
        outcome = answer["result"]
        NOTICES.labels("sent", outcome).inc()
        if outcome == "rejected":
            result.rejected += 1
            error = f"{answer.get('code')} {answer.get('message') or ''}"[:1000]
            result.rejections.append({"notice_id": row["notice_id"],
                                      "imei_key": row["imei_key"], "error": error})
            log.warning("registry rejected sighting notice %s of IMEI key %s: %s",
                        row["notice_id"], row["imei_key"], error)
            updates.append({"b_id": row["id"], "b_state": "rejected", "b_error": error})
        else:
            result.accepted += 1
            updates.append({"b_id": row["id"], "b_state": "accepted", "b_error": None})
    with sync.db.write() as session:
        session.execute(
            update(table).where(table.c.id == bindparam("b_id"), table.c.state == "sent")
            .values(state=bindparam("b_state"), last_error=bindparam("b_error")), updates)


# -- pull ------------------------------------------------------------------------------------


def received_notice_id(reporter_id: str, notice_id: str) -> str:
    """Our row's id for a reporter's notice: unique across reporters (an operator id has no
    ``:``) and never equal to one of our own sent notices' ids."""
    local = f"{reporter_id}:{notice_id}"
    if len(local) <= 80:
        return local
    return f"{reporter_id[:40]}:#{hashlib.sha256(local.encode()).hexdigest()[:38]}"


def apply_received(sync: SyncService, session: Session, entries: list[SightingEntry],
                   refused: int, now: datetime, result: PullResult) -> None:
    """Write ``received`` notices for ours among ``entries`` (in the page's transaction);
    ``refused`` entries were already refused as malformed by the page check."""
    table = SightingNotice.__table__
    result.sightings_refused += refused
    NOTICES.labels("received", "refused").inc(refused)
    ours = [e for e in entries if e.owner_id == sync.me and e.reporter_id != sync.me]
    records = _our_track_records(session, sync.me, sorted({e.imei_key for e in ours}))
    local_ids = [received_notice_id(e.reporter_id, e.notice_id) for e in ours]
    done = _existing(session, local_ids)
    rows = []
    for entry in entries:
        problem, record = _problem(sync, entry, records)
        if problem:
            result.sightings_refused += 1
            NOTICES.labels("received", "refused").inc()
            log.warning("sighting feed entry %d refused: %s", entry.seq, problem)
            continue
        local_id = received_notice_id(entry.reporter_id, entry.notice_id)
        if local_id in done:  # a page seen again: recorded the first time
            result.stale += 1
            NOTICES.labels("received", "duplicate").inc()
            continue
        done.add(local_id)
        rows.append({"notice_id": local_id, "direction": "received",
                     "imei_key": entry.imei_key, "owner_id": sync.me,
                     "reporter_id": entry.reporter_id,
                     "reporter_country": entry.reporter_country, "seen_at": parse_at(entry.at),
                     "state": "received", "attempts": 0, "registry_seq": entry.seq,
                     "record_id": record.id})
        # No audit event and no device in the log: the audit trail and the journal outlive
        # [sightings] retention_days, and a line per notice would keep the device's trace past
        # it. The notice itself (purged with the sightings) is the case's record of it.
        log.info("a tracked device of ours was seen on a network of %s (%s)",
                 entry.reporter_id, entry.reporter_country)
    if rows:
        session.execute(insert(table), rows)
        if sync.alerts:  # the police case hears of it as of a sighting here (sighting_alerts)
            session.execute(insert(SightingAlert.__table__), [
                {"sighting_id": row["notice_id"], "created_at": now, "state": "pending",
                 "attempts": 0, "next_attempt_at": now} for row in rows])
    result.sightings += len(rows)
    NOTICES.labels("received", "recorded").inc(len(rows))


def _our_track_records(session: Session, me: str, keys: list[str]) -> dict[str, Any]:
    """Our open track record over each of ``keys``, by key."""
    found = records_over(session, keys, (Record.id, Record.case_ref), Record.owner_id == me,
                         Record.kind == "track", Record.closed_at.is_(None))
    return {key: rows[0] for key, rows in found.items() if rows}


def _existing(session: Session, local_ids: list[str]) -> set[str]:
    table = SightingNotice.__table__
    found: set[str] = set()
    for start in range(0, len(local_ids), _CHUNK):
        found.update(session.execute(select(table.c.notice_id).where(
            table.c.notice_id.in_(local_ids[start : start + _CHUNK]))).scalars())
    return found


def _problem(sync: SyncService, entry: SightingEntry, records: dict[str, Any],
             ) -> tuple[str | None, Any]:
    """Why ``entry`` is not a sighting of one of our open track records (None: it is), and
    that record."""
    if entry.owner_id != sync.me:
        return f"addressed to {entry.owner_id}, not to us", None
    if entry.reporter_id == sync.me:
        return "reported by ourselves", None
    record = records.get(entry.imei_key)
    if record is None:
        return f"we have no open track record for IMEI key {entry.imei_key}", None
    return None, record
