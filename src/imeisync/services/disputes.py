"""Disputes: asking the owner of a record to review it, and answering such requests.

Only the operator that reported a device may remove its record (DOMAIN.md). When another
operator's record is wrong — the police say so, with a case reference — liaison staff *file a
dispute*: the registry delivers it to the owner in its feed; the owner's staff see it
(``imeisync dispute list``), ask the police for a lift order if it is justified, and the
accepted removal answers the dispute ``lifted`` by itself; or they answer it ``upheld`` with a
reason. The answer travels back to the filer the same way.

Filing and answering are synchronous calls to the registry (nothing is recorded locally unless
the registry accepted it: the person hears at once if it did not). Incoming disputes and
answers arrive with ``sync pull`` (``services.sync``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update

from imeisync.adapters.registry_client import RegistryClient
from imeisync.domain.errors import BadInput, NotFound, Refused
from imeisync.domain.fields import CASE_REF, REASON, text
from imeisync.domain.imei import Imei, parse_typed
from imeisync.domain.imei import format as format_imei
from imeisync.domain.times import rfc3339
from imeisync.services import audit
from imeisync.services.orders import Actor
from imeisync.store.db import Database
from imeisync.store.models import Dispute, Record
from imeisync.store.ranges import covering


def received(db: Database, dispute_id: str, hint: str) -> Dispute:
    """The dispute another operator filed about one of our records, or NotFound."""
    with db.read() as session:
        row = session.execute(select(Dispute).where(Dispute.dispute_id == dispute_id)
                              ).scalar_one_or_none()
    if row is None or row.direction != "received":
        raise NotFound(f"no dispute {dispute_id[:90]} about our records", hint,
                       code="no_dispute")
    return row


def _view(row: Any) -> dict[str, Any]:
    return {"dispute_id": row.dispute_id, "direction": row.direction,
            "imei_key": row.imei_key, "owner": row.owner_id, "owner_country": row.owner_country,
            "filer": row.filer_id, "filer_country": row.filer_country,
            "case_ref": row.case_ref, "reason": row.reason, "filed_at": rfc3339(row.filed_at),
            "filed_by": row.filed_by, "state": row.state, "answer_reason": row.answer_reason,
            "answered_at": rfc3339(row.answered_at), "answered_by": row.answered_by}


class Disputes:
    def __init__(self, db: Database, client: Callable[[], RegistryClient], *, operator_id: str,
                 operator_country: str,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.db = db
        self._client = client
        self.me = operator_id
        self.country = operator_country
        self.clock = clock

    def file(self, imei: str, case_ref: str, reason: str, actor: Actor,
             owner: str | None = None) -> dict[str, Any]:
        """Ask the owner of the open record of ``imei`` to review it (police case ``case_ref``)."""
        device = parse_typed(imei)
        case_ref = text(case_ref, CASE_REF)
        reason = text(reason, REASON)
        shown = format_imei(device)
        with self.db.read() as session:
            # A range over the device counts: the dispute then names the range's record
            # (its first key), which is what the owner lifts.
            holders = list(session.execute(
                select(Record.owner_id, Record.owner_country, Record.imei_key).where(
                    covering(device.key), Record.closed_at.is_(None))).all())
        others = sorted({h.owner_id for h in holders if h.owner_id != self.me})
        if owner is None:
            if not others:
                mine = any(h.owner_id == self.me for h in holders)
                raise Refused(
                    f"IMEI {shown} is blocked only by {self.me} (us)" if mine else
                    f"IMEI {shown} has no open record here; there is nothing to dispute",
                    "lift our own record with a police order instead" if mine else
                    "run `imeisync sync pull` first if another operator blocked it just now",
                    code="nothing_to_dispute")
            if len(others) > 1:
                raise BadInput(f"IMEI {shown} is blocked by {', '.join(others)}",
                               "name the operator whose record is wrong with --owner")
            owner = others[0]
        elif owner == self.me:
            raise Refused("that is our own record: lift it with a police order instead",
                          code="own_record")
        elif owner not in others:
            raise Refused(f"{owner} has no open record of IMEI {shown} here",
                          f"operators holding one: {', '.join(others) or 'none'}",
                          code="nothing_to_dispute")
        record_key = next(h.imei_key for h in holders if h.owner_id == owner)
        dispute_id = f"{self.me}:{uuid.uuid4().hex}"
        client = self._client()
        try:
            answer = client.file_dispute({"dispute_id": dispute_id, "imei": record_key,
                                          "owner": owner, "case_ref": case_ref,
                                          "reason": reason})
        finally:
            client.close()
        now = self.clock()
        with self.db.write() as session:
            session.execute(insert(Dispute).values(
                dispute_id=dispute_id, direction="filed", imei_key=record_key,
                filer_id=self.me, filer_country=self.country, owner_id=owner,
                owner_country=str(answer.get("owner_country") or "??")[:2],
                case_ref=case_ref, reason=reason, filed_at=now, filed_by=actor.name,
                state="open", registry_seq=answer.get("seq")))
            audit.append(session, [audit.Event(
                actor=actor.name, role=actor.role, action="dispute.filed", outcome="open",
                at=now, imei_key=record_key, case_ref=case_ref,
                detail={"dispute_id": dispute_id, "owner": owner})])
            row = session.execute(select(Dispute).where(Dispute.dispute_id == dispute_id)
                                  ).scalar_one()
            return _view(row)

    def answer(self, dispute_id: str, answer: str, reason: str, actor: Actor) -> dict[str, Any]:
        """Answer a dispute about one of our records: ``upheld`` (with the reason) or
        ``lifted`` (after the police-ordered lift was pushed; usually automatic)."""
        if answer not in ("upheld", "lifted"):
            raise BadInput("the answer is upheld or lifted", field="answer")
        reason = text(reason, REASON)
        row = received(self.db, dispute_id, "see `imeisync dispute list`")
        if row.state != "open":
            raise Refused(f"dispute {dispute_id} is already {row.state}", code="answered")
        client = self._client()
        try:
            client.answer_dispute(dispute_id, answer, reason)
        finally:
            client.close()
        now = self.clock()
        with self.db.write() as session:
            session.execute(update(Dispute).where(Dispute.dispute_id == dispute_id).values(
                state=answer, answer_reason=reason, answered_at=now, answered_by=actor.name))
            audit.append(session, [audit.Event(
                actor=actor.name, role=actor.role, action="dispute.answered", outcome=answer,
                at=now, imei_key=row.imei_key, detail={"dispute_id": dispute_id})])
            updated = session.execute(select(Dispute).where(Dispute.dispute_id == dispute_id)
                                      ).scalar_one()
            return _view(updated)

    def list(self, *, direction: str | None = None, state: str | None = None,
             imei_key: str | None = None) -> list[dict[str, Any]]:
        query = select(Dispute).order_by(Dispute.filed_at.desc(), Dispute.id.desc())
        if direction:
            query = query.where(Dispute.direction == direction)
        if state:
            query = query.where(Dispute.state == state)
        if imei_key:
            query = query.where(Dispute.imei_key == imei_key)
        with self.db.read() as session:
            return [_view(r) for r in session.execute(query.limit(1000)).scalars()]


def enrich_disputes(db: Database, me: str, rows: list[dict[str, Any]]) -> None:
    """Add to dispute views (``Disputes.list``) the formatted IMEI, the next step in plain
    words and, for disputes about our records (``me``), whether we still hold the record (a
    lift accepted here answers the dispute once it reaches the registry)."""
    keys = sorted({d["imei_key"] for d in rows})
    holding: set[tuple[str, str]] = set()  # (imei_key, owner) of open records here
    if keys:
        with db.read() as session:
            for start in range(0, len(keys), 500):
                holding.update((k, o) for k, o in session.execute(
                    select(Record.imei_key, Record.owner_id).where(
                        Record.imei_key.in_(keys[start:start + 500]),
                        Record.closed_at.is_(None))))
    for d in rows:
        d["imei"] = format_imei(Imei(d["imei_key"]))
        if d["direction"] == "received":
            d["we_hold_record"] = (d["imei_key"], me) in holding
            if d["state"] == "open" and not d["we_hold_record"]:
                d["next_step"] = ("Our record is lifted; the answer “lifted” reaches the "
                                  "registry with the next sync.")
            elif d["state"] == "open":
                d["next_step"] = ("Ask the police whether the block is right. If not, "
                                  "submit their signed lift order; if it is, answer "
                                  "“upheld” with the reason.")
            else:
                d["next_step"] = f"Answered {d['state']}; nothing to do."
        elif d["state"] == "open":
            d["next_step"] = (f"Waiting for {d['owner']} to answer; it comes with the next "
                              "sync.")
        elif d["state"] == "upheld":
            d["next_step"] = (f"{d['owner']} upheld its block: the device stays blocked. "
                              "Only the police can take it further with that operator.")
        elif (d["imei_key"], d["owner"]) in holding:
            d["next_step"] = (f"{d['owner']} lifted its record; the device is unblocked "
                              "here with our next sync.")
        else:
            d["next_step"] = f"{d['owner']} lifted its record: it no longer blocks the device."
