"""Pull: follow the registry's feed from the stored cursor.

Each page is verified (signature, shape, sequence) by the client, then applied in one write
transaction together with the new cursor, so a page is applied entirely or not at all, exactly
once. A remove closes only its owner's record — ``decide_removal``, the rule the order intake
and the registry use. Our own changes coming back are confirmations (``confirmed_at``), never
applied to our records. Disputes about our records are stored for liaison staff; answers to
ours update them. Sightings of our tracked devices on other networks become ``received``
notices (``services/sync/sightings.py``).
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import Counter
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from imeisync.adapters.registry_client import (
    Change,
    DisputeAnswerEntry,
    DisputeEntry,
    FeedPage,
    SightingEntry,
)
from imeisync.domain.errors import ImeisyncError
from imeisync.domain.ownership import RemovalOutcome, decide_removal
from imeisync.services import audit
from imeisync.services.notices import confirm_notices
from imeisync.services.sync import sightings as _sightings
from imeisync.services.sync.push import SYSTEM_ACTOR
from imeisync.services.sync.results import PullResult
from imeisync.store import sync_state
from imeisync.store.bulk import RecordBatch, feed_cache, parse_at
from imeisync.store.models import Dispute, OutboxChange, Record

if TYPE_CHECKING:
    from imeisync.services.sync.service import SyncService

log = logging.getLogger(__package__)

PULLED = Counter("imeisync_sync_feed_entries", "Feed entries applied", ["type"])

_CHUNK = 500


@dataclass(eq=False)
class _Local:
    """An open record while a feed page is applied (``RecordLike`` for ``decide_removal``)."""

    owner_id: str
    owner_country: str
    kind: str
    reason: str
    id: int | None = None
    place: int | None = None  # in the page's batch, when opened by this page
    last: str | None = None  # a range record's last key (its first is the key it is under)


def pull(sync: SyncService, page_size: int, max_pages: int | None) -> PullResult:
    """Apply feed pages from the cursor until the registry has nothing newer.

    The next page is fetched (and verified) while the current one is applied; a page is
    applied only if the stored cursor is still where it was asked from.
    """
    result = PullResult()
    with ThreadPoolExecutor(1, "imeisync-feed") as fetcher:
        cursor = sync.cursor()
        ahead: Future[FeedPage] | None = fetcher.submit(sync.client.feed_page, cursor,
                                                        page_size)
        while ahead is not None and (max_pages is None or result.pages < max_pages):
            page = ahead.result()
            ahead = None
            if page.more and (max_pages is None or result.pages + 1 < max_pages):
                ahead = fetcher.submit(sync.client.feed_page, page.next, page_size)
            with sync.db.write() as session:
                current = sync_state.read(session, (sync_state.CURSOR,)).cursor or 0
                if current != page.after:  # another puller got here first
                    cursor = current
                    if ahead is not None:
                        with contextlib.suppress(ImeisyncError):
                            ahead.result()
                    ahead = fetcher.submit(sync.client.feed_page, cursor, page_size)
                    continue
                _apply_page(sync, session, page, result)
                now = sync.clock()
                sync_state.put(session, sync_state.CURSOR, str(page.next), now)
                sync_state.put(session, sync_state.HEAD, str(page.head), now)
            result.pages += 1
            cursor = result.cursor = page.next
            result.head = page.head
    result.cursor = cursor
    return result


def _apply_page(sync: SyncService, session: Session, page: FeedPage,
                result: PullResult) -> None:
    conn = session.connection()
    feed_cache(conn)
    now = sync.clock()
    foreign = [e for e in page.entries if isinstance(e, Change) and e.owner_id != sync.me]
    keys = sorted({e.imei_key for e in foreign})
    open_by_key: dict[str, list[_Local]] = {}
    records = Record.__table__
    for start in range(0, len(keys), _CHUNK):
        for row in conn.execute(
            select(records.c.id, records.c.imei_key, records.c.owner_id,
                   records.c.owner_country, records.c.kind, records.c.reason,
                   records.c.imei_key_last)
            .where(records.c.imei_key.in_(keys[start : start + _CHUNK]),
                   records.c.closed_at.is_(None))
        ):
            open_by_key.setdefault(row.imei_key, []).append(
                _Local(row.owner_id, row.owner_country, row.kind, row.reason, id=row.id,
                       last=row.imei_key_last))
    batch = RecordBatch(conn, now)
    confirmations: list[str] = []
    disputes: list[DisputeEntry] = []
    answers: list[DisputeAnswerEntry] = []
    seen: list[SightingEntry] = []
    noticed: list[tuple[str, str]] = []
    for entry in page.entries:
        result.entries += 1
        if isinstance(entry, Change):
            if entry.owner_id == sync.me:
                confirmations.append(entry.change_id)
            elif entry.action == "insert":
                _insert(batch, open_by_key.setdefault(entry.imei_key, []), entry, result)
            else:
                opened = open_by_key.setdefault(entry.imei_key, [])
                # A range and a single starting at the same key are different records.
                decision = decide_removal(
                    [r for r in opened if r.last == entry.imei_key_last], entry.owner_id)
                if decision.outcome is not RemovalOutcome.ALLOWED:
                    result.stale += 1  # closed already (perhaps by a notice), or never received
                    noticed.append((entry.imei_key, entry.owner_id))
                    continue
                for record in decision.own:
                    opened.remove(record)
                    _close(batch, record, entry.imei_key, entry.change_id, entry.reason)
                    result.closed += 1
        elif isinstance(entry, DisputeEntry):
            disputes.append(entry)
        elif isinstance(entry, SightingEntry):
            seen.append(entry)
        else:
            answers.append(entry)
    result.skipped += page.skipped
    PULLED.labels("change").inc(len(page.entries) - len(disputes) - len(answers) - len(seen))
    PULLED.labels("dispute").inc(len(disputes))
    PULLED.labels("dispute_answer").inc(len(answers))
    PULLED.labels("sighting").inc(len(seen))
    batch.flush()
    if noticed:
        confirm_notices(session, noticed, now)
    if confirmations:
        outbox = OutboxChange.__table__
        for start in range(0, len(confirmations), _CHUNK):
            part = confirmations[start : start + _CHUNK]
            conn.execute(update(outbox).where(outbox.c.change_id.in_(part),
                                              outbox.c.confirmed_at.is_(None))
                         .values(confirmed_at=now))
            # Seen in the feed proves acceptance, even if the push's answer was lost.
            conn.execute(update(outbox).where(outbox.c.change_id.in_(part),
                                              outbox.c.state.in_(("pending", "sent")))
                         .values(state="accepted"))
        result.confirmed += len(confirmations)
    events = _apply_disputes(sync, session, disputes, answers, now, result)
    _sightings.apply_received(sync, session, seen, page.refused_sightings, now, result)
    events.append(audit.Event(
        actor=SYSTEM_ACTOR, role="system", action="sync.pull", outcome="ok", at=now,
        detail={"after": page.after, "next": page.next, "entries": len(page.entries),
                "opened": batch.opened, "closed": batch.closed}))
    audit.append(session, events)


def _close(batch: RecordBatch, record: _Local, key: str, change_id: str, reason: str) -> None:
    if record.place is not None:
        batch.close_new(record.place, change_id, reason)
    else:
        assert record.id is not None
        batch.close(record.id, key, record.kind, change_id, reason, record.last)


def _insert(batch: RecordBatch, opened: list[_Local], entry: Change,
            result: PullResult) -> None:
    mine = [r for r in opened if r.owner_id == entry.owner_id]
    if mine and all(r.kind == entry.kind and r.reason == entry.reason
                    and r.owner_country == entry.owner_country
                    and r.last == entry.imei_key_last for r in mine):
        result.stale += 1
        return
    for record in mine:  # the owner's record as we knew it is superseded
        opened.remove(record)
        _close(batch, record, entry.imei_key, entry.change_id, "superseded")
        result.closed += 1
    place = batch.open(entry.imei_key, entry.owner_id, entry.owner_country, entry.kind,
                       entry.reason, batch.bulk.time_of(entry.at), entry.change_id, entry.seq,
                       entry.imei_key_last)
    opened.append(_Local(entry.owner_id, entry.owner_country, entry.kind, entry.reason,
                         place=place, last=entry.imei_key_last))
    result.opened += 1


def _apply_disputes(sync: SyncService, session: Session, disputes: list[DisputeEntry],
                    answers: list[DisputeAnswerEntry], now: datetime,
                    result: PullResult) -> list[audit.Event]:
    events: list[audit.Event] = []
    table = Dispute.__table__
    for d in disputes:
        if d.owner_id != sync.me:
            continue  # not addressed to us: nothing to do
        exists = session.execute(select(table.c.id).where(
            table.c.dispute_id == d.dispute_id)).first()
        if exists:
            continue
        session.execute(insert(table).values(
            dispute_id=d.dispute_id, direction="received", imei_key=d.imei_key,
            filer_id=d.filer_id, filer_country=d.filer_country, owner_id=d.owner_id,
            owner_country=d.owner_country, case_ref=d.case_ref, reason=d.reason,
            filed_at=parse_at(d.at), state="open", registry_seq=d.seq))
        result.disputes += 1
        log.warning("dispute %s received: %s (%s) asks us to review our record of IMEI key "
                    "%s (their case %s)", d.dispute_id, d.filer_id, d.filer_country,
                    d.imei_key, d.case_ref)
        events.append(audit.Event(
            actor=SYSTEM_ACTOR, role="system", action="dispute.received", outcome="open",
            at=now, imei_key=d.imei_key,
            detail={"dispute_id": d.dispute_id, "filer": d.filer_id,
                    "filer_case_ref": d.case_ref}))
    for a in answers:
        row = session.execute(select(table.c.id, table.c.state, table.c.direction).where(
            table.c.dispute_id == a.dispute_id)).first()
        if row is None:
            log.warning("answer to unknown dispute %s ignored", a.dispute_id)
            result.stale += 1
            continue
        if row.state == a.answer:
            continue
        session.execute(update(table).where(table.c.id == row.id).values(
            state=a.answer, answer_reason=a.reason, answered_at=parse_at(a.at),
            registry_seq=a.seq))
        result.answers += 1
        events.append(audit.Event(
            actor=SYSTEM_ACTOR, role="system", action="dispute.answered", outcome=a.answer,
            at=now, imei_key=a.imei_key,
            detail={"dispute_id": a.dispute_id, "owner": a.owner_id,
                    "direction": row.direction}))
    return events
