"""The registry's disputes: an operator asks the owner of a record to review it, and the owner
answers ``upheld`` (with a reason) or ``lifted`` (its record removed). Each step is a feed entry
for the other side; ``Registry`` (registry/service.py) delegates here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import insert, select, update

from imeisync.domain import fields
from imeisync.domain.errors import BadInput, Conflict, NotAllowed, NotFound, Refused
from imeisync.domain.imei import is_key
from imeisync.registry import canaries
from imeisync.registry.codes import NO_RECORD, NOT_OWNER
from imeisync.registry.config import Member
from imeisync.registry.models import FeedEntry, RegistryDispute, RegistryRecord
from imeisync.store.db import Database

log = logging.getLogger("imeisync.registry")

_DISPUTE_FIELDS = {"dispute_id", "imei", "owner", "case_ref", "reason"}


def file_dispute(db: Database, members: Callable[[str], Member | None], now: Callable[[], str],
                 member: Member, body: Any) -> tuple[int, dict[str, Any]]:
    """File a dispute against another operator's open record; (201|200, dispute)."""
    fields = dispute_fields(body)
    owner = members(fields["owner"])
    if owner is None:
        raise Refused(f"operator {fields['owner'][:64]!r} is not a member of this registry",
                      code="unknown_owner")
    if owner.id == member.id:
        raise Refused("a dispute asks another operator to review its record; this record "
                      "is yours: lift it with a police order instead", code="own_record")
    at = now()
    with db.write() as session:
        conn = session.connection()
        existing = conn.execute(select(RegistryDispute).where(
            RegistryDispute.dispute_id == fields["dispute_id"])).first()
        if existing is not None:
            same = (existing.filer_id == member.id and existing.imei_key == fields["imei"]
                    and existing.owner_id == owner.id
                    and existing.case_ref == fields["case_ref"]
                    and existing.reason == fields["reason"])
            if not same:
                raise Conflict(f"dispute_id {fields['dispute_id']} is already used for "
                               "another dispute", code="conflict")
            return 200, dispute_view(existing)
        record = conn.execute(select(RegistryRecord.id).where(
            RegistryRecord.imei_key == fields["imei"], RegistryRecord.owner_id == owner.id,
            RegistryRecord.closed_seq.is_(None))).first()
        audience: str | None = owner.id
        if record is None:
            canary = canaries.find(conn, fields["imei"])
            if canary is None or canary.owner_id != owner.id:
                raise Refused(f"{owner.id} has no open record for IMEI key {fields['imei']}; "
                              "there is nothing to dispute", code=NO_RECORD)
            # Filed like any dispute (the filer learns nothing) but never delivered: the
            # claimed owner has no such record. Someone is asking about a canary.
            audience = None
            log.warning("canary: %s disputes IMEI key %s, a canary planted for %s",
                        member.id, fields["imei"], canary.recipient_id)
        seq = conn.execute(insert(FeedEntry).returning(FeedEntry.seq).values(
            type="dispute", imei_key=fields["imei"], owner_id=owner.id,
            owner_country=owner.country, at=at, received_at=at, audience=audience,
            dispute_id=fields["dispute_id"])).scalar_one()
        row = {"dispute_id": fields["dispute_id"], "imei_key": fields["imei"],
               "filer_id": member.id, "filer_country": member.country,
               "owner_id": owner.id, "owner_country": owner.country,
               "case_ref": fields["case_ref"], "reason": fields["reason"],
               "filed_at": at, "filed_seq": seq, "state": "open"}
        conn.execute(insert(RegistryDispute).values(**row))
        created = conn.execute(select(RegistryDispute).where(
            RegistryDispute.dispute_id == fields["dispute_id"])).one()
    return 201, dispute_view(created)

