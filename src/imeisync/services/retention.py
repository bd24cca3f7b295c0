"""Storage limitation (GDPR Art. 5(1)(e)): forget the free texts of closed cases.

Free text typed by people may carry personal data: a record's note (``records.note_enc``,
AES-GCM) and the texts of a dispute (``disputes.reason``, ``answer_reason``). They are kept
while the case is open and for ``[security] retention_days`` after it closed, then removed:

* the note of a record closed before the cut-off is set to NULL;
* the texts of a dispute answered (lifted or upheld) before the cut-off are replaced by
  ``[purged]`` (the reason column is required) and the answer's reason set to NULL.

The record, the dispute, their history and the audit trail stay: they hold no personal data and
are the evidence of what the operator did. Each batch is one write transaction with an audit
event saying how many texts were purged, the cut-off and the id range touched, so an auditor
can see that the rule ran and what it touched. The daemon's leader runs this once a day.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from imeisync.domain.times import rfc3339
from imeisync.services import audit
from imeisync.store.db import Database
from imeisync.store.models import Dispute, Record

BATCH = 1000
ACTOR = "retention"
PURGED = "[purged]"


@dataclass
class PurgeResult:
    notes: int = 0
    dispute_texts: int = 0
    cutoff: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def total(self) -> int:
        return self.notes + self.dispute_texts

    def describe(self) -> str:
        day = self.cutoff[:10]
        if not self.total:
            return f"retention: nothing closed before {day} left to purge"
        return (f"retention: purged the notes of {self.notes} record(s) and the texts of "
                f"{self.dispute_texts} dispute(s) closed before {day}")


def purge(db: Database, retention_days: int, *, now: datetime | None = None,
          batch: int = BATCH) -> PurgeResult:
    """Remove the free texts of cases closed more than ``retention_days`` ago."""
    if retention_days < 1:
        raise ValueError("retention_days must be at least 1")
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
    return result


def _in_batches(db: Database, batch: int, now: datetime, result: PurgeResult, what: str,
                query: Any, purge_ids: Any, first: str, last: str) -> int:
    done = 0
    while True:
        with db.write() as session:
            ids = list(session.execute(query.limit(batch)).scalars())
            if not ids:
                break
            session.execute(purge_ids(ids))
            audit.append(session, [audit.Event(
                actor=ACTOR, role="system", action="retention.purged", outcome="ok", at=now,
                detail={what: len(ids), "closed_before": result.cutoff, first: ids[0],
                        last: ids[-1]})])
        done += len(ids)
        if len(ids) < batch:
            break
    return done
