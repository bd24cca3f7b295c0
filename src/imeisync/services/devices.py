"""What the store says about one device: its verdict, its records and their history.

``status_from_store`` answers the attach verdict straight from the database (for the CLI's
``check`` and for rebuilding the in-memory index); the attach-check server itself answers
from memory. Both use ``domain.verdict`` so the rule is written once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from imeisync.adapters.data_crypto import DataCipher
from imeisync.domain.errors import ImeisyncError
from imeisync.domain.imei import Imei
from imeisync.domain.imei import format as format_imei
from imeisync.domain.roles import Permission, allowed
from imeisync.domain.verdict import Status, verdict
from imeisync.services.tacs import device_names, table_size
from imeisync.store.models import AttachException, Record, SightingDisclosure
from imeisync.store.models import Order as OrderRow
from imeisync.store.ranges import covering


def status_from_store(session: Session, key: str, imsi: str | None = None,
                      unknown_tac: str = "ignore") -> Status:
    """The verdict from the store; ``unknown_tac`` (``[eir] unknown_tac``) as the attach index
    applies it: only with a TAC table loaded, only to a device with no record."""
    kinds = set(
        session.execute(
            select(Record.kind).where(covering(key), Record.closed_at.is_(None))
        ).scalars()
    )
    excepted = False
    if imsi and "block" in kinds:
        excepted = session.execute(
            select(AttachException.id).where(
                AttachException.imei_key == key,
                AttachException.imsi == imsi,
                AttachException.removed_at.is_(None),
            )
        ).first() is not None
    tac_unknown = (not kinds and unknown_tac != "ignore" and table_size(session) > 0
                   and key[:8] not in device_names(session, [key[:8]]))
    return verdict(blocked="block" in kinds, tracked="track" in kinds, excepted=excepted,
                   tac_unknown=tac_unknown, unknown_tac=unknown_tac)


@dataclass
class RecordView:
    id: int
    owner_id: str
    owner_country: str
    own: bool
    kind: str
    reason: str
    opened_at: datetime
    closed_at: datetime | None
    # a range record (a shipment) over the device: its first and last IMEI
    imei_first: str | None = None
    imei_last: str | None = None
    # own records only: case details (data minimisation for foreign ones)
    case_ref: str | None = None
    police_unit: str | None = None
    opened_by: str | None = None
    closed_by: str | None = None
    close_reason: str | None = None
    note: str | None = None
    orders: list[dict[str, Any]] = field(default_factory=list)
    # own records only: court-ordered disclosures of its sightings' subscribers (no IMSI)
    disclosures: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if v is not None or k == "closed_at"}
        for key in ("opened_at", "closed_at"):
            if data.get(key):
                data[key] = data[key].isoformat().replace("+00:00", "Z")
        return data


@dataclass
class DeviceView:
    imei: str
    imei_key: str
    status: Status
    records: list[RecordView]
    next_step: str
    device: str | None = None  # "Apple iPhone 15, TAC 35…" where the TAC table knows it

    def as_dict(self) -> dict[str, Any]:
        return {
            "imei": self.imei,
            "imei_key": self.imei_key,
            "device": self.device,
            "status": str(self.status),
            "records": [r.as_dict() for r in self.records],
            "next_step": self.next_step,
        }


def device_view(
    session: Session, imei: Imei, operator_id: str,
    cipher: Callable[[], DataCipher] | None = None,
    role: str | None = None,
) -> DeviceView:
    """The device as ``operator_id`` sees it. Foreign records carry only owner, country, kind,
    reason and dates; notes are decrypted only when ``cipher`` is given and ``role`` may read
    them (None: the local command line, run by liaison staff)."""
    key = imei.key
    if role is not None and not allowed(role, Permission.READ_NOTES):
        cipher = None
    records = session.execute(
        select(Record).where(covering(key)).order_by(Record.opened_at, Record.id)
    ).scalars().all()
    own_ids = [r.id for r in records if r.owner_id == operator_id]
    orders_by_record: dict[int, list[dict[str, Any]]] = {}
    if own_ids:
        for row in session.execute(
            select(OrderRow).where(OrderRow.record_id.in_(own_ids)).order_by(OrderRow.id)
        ).scalars():
            orders_by_record.setdefault(row.record_id or 0, []).append({
                "order_id": row.order_id, "kind": row.kind, "outcome": row.outcome,
                "case_ref": row.case_ref, "police_unit": row.police_unit,
                "reason": row.reason, "submitted_by": row.submitted_by,
                "signed_by": row.signed_kid,
                "received_at": row.received_at.isoformat().replace("+00:00", "Z"),
            })
    disclosed = [] if not own_ids else session.execute(select(SightingDisclosure).where(
        SightingDisclosure.imei_key == key).order_by(SightingDisclosure.id)).scalars().all()
    views = []
    for r in records:
        own = r.owner_id == operator_id
        view = RecordView(
            id=r.id, owner_id=r.owner_id, owner_country=r.owner_country, own=own, kind=r.kind,
            reason=r.reason, opened_at=r.opened_at, closed_at=r.closed_at,
        )
        if r.imei_key_last is not None:
            view.imei_first = format_imei(Imei(r.imei_key))
            view.imei_last = format_imei(Imei(r.imei_key_last))
        if own:
            view.case_ref, view.police_unit = r.case_ref, r.police_unit
            view.opened_by, view.closed_by = r.opened_by, r.closed_by
            view.close_reason = r.close_reason
            view.orders = orders_by_record.get(r.id, [])
            view.disclosures = [{
                "sighting_id": d.sighting_id, "court_order": d.court_order, "court": d.court,
                "disclosed_by": d.disclosed_by,
                "disclosed_at": d.disclosed_at.isoformat().replace("+00:00", "Z"),
            } for d in disclosed if d.case_ref == r.case_ref]
            if r.note_enc and cipher is not None:
                try:
                    view.note = cipher().decrypt(r.note_enc, context=f"order:{r.opened_by}")
                except ImeisyncError as exc:
                    view.note = f"(note cannot be decrypted: {exc.message})"
        views.append(view)
    status = status_from_store(session, key)
    return DeviceView(
        imei=format_imei(imei), imei_key=key, status=status, records=views,
        next_step=_next_step(views, operator_id),
        device=device_names(session, [key[:8]]).get(key[:8]),
    )


def _next_step(records: list[RecordView], me: str) -> str:
    open_records = [r for r in records if r.closed_at is None]
    own = [r for r in open_records if r.own]
    others = [r for r in open_records if not r.own]
    if not open_records:
        return ("No open record: the device is not blocked. To block it, submit a police "
                "order (`imeisync order submit` or `imeisync order block`).")
    steps = []
    if own:
        steps.append(f"{me} holds case {own[0].case_ref}: only a police-signed lift order "
                     "can remove it (`imeisync order submit LIFT.jws`).")
    if others:
        owners = ", ".join(dict.fromkeys(f"{r.owner_id} ({r.owner_country})" for r in others))
        steps.append(f"Blocked by {owners}: only that operator can remove its record, at the "
                     "request of the police; file a dispute so it reviews the record.")
    return " ".join(steps)
