"""The audit trail: append-only events, each holding the hash of the one before.

``append`` runs inside the caller's write transaction (serialised, see store/db.py), so an
event is written with the change it describes or not at all. ``verify`` walks the chain and
names the first event that was edited, deleted, inserted or reordered.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from imeisync.domain.times import audit_hash_time
from imeisync.store.models import AuditEvent, AuditHead

GENESIS = "0" * 64


@dataclass(frozen=True)
class Event:
    actor: str
    role: str
    action: str  # e.g. order.accepted, order.refused, record.closed, exception.added
    outcome: str  # accepted | linked | refused | ok | …
    at: datetime
    imei_key: str | None = None
    case_ref: str | None = None
    detail: Mapping[str, Any] | None = None


# The fields an event's hash covers (with its id and the previous hash), in one place.
_HASHED = ("at", "actor", "role", "action", "imei_key", "case_ref", "outcome", "detail")


def _canonical(event_id: int, event: Mapping[str, Any]) -> bytes:
    body = {name: event[name] for name in _HASHED}
    body["id"] = event_id
    body["at"] = audit_hash_time(event["at"])
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _hash(prev_hash: str, event_id: int, event: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + _canonical(event_id, event)).hexdigest()


def append(session: Session, events: Iterable[Event]) -> int:
    """Append events to the chain in the current (write) transaction; returns how many."""
    head = session.execute(select(AuditHead).where(AuditHead.id == 1)).scalar_one_or_none()
    last_id, last_hash = (head.last_id, head.last_hash) if head else (0, GENESIS)
    rows = []
    for event in events:
        last_id += 1
        row = {
            "id": last_id,
            "at": event.at,
            "actor": event.actor,
            "role": event.role,
            "action": event.action,
            "imei_key": event.imei_key,
            "case_ref": event.case_ref,
            "outcome": event.outcome,
            "detail": json.dumps(dict(event.detail or {}), sort_keys=True, ensure_ascii=False),
        }
        row["prev_hash"] = last_hash
        last_hash = row["hash"] = _hash(last_hash, last_id, row)
        rows.append(row)
    if not rows:
        return 0
    session.execute(insert(AuditEvent), rows)
    if head:
        session.execute(
            update(AuditHead).where(AuditHead.id == 1).values(last_id=last_id, last_hash=last_hash)
        )
    else:
        session.execute(insert(AuditHead).values(id=1, last_id=last_id, last_hash=last_hash))
    return len(rows)


@dataclass(frozen=True)
class Verification:
    ok: bool
    events: int
    broken_id: int | None = None
    problem: str | None = None

    def describe(self) -> str:
        if self.ok:
            return f"audit trail intact: {self.events} events, hash chain verified"
        return f"audit trail broken at event {self.broken_id}: {self.problem}"


def verify(session: Session, *, batch: int = 5000) -> Verification:
    """Walk the chain in id order; stop at the first event that does not fit."""
    expected_prev = GENESIS
    expected_id = 1
    count = 0
    result = session.execute(select(AuditEvent).order_by(AuditEvent.id)).yield_per(batch)
    for event in result.scalars():
        row = {name: getattr(event, name) for name in _HASHED}
        if event.id != expected_id:
            return Verification(
                False, count, event.id,
                f"expected event {expected_id} here: "
                f"{'events before it were deleted' if event.id > expected_id else 'ids reordered'}",
            )
        if event.prev_hash != expected_prev:
            return Verification(
                False, count, event.id,
                "it does not follow the event before it (an event was deleted, inserted "
                "or reordered)",
            )
        if _hash(event.prev_hash, event.id, row) != event.hash:
            return Verification(False, count, event.id, "its content was changed after writing")
        expected_prev = event.hash
        expected_id += 1
        count += 1
    head = session.execute(select(AuditHead).where(AuditHead.id == 1)).scalar_one_or_none()
    if head is None and count:
        return Verification(False, count, count, "the chain's head record is missing")
    if head is not None and (head.last_id != count or head.last_hash != expected_prev):
        missing_from = count + 1
        return Verification(
            False, count, missing_from,
            f"the chain should end at event {head.last_id}; events from {missing_from} on "
            "were deleted",
        )
    return Verification(True, count)
