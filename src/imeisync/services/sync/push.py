"""Push: send the outbox to the registry in id order and mark each change with its answer.

Rows are marked ``sent`` (and counted) *before* the request, so a crash or a lost answer leaves
them ``sent`` and the next push sends them again — harmless, the registry is idempotent by
``change_id``. A ``rejected`` change is never sent again: it is logged, audited, counted in a
metric and listed by ``sync status``, because it means local and central state disagree.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter
from sqlalchemy import Table, bindparam, select, update

from imeisync.domain.errors import ImeisyncError
from imeisync.domain.ranges import wire_device
from imeisync.domain.times import rfc3339_micro
from imeisync.services import audit
from imeisync.services.sync.results import PushResult
from imeisync.store.models import OutboxChange

if TYPE_CHECKING:
    from imeisync.services.sync.service import SyncService

log = logging.getLogger(__package__)

MAX_BATCH = 1000
SYSTEM_ACTOR = "sync"

PUSH_RESULTS = Counter("imeisync_sync_push_changes", "Outbox changes answered by the registry",
                       ["result"])
REJECTED = Counter("imeisync_sync_rejected_changes",
                   "Outbox changes the registry rejected (local and central state disagree)",
                   ["code"])


def push(sync: SyncService, batch_size: int, max_batches: int | None) -> PushResult:
    """Send pending (and unanswered sent) outbox changes; mark each with its answer."""
    batch_size = max(1, min(batch_size, MAX_BATCH))
    result = PushResult()
    while max_batches is None or result.batches < max_batches:
        rows = _claim(sync, batch_size)
        if not rows:
            break
        result.batches += 1
        result.sent += len(rows)
        changes = [_wire_change(row) for row in rows]
        try:
            answers = sync.client.push(changes)
        except ImeisyncError as exc:
            note_failure(sync, OutboxChange.__table__, [row["id"] for row in rows], str(exc))
            raise
        _record(sync, rows, answers, result)
        if len(rows) < batch_size:
            break
    return result


def _claim(sync: SyncService, batch_size: int) -> list[dict[str, Any]]:
    outbox = OutboxChange.__table__
    return claim(sync, outbox, [outbox.c.id, outbox.c.change_id, outbox.c.order_id,
                                outbox.c.action, outbox.c.imei_key, outbox.c.kind,
                                outbox.c.reason, outbox.c.at, outbox.c.imei_key_last],
                 outbox.c.state.in_(("pending", "sent")), batch_size, sent_at=sync.clock())


def claim(sync: SyncService, table: Table, columns: list[Any], due: Any, batch_size: int,
          **marks: Any) -> list[dict[str, Any]]:
    """Up to ``batch_size`` rows that are ``due``, in id order, marked ``sent`` (attempts + 1,
    and ``marks``) in the same transaction that locked them: a crash or a lost answer after this
    leaves them ``sent``, and the next push sends them again."""
    with sync.db.write() as session:
        rows = [dict(r._mapping) for r in session.execute(
            select(*columns).where(due).order_by(table.c.id).limit(batch_size)
            .with_for_update())]
        if rows:
            session.execute(
                update(table).where(table.c.id == bindparam("b_id"))
                .values(state="sent", attempts=table.c.attempts + 1, **marks),
                [{"b_id": r["id"]} for r in rows])
    return rows


def note_failure(sync: SyncService, table: Table, ids: list[int], error: str) -> None:
    """Keep the failed request's error on its rows (best effort: the error itself is raised)."""
    with contextlib.suppress(ImeisyncError), sync.db.write() as session:
        session.execute(update(table).where(table.c.id == bindparam("b_id"))
                        .values(last_error=error[:1000]), [{"b_id": i} for i in ids])


def _record(sync: SyncService, rows: list[dict[str, Any]], answers: list[dict[str, Any]],
            result: PushResult) -> None:
    outbox = OutboxChange.__table__
    now = sync.clock()
    updates, events = [], []
    for row, answer in zip(rows, answers, strict=True):
        outcome = answer["result"]
        PUSH_RESULTS.labels(outcome).inc()
        code = answer.get("code") if outcome == "rejected" else None
        message = str(answer.get("message") or "")[:1000] if outcome == "rejected" else None
        updates.append({"b_id": row["id"], "b_state": outcome, "b_code": code,
                        "b_error": message})
        if outcome == "accepted":
            result.accepted += 1
        elif outcome == "duplicate":
            result.duplicate += 1
        else:
            result.rejected += 1
            REJECTED.labels(str(code)).inc()
            rejection = {"change_id": row["change_id"], "order_id": row["order_id"],
                         "action": row["action"], "imei_key": row["imei_key"],
                         "code": code, "message": message}
            result.rejections.append(rejection)
            log.error("registry rejected %s of IMEI key %s (order %s, change %s): %s %s — "
                      "local and central state disagree", row["action"], row["imei_key"],
                      row["order_id"], row["change_id"], code, message)
            events.append(audit.Event(
                actor=SYSTEM_ACTOR, role="system", action="sync.rejected",
                outcome="rejected", at=now, imei_key=row["imei_key"],
                detail={"change_id": row["change_id"], "order_id": row["order_id"],
                        "action": row["action"], "code": code, "message": message}))
    with sync.db.write() as session:
        # Only rows still "sent": a concurrent push or pull may have settled them already.
        session.execute(
            update(outbox).where(outbox.c.id == bindparam("b_id"), outbox.c.state == "sent")
            .values(state=bindparam("b_state"), result_code=bindparam("b_code"),
                    last_error=bindparam("b_error")), updates)
        audit.append(session, events)


def _wire_change(row: dict[str, Any]) -> dict[str, Any]:
    at = row["at"]
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    change = {"change_id": row["change_id"], "action": row["action"],
              **wire_device(row["imei_key"], row["imei_key_last"]),
              "reason": row["reason"], "at": rfc3339_micro(at)}
    if row["action"] == "insert":
        change["kind"] = row["kind"]
    return change
