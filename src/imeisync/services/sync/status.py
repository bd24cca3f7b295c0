"""Status: how the sync stands, for ``imeisync sync status`` (the daemon's figures are
``services.operations``; both read ``sync_state`` through ``store.sync_state``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from imeisync.domain.times import rfc3339
from imeisync.services.operations import (
    OUTBOX_STATES,
    dispute_counts,
    oldest_unsent,
    outbox_depth,
)
from imeisync.services.sync.receipts import overdue
from imeisync.store import sync_state
from imeisync.store.bulk import parse_at
from imeisync.store.models import OutboxChange, SightingNotice

if TYPE_CHECKING:
    from imeisync.services.sync.service import SyncService


def status(sync: SyncService, rejected_limit: int) -> dict[str, Any]:
    now = sync.clock()
    outbox = OutboxChange.__table__
    with sync.db.read() as session:
        state = sync_state.read(session)
        depth = outbox_depth(session, OUTBOX_STATES)
        unconfirmed = session.execute(select(func.count()).select_from(outbox).where(
            outbox.c.state.in_(("accepted", "duplicate")),
            outbox.c.confirmed_at.is_(None))).scalar_one()
        rejected = [dict(r._mapping) for r in session.execute(
            select(outbox.c.change_id, outbox.c.order_id, outbox.c.action,
                   outbox.c.imei_key, outbox.c.result_code, outbox.c.last_error,
                   outbox.c.sent_at)
            .where(outbox.c.state == "rejected").order_by(outbox.c.id.desc())
            .limit(rejected_limit))]
        oldest_pending = oldest_unsent(session)
        disputes = {f"{d}_{s}": c for (d, s), c in dispute_counts(session).items()}
        overdue_lifts = overdue(session)
        notice = SightingNotice.__table__
        notices = {f"{d}_{s}": c for d, s, c in session.execute(
            select(notice.c.direction, notice.c.state, func.count())
            .group_by(notice.c.direction, notice.c.state))}
    steps = {}
    for step in sync_state.STEPS:
        last, error = state.step(step)
        age = (now - parse_at(last)).total_seconds() if last else None
        steps[step] = {"last_success": last, "age_seconds": round(age) if age is not None
                       else None, "last_error": error}
    for row in rejected:
        row["sent_at"] = rfc3339(row["sent_at"])
    return {
        "operator": sync.me,
        "cursor": state.cursor or 0,
        "registry_head": state.head,
        "outbox": depth,
        "unconfirmed": unconfirmed,
        "oldest_unsent_age_seconds": round((now - oldest_pending).total_seconds())
        if oldest_pending else None,
        "rejected": rejected,
        "steps": steps,
        "reconcile_last": state.json(sync_state.RECONCILE_RESULT),
        "reconcile_refused": state.json(sync_state.RECONCILE_REFUSED),
        "disputes": disputes,
        "overdue_lifts": overdue_lifts,
        "sighting_notices": notices,  # e.g. sent_pending, sent_rejected, received_received
    }