def answer_dispute(db: Database, now: Callable[[], str], member: Member, dispute_id: str,
                   body: Any) -> dict[str, Any]:
    """The owner's answer: ``lifted`` (its record is removed) or ``upheld`` with a reason."""
    if not isinstance(body, dict) or set(body) - {"answer", "reason"}:
        raise BadInput("an answer is {\"answer\": \"upheld\"|\"lifted\", \"reason\": TEXT}",
                       code="malformed")
    answer, reason = body.get("answer"), body.get("reason")
    if answer not in ("upheld", "lifted"):
        raise BadInput("answer must be upheld or lifted", code="malformed")
    reason = fields.text(reason, fields.REASON)
    at = now()
    with db.write() as session:
        conn = session.connection()
        dispute = conn.execute(select(RegistryDispute).where(
            RegistryDispute.dispute_id == dispute_id)).first()
        if dispute is None or member.id not in (dispute.owner_id, dispute.filer_id):
            raise NotFound(f"no such dispute {dispute_id}",
                           "use the dispute id of the feed entry that brought it",
                           code="no_dispute")
        if dispute.owner_id != member.id:
            raise NotAllowed(f"only the record's owner {dispute.owner_id} answers this dispute",
                             code=NOT_OWNER)
        if dispute.state != "open":
            if dispute.state == answer:
                return dispute_view(dispute)
            raise Conflict(f"dispute {dispute_id} was already answered: {dispute.state}",
                           code="conflict")
        if answer == "lifted":
            still_open = conn.execute(select(RegistryRecord.id).where(
                RegistryRecord.imei_key == dispute.imei_key,
                RegistryRecord.owner_id == member.id,
                RegistryRecord.closed_seq.is_(None))).first()
            if still_open is not None:
                raise Conflict("the record is still open; push the police-ordered remove "
                               "first (the dispute is then answered lifted by itself)",
                               code="conflict")
        seq = conn.execute(insert(FeedEntry).returning(FeedEntry.seq).values(
            type="dispute_answer", imei_key=dispute.imei_key, owner_id=member.id,
            owner_country=member.country, reason=answer, at=at, received_at=at,
            audience=dispute.filer_id, dispute_id=dispute_id)).scalar_one()
        conn.execute(update(RegistryDispute).where(
            RegistryDispute.dispute_id == dispute_id).values(
            state=answer, answer_reason=reason, answered_at=at, answer_seq=seq))
        answered = conn.execute(select(RegistryDispute).where(
            RegistryDispute.dispute_id == dispute_id)).one()
    return dispute_view(answered)


def dispute_fields(body: Any) -> dict[str, str]:
    if not isinstance(body, dict):
        raise BadInput("a dispute is a JSON object", code="malformed")
    unknown = sorted(set(body) - _DISPUTE_FIELDS)
    missing = sorted(_DISPUTE_FIELDS - set(body))
    if unknown or missing:
        raise BadInput(f"a dispute has exactly {', '.join(sorted(_DISPUTE_FIELDS))}"
                       + (f"; unknown: {', '.join(u[:32] for u in unknown[:5])}" if unknown else "")
                       + (f"; missing: {', '.join(missing)}" if missing else ""),
                       code="malformed")
    dispute_id = body["dispute_id"]
    if not isinstance(dispute_id, str) or not fields.REFERENCE_ID.fullmatch(dispute_id):
        raise BadInput("dispute_id must be 1-80 letters, digits and . _ : / -", code="malformed")
    if not is_key(body["imei"]):
        raise BadInput("imei must be the 14-digit key (TAC + serial)", code="malformed")
    return {**body, "owner": fields.operator_id(body["owner"]),
            "case_ref": fields.text(body["case_ref"], fields.CASE_REF),
            "reason": fields.text(body["reason"], fields.REASON)}


def dispute_view(d: Any) -> dict[str, Any]:
    return {"dispute_id": d.dispute_id, "imei": d.imei_key, "owner": d.owner_id,
            "owner_country": d.owner_country, "filer": d.filer_id,
            "filer_country": d.filer_country, "case_ref": d.case_ref, "reason": d.reason,
            "filed_at": d.filed_at, "seq": d.filed_seq, "state": d.state,
            "answer_reason": d.answer_reason, "answered_at": d.answered_at}
