"""Storage limitation (GDPR Art. 5(1)(e)): forget the free texts of closed cases.

Free text typed by people may carry personal data: a record's note (``records.note_enc``,
AES-GCM) and the texts of a dispute (``disputes.reason``, ``answer_reason``). They are kept
while the case is open and for ``[security] retention_days`` after it closed, then removed:

* the note of a record closed before the cut-off is set to NULL;
* the texts of a dispute answered (lifted or upheld) before the cut-off are replaced by
  ``[purged]`` (the reason column is required) and the answer's reason set to NULL.

The record, the dispute, their history and the audit trail stay: they hold no personal data and
are the evidence of what the operator did.

Purpose limitation (GDPR Art. 5(1)(b)) for other operators' records: a foreign record closed
more than ``[security] foreign_retention_days`` ago (default 30) serves no attach check any
more, so it is deleted, with the lift notices applied to it. Our own records are never deleted
here (they are the evidence of our orders), nor a foreign record still named by an order, an
outbox change or a lift notice that still awaits the registry's remove (reconcile reads those).
``change_log`` rows stay: the attach index follows them and ties its file to them, and they
carry no owner. Open records are never touched, so the attach check sees no change.

Each batch is one write transaction with an audit event saying how many texts or records were
purged, the cut-off and the id range touched, so an auditor can see that the rule ran and what
it touched. The daemon's leader runs this once a day.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, select, update

from imeisync.domain.times import rfc3339
from imeisync.services import audit
from imeisync.store.db import Database
from imeisync.store.models import Dispute, LiftNotice, OutboxChange, Record
from imeisync.store.models import Order as OrderRow

BATCH = 1000
ACTOR = "retention"
PURGED = "[purged]"


@dataclass
class PurgeResult:
    notes: int = 0
    dispute_texts: int = 0
    cutoff: str = ""
    foreign_records: int = 0
    foreign_cutoff: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def total(self) -> int:
        return self.notes + self.dispute_texts + self.foreign_records

    def describe(self) -> str:
        day = self.cutoff[:10]
        foreign = (f"; deleted {self.foreign_records} foreign record(s) closed before "
                   f"{self.foreign_cutoff[:10]}" if self.foreign_cutoff else "")
        if not self.notes + self.dispute_texts:
            return f"retention: nothing closed before {day} left to purge{foreign}"
        return (f"retention: purged the notes of {self.notes} record(s) and the texts of "
                f"{self.dispute_texts} dispute(s) closed before {day}{foreign}")


def purge(db: Database, retention_days: int, *, foreign_days: int | None = None,
          me: str | None = None, now: datetime | None = None,
          batch: int = BATCH) -> PurgeResult:
    """Remove the free texts of cases closed more than ``retention_days`` ago and, with
    ``foreign_days`` and ``me`` (our operator id), the records of other operators closed more
    than ``foreign_days`` ago."""
    if retention_days < 1 or (foreign_days is not None and foreign_days < 1):
        raise ValueError("retention days must be at least 1")
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=retention_days)
    result = PurgeResult(cutoff=rfc3339(cutoff))
    records = Record.__table__
    disputes = Dispute.__table__
    result.notes = _in_batches(
        db, batch, now, result, "notes",
        select(records.c.id).where(records.c.closed_at.is_not(None),
                                   records.c.closed_at < cutoff,
                                   records.c.note_enc.is_not(None)).order_by(records.c.id),
        lambda ids: update(records).where(records.c.id.in_(ids)).values(note_enc=None),
        "first_record_id", "last_record_id")
    result.dispute_texts = _in_batches(
        db, batch, now, result, "dispute_texts",
        select(disputes.c.id).where(disputes.c.state.in_(("lifted", "upheld")),
                                    disputes.c.answered_at.is_not(None),
                                    disputes.c.answered_at < cutoff,
                                    disputes.c.reason != PURGED).order_by(disputes.c.id),
        lambda ids: update(disputes).where(disputes.c.id.in_(ids)).values(
            reason=PURGED, answer_reason=None),
        "first_dispute_id", "last_dispute_id")
    if foreign_days is not None and me is not None:
        foreign_cutoff = now - timedelta(days=foreign_days)
        result.foreign_cutoff = rfc3339(foreign_cutoff)
        result.foreign_records = _in_batches(
            db, batch, now, result, "foreign_records", _closed_foreign(me, foreign_cutoff),
            lambda ids: (delete(LiftNotice.__table__).where(
                             LiftNotice.__table__.c.record_id.in_(ids)),
                         delete(records).where(records.c.id.in_(ids))),
            "first_record_id", "last_record_id", result.foreign_cutoff)
    return result


def _closed_foreign(me: str, cutoff: datetime) -> Any:
    """Ids of other operators' records closed before ``cutoff`` that nothing still needs."""
    records = Record.__table__
    notices = LiftNotice.__table__
    named_by = [exists().where(OrderRow.__table__.c.record_id == records.c.id),
                exists().where(OutboxChange.__table__.c.record_id == records.c.id),
                exists().where(notices.c.record_id == records.c.id,
                               notices.c.confirmed_at.is_(None))]
    return (select(records.c.id)
            .where(records.c.source == "registry", records.c.owner_id != me,
                   records.c.closed_at.is_not(None), records.c.closed_at < cutoff,
                   *(~e for e in named_by))
            .order_by(records.c.id))


def _in_batches(db: Database, batch: int, now: datetime, result: PurgeResult, what: str,
                query: Any, purge_ids: Any, first: str, last: str,
                cutoff: str | None = None) -> int:
    """``purge_ids(ids)``: one statement, or a tuple run in order, per batch of ids.
    ``query`` selects ids in order; each batch starts after the last one, so a long purge
    reads the table once rather than once per batch."""
    done = 0
    column = query.selected_columns[0]
    after = 0
    while True:
        with db.write() as session:
            ids = list(session.execute(query.where(column > after).limit(batch)).scalars())
            if not ids:
                break
            statements = purge_ids(ids)
            for statement in statements if isinstance(statements, tuple) else (statements,):
                session.execute(statement)
            audit.append(session, [audit.Event(
                actor=ACTOR, role="system", action="retention.purged", outcome="ok", at=now,
                detail={what: len(ids), "closed_before": cutoff or result.cutoff,
                        first: ids[0], last: ids[-1]})])
        done += len(ids)
        after = ids[-1]
        if len(ids) < batch:
            break
    return done
