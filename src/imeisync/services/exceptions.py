"""IMEI+IMSI exceptions: one subscriber allowed through a block of one IMEI.

Cloned IMEIs exist (one IMEI was found on 18,000 phones), so the legitimate user of a
duplicated IMEI must keep service while the stolen clones stay blocked. A liaison officer
registers, with a police case reference, that an IMSI may use a given IMEI; the attach check
then answers WHITELISTED for that ``supi`` only (``domain.verdict``).

Each add or remove is one serialised write: the exception row, a ``change_log`` row
(subject ``exception``, so every attach index picks it up) and an audit event. The audit
event names the exception by id, not by IMSI: the IMSI is personal data and stays in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from imeisync.domain.errors import Refused
from imeisync.domain.fields import CASE_REF, text
from imeisync.domain.fields import imsi as parse_imsi
from imeisync.domain.imei import Imei, parse_typed
from imeisync.domain.imei import format as format_imei
from imeisync.domain.verdict import Status
from imeisync.services import audit
from imeisync.services.devices import status_from_store
from imeisync.services.orders import Actor
from imeisync.store.db import Database
from imeisync.store.models import AttachException, ChangeLog


@dataclass(frozen=True)
class ExceptionView:
    id: int
    imei: str
    imei_key: str
    imsi: str
    case_ref: str
    created_at: datetime
    created_by: str
    removed_at: datetime | None = None
    removed_by: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        for name in ("created_at", "removed_at"):
            if data[name] is not None:
                data[name] = data[name].isoformat().replace("+00:00", "Z")
        return data


def _view(row: AttachException) -> ExceptionView:
    return ExceptionView(
        id=row.id, imei=format_imei(Imei(row.imei_key)),
        imei_key=row.imei_key, imsi=row.imsi, case_ref=row.case_ref, created_at=row.created_at,
        created_by=row.created_by, removed_at=row.removed_at, removed_by=row.removed_by,
    )


def _active(session: Session, key: str, imsi: str) -> AttachException | None:
    """The active exception of this IMSI for this IMEI key, if there is one."""
    return session.execute(select(AttachException).where(
        AttachException.imei_key == key, AttachException.imsi == imsi,
        AttachException.removed_at.is_(None))).scalar_one_or_none()


def add(db: Database, *, imei: str, imsi: str, case_ref: str, actor: Actor,
        clock: Any = None) -> tuple[ExceptionView, bool]:
    """Register an exception; returns it and whether the IMEI is blocked right now.

    Refused if the same IMSI already has an active exception for this IMEI.
    """
    key = parse_typed(imei).key
    imsi = parse_imsi(imsi)
    case_ref = text(case_ref, CASE_REF, code="case_ref")
    now = clock() if clock else datetime.now(UTC)
    with db.write() as session:
        existing = _active(session, key, imsi)
        if existing is not None:
            raise Refused(
                f"IMSI {imsi} already has an exception for IMEI {format_imei(Imei(key))} "
                f"(case {existing.case_ref}, since {existing.created_at:%Y-%m-%d %H:%M}Z)",
                "nothing to do; `imeisync exception list --imei IMEI` shows it",
                code="exception_exists",
            )
        new_id = session.execute(
            insert(AttachException).returning(AttachException.id).values(
                imei_key=key, imsi=imsi, case_ref=case_ref, created_at=now,
                created_by=actor.name,
            )
        ).scalar_one()
        session.execute(insert(ChangeLog).values(
            imei_key=key, subject="exception", op="open", kind=None, at=now))
        audit.append(session, [audit.Event(
            actor=actor.name, role=actor.role, action="exception.added", outcome="ok", at=now,
            imei_key=key, case_ref=case_ref,
            detail={"exception_id": new_id, "channel": actor.channel},
        )])
        blocked = status_from_store(session, key) is Status.BLACKLISTED
        row = session.get(AttachException, new_id)
        assert row is not None
        return _view(row), blocked


def remove(db: Database, *, imei: str, imsi: str, actor: Actor,
           clock: Any = None) -> ExceptionView:
    """End an active exception; refused clearly if there is none."""
    key = parse_typed(imei).key
    imsi = parse_imsi(imsi)
    now = clock() if clock else datetime.now(UTC)
    with db.write() as session:
        row = _active(session, key, imsi)
        if row is None:
            raise Refused(
                f"IMEI {format_imei(Imei(key))} has no active exception for IMSI {imsi}; "
                "nothing was removed",
                "check the IMEI and IMSI with `imeisync exception list --imei IMEI`",
                code="no_exception",
            )
        session.execute(
            update(AttachException).where(AttachException.id == row.id)
            .values(removed_at=now, removed_by=actor.name)
        )
        session.execute(insert(ChangeLog).values(
            imei_key=key, subject="exception", op="close", kind=None, at=now))
        audit.append(session, [audit.Event(
            actor=actor.name, role=actor.role, action="exception.removed", outcome="ok", at=now,
            imei_key=key, case_ref=row.case_ref,
            detail={"exception_id": row.id, "channel": actor.channel},
        )])
        session.refresh(row)
        return _view(row)


def list_(db: Database, *, imei: str | None = None,
          include_removed: bool = False) -> list[ExceptionView]:
    """Exceptions, oldest first; only active ones unless ``include_removed``."""
    query = select(AttachException).order_by(AttachException.created_at, AttachException.id)
    if imei is not None:
        query = query.where(AttachException.imei_key == parse_typed(imei).key)
    if not include_removed:
        query = query.where(AttachException.removed_at.is_(None))
    with db.read() as session:
        return [_view(row) for row in session.execute(query).scalars()]
