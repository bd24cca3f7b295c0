"""What the on-call engineer watches, read from the database: the same figures on every node.

``OpsReader.read()`` gathers, in one read transaction of small indexed queries:

* outbox depth of the states that need attention (pending, sent, rejected) and the age of the
  oldest change not yet answered by the registry;
* orders by kind and outcome (counted incrementally by id: orders are never updated);
* open disputes by direction; the feed position, the registry's head and the lag between them;
* the last success and last error of push, pull and reconcile, a refused reconcile;
* the last audit-chain verification (``audit.last_verify``, written by the daemon's job).

The figures come from the database rather than from one process's counters, so every daemon
of a scaled-out set reports the same values, a restart loses nothing, and figures of jobs run
by the leader are visible on the followers too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from imeisync.domain.errors import ImeisyncError
from imeisync.domain.times import epoch_of, rfc3339
from imeisync.store import sync_state
from imeisync.store.db import Database
from imeisync.store.models import Dispute, Order, OutboxChange

ATTENTION_STATES = ("pending", "sent", "rejected")
OUTBOX_STATES = ("pending", "sent", "accepted", "duplicate", "rejected")


def outbox_depth(session: Session, states: Iterable[str]) -> dict[str, int]:
    """Outbox changes in each of ``states`` (one indexed count each: the outbox only grows)."""
    outbox = OutboxChange.__table__
    return {state: session.execute(select(func.count()).select_from(outbox).where(
        outbox.c.state == state)).scalar_one() for state in states}


def oldest_unsent(session: Session) -> datetime | None:
    """When the oldest change the registry has not answered yet was made (UTC)."""
    outbox = OutboxChange.__table__
    oldest: datetime | None = session.execute(select(func.min(outbox.c.at)).where(
        outbox.c.state.in_(("pending", "sent")))).scalar_one()
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    return oldest


def dispute_counts(session: Session) -> dict[tuple[str, str], int]:
    """Disputes by (direction, state)."""
    return {(direction, state): count for direction, state, count in session.execute(
        select(Dispute.direction, Dispute.state, func.count())
        .group_by(Dispute.direction, Dispute.state))}


@dataclass
class OpsFigures:
    at: float = 0.0
    database_reachable: bool = False
    database_error: str | None = None
    outbox: dict[str, int] = field(default_factory=dict)
    oldest_unsent_age: float | None = None
    orders: dict[tuple[str, str], int] = field(default_factory=dict)
    orders_max_id: int = 0
    disputes_open: dict[str, int] = field(default_factory=dict)
    cursor: int | None = None
    head: int | None = None
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    reconcile_refused: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None
    leader: dict[str, Any] | None = None
    overdue_lifts: int = 0  # our lifts not applied everywhere within [sync] receipt_deadline

    @property
    def feed_lag(self) -> int | None:
        if self.head is None:
            return None
        return max(0, self.head - (self.cursor or 0))

    def registry_reachable(self) -> bool | None:
        """Whether the last push and pull reached the registry (None: never tried)."""
        tried = [s for s in ("push", "pull") if self.steps.get(s, {}).get("last_success")
                 or self.steps.get(s, {}).get("last_error")]
        if not tried:
            return None
        return not any(self.steps[s].get("last_error") for s in tried)

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """The sync part of ``/healthz``."""
        now = now or time.time()
        steps = {}
        for step in sync_state.STEPS:
            info = self.steps.get(step, {})
            last = info.get("last_success")
            steps[step] = {
                "last_success": rfc3339(last),
                "age_seconds": round(now - last) if last else None,
                "last_error": info.get("last_error"),
            }
        return {
            "registry_reachable": self.registry_reachable(),
            "steps": steps,
            "feed": {"position": self.cursor, "registry_head": self.head,
                     "lag": self.feed_lag},
            "outbox": dict(self.outbox),
            "oldest_unsent_age_seconds": round(self.oldest_unsent_age)
            if self.oldest_unsent_age is not None else None,
            "reconcile_refused": self.reconcile_refused,
            "disputes_open": dict(self.disputes_open),
            "audit": self.audit,
            "figures_age_seconds": round(now - self.at, 1) if self.at else None,
        }


class OpsReader:
    """Reads ``OpsFigures``; keeps the order counts between reads (incremental by id)."""

    def __init__(self, db: Database):
        self.db = db
        self.figures = OpsFigures()

    def read(self) -> OpsFigures:
        previous = self.figures
        now = datetime.now(UTC)
        try:
            with self.db.read() as session:
                state = sync_state.read(session)
                depth = outbox_depth(session, ATTENTION_STATES)
                oldest = oldest_unsent(session)
                orders = dict(previous.orders)
                max_id = previous.orders_max_id
                for kind, outcome, count, top in session.execute(
                        select(Order.kind, Order.outcome, func.count(), func.max(Order.id))
                        .where(Order.id > max_id).group_by(Order.kind, Order.outcome)):
                    key = (kind or "unknown", outcome or "unknown")
                    orders[key] = orders.get(key, 0) + count
                    max_id = max(max_id, top or 0)
                disputes = dispute_counts(session)
        except ImeisyncError as exc:
            figures = OpsFigures(**{**previous.__dict__, "at": time.time(),
                                    "database_reachable": False,
                                    "database_error": exc.message})
            self.figures = figures
            return figures
        steps: dict[str, dict[str, Any]] = {}
        for step in sync_state.STEPS:
            last, error = state.step(step)
            steps[step] = {"last_success": epoch_of(last), "last_error": error}
        figures = OpsFigures(
            at=time.time(), database_reachable=True, outbox=depth,
            oldest_unsent_age=(now - oldest).total_seconds() if oldest else None,
            orders=orders, orders_max_id=max_id,
            disputes_open={"received": disputes.get(("received", "open"), 0),
                           "filed": disputes.get(("filed", "open"), 0)},
            cursor=state.cursor, head=state.head, steps=steps,
            reconcile_refused=state.json(sync_state.RECONCILE_REFUSED),
            audit=state.json(sync_state.AUDIT), leader=state.json(sync_state.LEADER),
            overdue_lifts=len(state.json(sync_state.OVERDUE) or []))
        self.figures = figures
        return figures


def daemon_view(db: Database, database_url: str) -> dict[str, Any]:
    """What ``imeisync sync status`` adds about the daemon: who leads the sync (if any daemon
    runs), the last audit-chain verification and retention purge."""
    from imeisync.adapters.leader import who_leads

    with db.read() as session:
        state = sync_state.read(session, (sync_state.AUDIT, sync_state.LEADER,
                                          sync_state.RETENTION_SUCCESS))
    return {"daemon": who_leads(database_url), "audit": state.json(sync_state.AUDIT),
            "retention_last_success": state.text(sync_state.RETENTION_SUCCESS),
            "last_elected": state.json(sync_state.LEADER)}
