"""``sync_state``: the small named values the sync and the daemon's jobs keep (the feed
position, each step's last success and last error, a refused reconcile, the last audit-chain
verification, who was elected leader). Their names live here, and this is the one place that
reads and writes the table: ``read`` for every view of them, ``put`` and ``drop`` for every
change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from imeisync.store.db import Database, rowcount
from imeisync.store.models import SyncState

CURSOR = "feed.cursor"  # the registry feed position applied up to
HEAD = "feed.head"  # the registry's newest position, as last seen
STEPS = ("push", "pull", "reconcile", "sightings")  # sightings: the notices' push
RECONCILE_RESULT = "reconcile.last_result"
RECONCILE_REFUSED = "reconcile.refused"  # the shrink guard's refusal, until a reconcile passes
AUDIT = "audit.last_verify"  # the daemon's last audit-chain verification
LEADER = "daemon.leader"  # the last daemon elected to run the sync
ACKED = "feed.acked"  # the feed position last acknowledged to the registry as applied
MEMBERS = "registry.members"  # the registry's signed member directory (a JWS), as last fetched
OVERDUE = "receipts.overdue"  # JSON list of our lifts not applied everywhere by the deadline
_SUCCESS, _ERROR = ".last_success", ".last_error"


def last_success(step: str) -> str:
    """The name of a step's (or a job's) last success: an RFC 3339 time."""
    return step + _SUCCESS


def last_error(step: str) -> str:
    """The name of a step's last error: JSON ``{"at", "error", "code"}``."""
    return step + _ERROR


RETENTION_SUCCESS = last_success("retention")


@dataclass(frozen=True)
class State:
    """What ``read`` found, with the parsing each value needs."""

    values: Mapping[str, str]

    def text(self, name: str) -> str | None:
        return self.values.get(name)

    def number(self, name: str) -> int | None:
        value = self.values.get(name)
        return int(value) if value is not None else None

    def json(self, name: str) -> Any:
        """The JSON value stored under ``name``; a value that is not JSON is shown raw."""
        value = self.values.get(name)
        if not value:
            return None
        try:
            return json.loads(value)
        except ValueError:
            return {"raw": value[:200]}

    @property
    def cursor(self) -> int | None:
        return self.number(CURSOR)

    @property
    def head(self) -> int | None:
        return self.number(HEAD)

    def step(self, step: str) -> tuple[str | None, Any]:
        """A step's last success (RFC 3339 text) and last error (its JSON)."""
        return self.text(last_success(step)), self.json(last_error(step))

    def outcomes(self) -> dict[str, str]:
        """Every step's and job's last success and last error, as stored."""
        return {k: v for k, v in self.values.items() if k.endswith((_SUCCESS, _ERROR))}


def read(session: Session, names: Iterable[str] | None = None) -> State:
    """The named values (all of them when ``names`` is None), in the session's transaction."""
    query = select(SyncState.name, SyncState.value)
    if names is not None:
        query = query.where(SyncState.name.in_(tuple(names)))
    return State({name: value for name, value in session.execute(query)})


def put(session: Session, name: str, value: str, now: datetime) -> None:
    """Set ``name`` to ``value`` (insert or update) in the session's transaction."""
    table = SyncState.__table__
    if not rowcount(session.execute(update(table).where(table.c.name == name)
                                    .values(value=value, updated_at=now))):
        session.execute(insert(table).values(name=name, value=value, updated_at=now))


def save(db: Database, name: str, value: str) -> None:
    """``put`` in its own short write (the daemon's jobs record their runs this way)."""
    with db.write() as session:
        put(session, name, value, datetime.now(UTC))


def drop(session: Session, name: str) -> None:
    session.execute(delete(SyncState.__table__).where(SyncState.__table__.c.name == name))
