"""Apply acknowledgements and receipts: the end of every order's road.

After a pull committed, we tell the registry how far we applied its feed (``acknowledge``:
never ahead of the stored cursor, which moved in the same transaction as the page). For our own
changes, the registry's signed receipts say which recipient operators applied them; ``poll``
fetches them for changes not yet applied everywhere — a bounded number per run, the longest
unasked first — and stores each verbatim, so progress and the downloadable receipt come from
what the registry signed. A lift not applied everywhere within ``[sync] receipt_deadline`` is
overdue: a log event, and a list in ``sync_state`` for ``sync status``, the console and the
daemon's gauge ``imeisync_receipts_overdue_lifts``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, or_, select
from sqlalchemy.orm import Session

from imeisync.adapters.registry_receipts import Receipt, fetch_receipt
from imeisync.adapters.registry_receipts import acknowledge as send_ack
from imeisync.domain.errors import NotFound, Refused
from imeisync.domain.times import rfc3339
from imeisync.services.sync.results import ReceiptsResult
from imeisync.store import sync_state
from imeisync.store.models import ChangeReceipt, OutboxChange

if TYPE_CHECKING:
    from imeisync.services.sync.service import SyncService

log = logging.getLogger(__package__)

POLL_LIMIT = 200
# A change's receipts are followed this long; after that, its last receipt stands (a member
# that never acknowledges must not cost a request per pull for ever).
HORIZON = timedelta(days=30)
SETTLED = ("accepted", "duplicate")  # outbox states the registry holds



def acknowledge(sync: SyncService) -> int | None:
    """Send the committed feed position if it moved since the last ack; the position sent."""
    with sync.db.read() as session:
        state = sync_state.read(session, (sync_state.CURSOR, sync_state.ACKED))
    cursor, acked = state.cursor, state.number(sync_state.ACKED)
    if cursor is None or cursor == acked:
        return None
    send_ack(sync.client, cursor)
    with sync.db.write() as session:
        sync_state.put(session, sync_state.ACKED, str(cursor), sync.clock())
    return cursor


def poll(sync: SyncService, limit: int) -> ReceiptsResult:
    result = ReceiptsResult()
    outbox, receipts = OutboxChange.__table__, ChangeReceipt.__table__
    with sync.db.read() as session:
        due = session.execute(
            select(outbox.c.change_id, receipts.c.complete)
            .select_from(outbox.outerjoin(receipts, receipts.c.change_id == outbox.c.change_id))
            .where(outbox.c.state.in_(SETTLED), outbox.c.at > sync.clock() - HORIZON,
                   or_(receipts.c.complete.is_(None), receipts.c.complete.is_(False)))
            .order_by(receipts.c.fetched_at.is_not(None), receipts.c.fetched_at, outbox.c.id)
            .limit(limit)).all()
    fetched: list[Receipt] = []
    for change_id, _complete in due:
        try:
            fetched.append(fetch_receipt(sync.client, change_id))
        except (NotFound, Refused):
            result.unknown += 1  # not (yet) known there: the feed's confirmation tells
    now = sync.clock()
    with sync.db.write() as session:
        for receipt in fetched:
            _store(session, receipt, now)
            result.fetched += 1
            if receipt.complete:
                result.completed += 1
            else:
                result.waiting += 1
        result.overdue = _overdue(session, now - timedelta(seconds=sync.receipt_deadline))
        before = sync_state.read(session, (sync_state.OVERDUE,)).json(sync_state.OVERDUE) or []
        sync_state.put(session, sync_state.OVERDUE, json.dumps(result.overdue), now)
    known = {o.get("change_id") for o in before if isinstance(o, dict)}
    for o in result.overdue:
        if o["change_id"] not in known:
            log.error("receipt.overdue lift of order %s (IMEI key %s, accepted %s) not applied "
                      "by %s within the receipt deadline", o["order_id"], o["imei_key"], o["at"],
                      ", ".join(f"{m['member']} ({m.get('country')})" for m in o["missing"])
                      or "(no receipt yet)")
    return result


def _store(session: Session, receipt: Receipt, now: datetime) -> None:
    table = ChangeReceipt.__table__
    session.execute(delete(table).where(table.c.change_id == receipt.change_id))
    session.execute(insert(table).values(
        change_id=receipt.change_id, seq=receipt.seq, applied=receipt.applied,
        total=receipt.total, complete=receipt.complete,
        recipients=json.dumps(receipt.recipients), jws=receipt.jws, fetched_at=now,
        completed_at=now if receipt.complete else None))


def _overdue(session: Session, older_than: datetime) -> list[dict[str, Any]]:
    """Our lifts accepted before ``older_than`` that no receipt shows applied everywhere."""
    outbox, receipts = OutboxChange.__table__, ChangeReceipt.__table__
    rows = session.execute(
        select(outbox.c.order_id, outbox.c.change_id, outbox.c.imei_key, outbox.c.at,
               receipts.c.recipients)
        .select_from(outbox.outerjoin(receipts, receipts.c.change_id == outbox.c.change_id))
        .where(outbox.c.action == "remove", outbox.c.at < older_than,
               outbox.c.state.in_(("pending", "sent", *SETTLED)),
               or_(receipts.c.complete.is_(None), receipts.c.complete.is_(False)))
        .order_by(outbox.c.id).limit(1000)).all()
    return [{"order_id": r.order_id, "change_id": r.change_id, "imei_key": r.imei_key,
             "at": rfc3339(r.at),
             "missing": [m for m in json.loads(r.recipients or "[]") if not m.get("applied")]}
            for r in rows]


def overdue(session: Session) -> list[dict[str, Any]]:
    """The overdue lifts as the last receipts poll found them."""
    found = sync_state.read(session, (sync_state.OVERDUE,)).json(sync_state.OVERDUE)
    return found if isinstance(found, list) else []



