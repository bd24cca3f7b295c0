"""Lift notices: a lift that reaches other networks while the registry is down (the DDoS seed).

The owner of a record, after the registry has been unreachable for ``[sync] outage_after``,
signs a notice for its own lift with its operator key (``issue``). Another operator applies it
(``apply``): the signature must verify against the registry's signed member directory it
cached (``GET /v1/members``), the record must be open and owned by the notice's signer, and
the notice must be fresh and new. It then closes that record locally — "lifted by notice,
awaiting the registry" — in one transaction with the change log (the attach check follows at
once), a ``lift_notices`` row and an audit event. A notice never opens anything and never
touches another owner's record; the feed's remove, when the registry returns, confirms it, and
a reconcile does not reopen it meanwhile (``pending_notices``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from imeisync.adapters.registry_receipts import MemberKey, parse_members
from imeisync.adapters.signed_documents import (
    NOTICE_TYP,
    document_header,
    sign_document,
    verify_document,
)
from imeisync.domain import fields
from imeisync.domain.errors import BadInput, Conflict, ImeisyncError, NotFound, Refused
from imeisync.domain.imei import is_key
from imeisync.domain.orders import parse_timestamp
from imeisync.domain.ownership import RemovalOutcome, decide_removal
from imeisync.domain.times import rfc3339
from imeisync.services import audit
from imeisync.store import sync_state
from imeisync.store.bulk import RecordBatch
from imeisync.store.db import Database
from imeisync.store.models import LiftNotice, OutboxChange, Record
from imeisync.store.models import Order as OrderRow

NOTICE_LIFETIME = timedelta(days=3)  # a notice is for an outage, not for ever
CLOCK_SKEW = timedelta(minutes=5)
CLOSE_REASON = "notice"
_FIELDS = {"notice_id", "issuer", "issuer_country", "order_id", "imei", "lifted_at",
           "issued_at", "expires_at"}
STEPS_WITH_REGISTRY = ("push", "pull")
# The registry could not be reached or did not answer; a refusal (our signature, a malformed
# request) is not an outage and is fixed here, not worked around with notices.
OUTAGE_CODES = ("registry_unreachable", "registry_timeout", "registry_unavailable")


class Notices:
    def __init__(self, db: Database, *, operator_id: str, operator_country: str,
                 signing_key: Callable[[], Ed25519PrivateKey],
                 registry_key: Callable[[], Ed25519PublicKey], outage_after: float,
                 clock: Callable[[], datetime]):
        self.db = db
        self.me = operator_id
        self.country = operator_country
        self._signing_key = signing_key
        self._registry_key = registry_key
        self.outage_after = outage_after
        self.clock = clock

    # -- the owner's side -------------------------------------------------------------------

    def issue(self, order_id: str, actor: str) -> str:
        """A signed lift notice for our accepted lift ``order_id``, during a registry outage."""
        now = self.clock()
        with self.db.read() as session:
            order = session.execute(select(OrderRow).where(
                OrderRow.order_id == order_id, OrderRow.outcome == "accepted")).scalar_one_or_none()
            if order is None or order.kind != "lift":
                raise NotFound(f"no accepted lift order {order_id[:130]} here",
                               "a notice is issued for a lift this operator accepted",
                               code="no_order")
            change = session.execute(select(OutboxChange.state).where(
                OutboxChange.order_id == order_id)).scalar_one_or_none()
            if change in ("accepted", "duplicate"):
                raise Refused("the registry already has this lift; other operators apply it "
                              "from the feed — no notice is needed", code="not_needed")
            if change == "rejected":
                raise Refused("the registry rejected this lift; local and central state "
                              "disagree — resolve that first (`imeisync sync status`)",
                              code="rejected")
            if change == "cancelled":
                raise Refused("this lift was withdrawn with its block before either left us; "
                              "nobody else ever had the record", code="not_needed")
            down_since = self._outage_since(session, now)
        if down_since is None:
            raise Refused(
                f"the registry has not been unreachable for [sync] outage_after "
                f"({int(self.outage_after)} s); the lift travels through it",
                "wait for the next push, or check `imeisync sync status`", code="no_outage")
        assert order.imei_key is not None
        payload = {"notice_id": f"{self.me}:notice:{uuid.uuid4().hex}", "issuer": self.me,
                   "issuer_country": self.country, "order_id": order_id,
                   "imei": order.imei_key, "lifted_at": rfc3339(order.received_at),
                   "issued_at": rfc3339(now), "expires_at": rfc3339(now + NOTICE_LIFETIME)}
        token = sign_document(payload, self._signing_key(), self.me, NOTICE_TYP)
        with self.db.write() as session:
            audit.append(session, [audit.Event(
                actor=actor, role="liaison", action="notice.issued", outcome="ok", at=now,
                imei_key=order.imei_key, case_ref=order.case_ref,
                detail={"notice_id": payload["notice_id"], "order_id": order_id,
                        "registry_down_since": down_since})])
        return token

    def _outage_since(self, session: Session, now: datetime) -> str | None:
        """When the registry became unreachable, if that is longer ago than outage_after."""
        state = sync_state.read(session)
        for step in STEPS_WITH_REGISTRY:
            last, error = state.step(step)
            if not isinstance(error, dict) or "at" not in error:
                continue
            if error.get("code") not in OUTAGE_CODES:
                continue
            since = parse_timestamp(last, "last") if last else None
            if since is None or (now - since).total_seconds() >= self.outage_after:
                return last or "never reached"
        return None

    # -- the recipient's side ---------------------------------------------------------------

    def directory(self) -> dict[str, MemberKey]:
        """The cached member directory, verified again with the registry's key."""
        with self.db.read() as session:
            token = sync_state.read(session, (sync_state.MEMBERS,)).text(sync_state.MEMBERS)
        if not token:
            raise Refused("no member directory is cached here, so no notice can be checked",
                          "run `imeisync sync members` while the registry is reachable (the "
                          "daemon fetches it on its own)", code="no_directory")
        try:
            return {m.id: m for m in parse_members(token, self._registry_key())}
        except ImeisyncError:
            raise Refused("the cached member directory does not verify with [registry] "
                          "registry_public_key; it is not used",
                          "fetch it again with `imeisync sync members`",
                          code="bad_directory") from None

    def apply(self, token: str, actor: str, role: str = "liaison") -> dict[str, Any]:
        """Close the notice's record here; what was done, for the person applying it."""
        header = document_header(token.strip(), NOTICE_TYP, "lift notice")
        issuer = str(header["kid"])
        members = self.directory()
        member = members.get(issuer)
        if member is None:
            raise Refused(f"the notice names signer {issuer[:64]!r}, who is not a member in "
                          "the registry's directory", code="unknown_signer")
        if issuer == self.me:
            raise Refused("this is our own notice; our records are lifted by police orders",
                          code="own_notice")
        payload = verify_document(token.strip(), member.public_key, NOTICE_TYP, "lift notice")
        notice = self._checked(payload, issuer)
        now = self.clock()
        if notice["expires_at"] <= now:
            raise Refused(f"the notice expired at {rfc3339(notice['expires_at'])}",
                          "ask the issuing operator for a new one (or wait for the registry)",
                          code="expired")
        if notice["issued_at"] > now + CLOCK_SKEW:
            raise Refused("the notice is dated in the future", code="bad_notice")
        with self.db.write() as session:
            if session.execute(select(LiftNotice.id).where(
                    LiftNotice.notice_id == notice["notice_id"])).first() is not None:
                raise Conflict(f"notice {notice['notice_id']} was already applied here",
                               code="replayed_notice")
            key = notice["imei"]
            open_records = list(session.execute(select(Record).where(
                Record.imei_key == key, Record.closed_at.is_(None))).scalars())
            decision = decide_removal(open_records, issuer)
            if decision.outcome is RemovalOutcome.NOT_OWNER:
                raise Refused(f"IMEI key {key} is blocked by {decision.owners_text()}, not by "
                              f"the notice's signer {issuer}; a notice lifts only its "
                              "signer's own record", code="not_owner")
            if decision.outcome is RemovalOutcome.NO_RECORD:
                raise Refused(f"no open record of {issuer} for IMEI key {key} here; nothing "
                              "to lift", code="no_record")
            batch = RecordBatch(session.connection(), now)
            closed_by = f"notice:{notice['notice_id']}"[:128]
            for record in decision.own:
                batch.close(record.id, key, record.kind, closed_by, CLOSE_REASON)
            batch.flush()
            record_id = decision.own[0].id
            session.execute(insert(LiftNotice.__table__).values(
                notice_id=notice["notice_id"], issuer=issuer, order_id=notice["order_id"],
                imei_key=key, issued_at=notice["issued_at"], applied_at=now,
                applied_by=actor[:128], record_id=record_id))
            audit.append(session, [audit.Event(
                actor=actor, role=role, action="notice.applied", outcome="ok", at=now,
                imei_key=key, detail={"notice_id": notice["notice_id"], "issuer": issuer,
                                      "order_id": notice["order_id"]})])
        return {"notice_id": notice["notice_id"], "issuer": issuer,
                "issuer_country": member.country, "imei_key": key,
                "order_id": notice["order_id"], "closed": len(decision.own),
                "state": "lifted by notice, awaiting the registry"}

    @staticmethod
    def _checked(payload: dict[str, Any], issuer: str) -> dict[str, Any]:
        if set(payload) != _FIELDS:
            raise BadInput("the notice's payload does not have exactly the fields "
                           f"{', '.join(sorted(_FIELDS))}", code="bad_notice")
        if payload["issuer"] != issuer:
            raise Refused("the notice's issuer is not its signer", code="bad_notice")
        if not is_key(payload["imei"]):
            raise BadInput("the notice's imei is not a 14-digit key", code="bad_notice")
        if (not isinstance(payload["notice_id"], str)
                or not fields.REFERENCE_ID.fullmatch(payload["notice_id"])
                or not isinstance(payload["order_id"], str)
                or not 0 < len(payload["order_id"]) <= 128):
            raise BadInput("the notice's notice_id or order_id is malformed", code="bad_notice")
        times = {name: parse_timestamp(payload[name], name)
                 for name in ("issued_at", "expires_at", "lifted_at")}
        return {**payload, **times}


def pending_notices(session: Session | Connection) -> set[tuple[str, str]]:
    """(imei_key, owner) of records closed by a notice the registry has not confirmed yet:
    a snapshot taken before the owner's remove reached the registry must not reopen them."""
    return {(k, o) for k, o in session.execute(select(LiftNotice.imei_key, LiftNotice.issuer)
                                               .where(LiftNotice.confirmed_at.is_(None)))}


def confirm_notices(session: Session, removes: list[tuple[str, str]], now: datetime) -> None:
    """The feed's removes of (imei_key, owner): notices that closed those records are done."""
    table = LiftNotice.__table__
    for key, owner in removes:
        session.execute(update(table).where(table.c.imei_key == key, table.c.issuer == owner,
                                            table.c.confirmed_at.is_(None))
                        .values(confirmed_at=now))

