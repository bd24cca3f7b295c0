"""The liaison desk: what the police API and the web console let a token holder do.

One place for the rules both HTTP faces share, so that they cannot drift apart:

- **who** — every call names a ``Caller`` (the token's name and role, and the channel); its
  role must grant the permission (``domain.roles``), else ``NotAllowed``;
- **minimal data** — foreign records carry owner, country, kind, reason and dates only; our
  records' case details go to roles that read cases, notes only to roles that read notes;
- **audit** — every read of case details (a device, an order, a list of orders or disputes,
  the audit trail) appends a ``case.read`` event naming who looked at what, in its own write
  transaction; if it cannot be written, the read is not answered; a device look-up that shows
  other operators' records is a ``foreign.read`` event naming them, at most
  ``[api] foreign_lookup_rate`` per person (refused ones are recorded too);
- **plain words** — results carry a ``next_step`` sentence for the person asking.

Orders go through ``OrderIntake``, disputes through ``Disputes``; nothing here writes records.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select

from imeisync.adapters.police_jws import TrustedKeys, verify_order
from imeisync.adapters.rate_limit import RateLimiter
from imeisync.domain.errors import BadInput, NotAllowed, NotFound, Refused, TooMany
from imeisync.domain.imei import Imei, parse_lookup, parse_typed
from imeisync.domain.imei import format as format_imei
from imeisync.domain.roles import Permission, allowed, roles_with
from imeisync.domain.times import rfc3339
from imeisync.domain.verdict import network_answer
from imeisync.services import audit, journey
from imeisync.services.devices import device_view, status_from_store
from imeisync.services.disputes import Disputes, enrich_disputes
from imeisync.services.disputes import received as received_dispute
from imeisync.services.orders import Actor, OrderIntake, OrderOutcome
from imeisync.services.tacs import device_names
from imeisync.store.db import Database
from imeisync.store.models import AuditEvent, Dispute, OutboxChange, Record
from imeisync.store.models import Order as OrderRow


@dataclass(frozen=True)
class Caller:
    """Who is asking: a token's name and role (never taken from a request body)."""

    name: str
    role: str
    channel: str = "api"  # api | console

    @property
    def actor(self) -> Actor:
        return Actor(self.name, self.role, self.channel)


# What the registry's rejection codes mean for the person who entered the order.
REGISTRY_CODES: dict[str, tuple[str, str]] = {
    "0002": ("the registry says another operator owns this record",
             "Tell the operations team (order id and IMEI): they compare our records with the "
             "registry (`imeisync sync reconcile`) and, if it still disagrees, contact the "
             "registry's operator."),
    "0003": ("the registry holds no such record to remove",
             "Nothing more is needed for other operators (the device is not blocked centrally); "
             "the operations team should reconcile with the registry so both sides agree."),
    "0010": ("the registry does not accept the order's reason code",
             "Tell the operations team with the order id: the change must be corrected and "
             "sent again."),
    "0011": ("the registry found a malformed field in the change",
             "Tell the operations team with the order id: the change must be corrected and "
             "sent again."),
}


class LiaisonDesk:
    def __init__(
        self,
        db: Database,
        *,
        operator_id: str,
        operator_country: str,
        intake: Callable[[], OrderIntake],
        disputes: Callable[[], Disputes],
        cipher: Callable[[], Any],
        trusted_keys: Callable[[], TrustedKeys],
        unknown_status: str = "WHITELISTED",
        push_every: float = 30.0,
        pull_every: float = 300.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        foreign_lookups: RateLimiter | None = None,
    ):
        self.foreign_lookups = foreign_lookups
        self.db = db
        self.me = operator_id
        self.country = operator_country
        self._intake = intake
        self._disputes = disputes
        self._cipher = cipher
        self._trusted_keys = trusted_keys
        self.unknown_status = unknown_status
        self.push_every = push_every
        self.pull_every = pull_every
        self.clock = clock

    # -- rules ---------------------------------------------------------------------------

    @staticmethod
    def require(caller: Caller, permission: Permission) -> None:
        if not allowed(caller.role, permission):
            roles = " or ".join(roles_with(permission)) or "no"
            raise NotAllowed(
                f"a {caller.role} token may not do this ({permission})",
                f"it needs a {roles} token; ask an administrator if you should have one",
                code="forbidden",
            )

    def _audit_read(self, caller: Caller, what: str, *, imei_key: str | None = None,
                    case_ref: str | None = None, action: str = "case.read",
                    outcome: str = "ok", **detail: Any) -> None:
        with self.db.write() as session:
            audit.append(session, [audit.Event(
                actor=caller.name, role=caller.role, action=action, outcome=outcome,
                at=self.clock(), imei_key=imei_key, case_ref=case_ref,
                detail={"what": what, "channel": caller.channel, **detail})])

    def audit_read(self, caller: Caller, what: str, **detail: Any) -> None:
        """``case.read`` for a read served by another service (sightings)."""
        self._audit_read(caller, what, **detail)

    def _wait_words(self, seconds: float) -> str:
        if seconds < 90:
            return f"{int(seconds)} seconds"
        if seconds < 5400:
            return f"{round(seconds / 60)} minutes"
        return f"{round(seconds / 3600)} hours"

    # -- orders --------------------------------------------------------------------------

    def submit_signed(self, caller: Caller, token: str, unknown_tac_ok: bool = False,
                      ) -> OrderOutcome:
        """A police order as a compact JWS (block, track or lift)."""
        self.require(caller, Permission.SUBMIT_ORDER)
        return self._intake().submit_signed(token, caller.actor, unknown_tac_ok=unknown_tac_ok)

    def submit_block(self, caller: Caller, payload: Any) -> OrderOutcome:
        """An unsigned block from a police report, where policy allows it; the payload's
        ``unknown_tac_ok`` (true/false) confirms an IMEI whose TAC the TAC table lacks."""
        self.require(caller, Permission.SUBMIT_ORDER)
        if not isinstance(payload, dict):
            raise BadInput("an unsigned block is a JSON object",
                           'send {"imei", "case_ref", "police_unit", "reason"} (and "note")',
                           code="malformed_order")
        payload = dict(payload)
        confirmed = payload.pop("unknown_tac_ok", False)
        if not isinstance(confirmed, bool):
            raise BadInput("unknown_tac_ok must be true or false", code="malformed_order",
                           field="unknown_tac_ok")
        return self._intake().submit_unsigned(payload, caller.actor, unknown_tac_ok=confirmed)

    def order(self, caller: Caller, order_id: str) -> dict[str, Any]:
        """One order and its progress: accepted → sent to registry → confirmed (or why not)."""
        self.require(caller, Permission.READ_CASES)
        with self.db.read() as session:
            rows = session.execute(select(OrderRow).where(OrderRow.order_id == order_id)
                                   .order_by(OrderRow.id)).scalars().all()
            if not rows:
                raise NotFound(f"no order {order_id[:130]} was received here",
                              "check the order id (it is in the police order, or on the page "
                              "shown when it was submitted)", code="no_order")
            taken = [r for r in rows if r.outcome != "refused"]
            row = taken[0] if taken else rows[-1]
            view = self._progress(session, row)
            view["attempts"] = len(rows)
        self._audit_read(caller, "order", imei_key=row.imei_key, case_ref=row.case_ref,
                         order_id=order_id)
        return view

    def receipt(self, caller: Caller, order_id: str) -> Any:
        """The registry-signed receipt of an order applied everywhere (to download)."""
        self.require(caller, Permission.READ_CASES)
        with self.db.read() as session:
            receipt = journey.complete_receipt(session, order_id)
        self._audit_read(caller, "receipt", order_id=order_id, change_id=receipt.change_id)
        return receipt

    def orders(self, caller: Caller, *, mine: bool = True, limit: int = 50) -> list[dict[str, Any]]:
        """Recent orders (the caller's own, or all of this operator's), newest first."""
        self.require(caller, Permission.READ_CASES)
        limit = max(1, min(int(limit), 500))
        query = select(OrderRow).order_by(OrderRow.id.desc()).limit(limit)
        if mine:
            query = query.where(OrderRow.submitted_by == caller.name)
        with self.db.read() as session:
            rows = session.execute(query).scalars().all()
            outbox = self._outbox_by_order(session, [r.order_id for r in rows if r.order_id])
            receipts = journey.receipts_of(session, [c[-1].change_id for c in outbox.values()])
            views = [self._summary(r, outbox.get(r.order_id or "", []), receipts) for r in rows]
        self._audit_read(caller, "orders", mine=mine, count=len(views))
        return views

    def _outbox_by_order(self, session: Any, order_ids: list[str]) -> dict[str, list[Any]]:
        found: dict[str, list[Any]] = {}
        for start in range(0, len(order_ids), 500):
            for change in session.execute(select(OutboxChange).where(
                    OutboxChange.order_id.in_(order_ids[start:start + 500]))
                    .order_by(OutboxChange.id)).scalars():
                found.setdefault(change.order_id, []).append(change)
        return found

    def _summary(self, row: OrderRow, changes: list[Any], receipts: dict[str, Any]
                 ) -> dict[str, Any]:
        state, _steps, _registry = self._state(row, changes, receipts)
        return {"order_id": row.order_id, "kind": row.kind,
                "imei": format_imei(Imei(row.imei_key)) if row.imei_key else row.imei,
                "case_ref": row.case_ref, "received_at": rfc3339(row.received_at),
                "submitted_by": row.submitted_by, "outcome": row.outcome, "state": state}

    def _state(self, row: OrderRow, changes: list[Any], receipts: dict[str, Any]
               ) -> tuple[str, list[dict[str, Any]], dict[str, Any] | None]:
        """(state, steps, registry) of an order from its row and its outbox change."""
        accepted = row.outcome in ("accepted", "linked")
        steps = [{"step": "accepted", "done": accepted,
                  "at": rfc3339(row.received_at) if accepted else None}]
        if row.outcome == "refused":
            return "refused", steps, None
        change = changes[-1] if changes else None
        if change is None:
            return ("linked" if row.outcome == "linked" else "accepted"), steps, None
        sent = change.state not in ("pending", "cancelled")
        confirmed = change.state in ("accepted", "duplicate")
        steps.append({"step": "sent", "done": sent,
                      "at": rfc3339(change.sent_at) if sent else None})
        steps.append({"step": "confirmed", "done": confirmed,
                      "at": rfc3339(change.confirmed_at
                                    or (change.sent_at if confirmed else None))})
        registry = {"change_id": change.change_id, "action": change.action,
                    "state": change.state, "attempts": change.attempts,
                    "result_code": change.result_code, "message": change.last_error,
                    "seen_in_feed": change.confirmed_at is not None}
        if change.state == "rejected":
            return "rejected", steps, registry
        if change.state == "cancelled":
            return journey.WITHDRAWN, steps, registry
        if confirmed:
            state, more, registry["receipt"] = journey.applied_steps(
                receipts.get(change.change_id))
            steps.extend(more)
            return state, steps, registry
        return ("sent" if sent else "accepted"), steps, registry

    def _progress(self, session: Any, row: OrderRow) -> dict[str, Any]:
        changes = session.execute(select(OutboxChange).where(
            OutboxChange.order_id == row.order_id).order_by(OutboxChange.id)).scalars().all()
        state, steps, registry = self._state(
            row, list(changes), journey.receipts_of(session, [c.change_id for c in changes]))
        view: dict[str, Any] = {
            "order_id": row.order_id, "kind": row.kind,
            "imei": format_imei(Imei(row.imei_key)) if row.imei_key else row.imei,
            "imei_key": row.imei_key, "case_ref": row.case_ref,
            "imei_last": format_imei(Imei(row.imei_key_last)) if row.imei_key_last else None,
            "device": device_names(session, [row.imei_key[:8]]).get(row.imei_key[:8])
            if row.imei_key else None,
            "police_unit": row.police_unit, "reason": row.reason,
            "issued_at": rfc3339(row.issued_at), "received_at": rfc3339(row.received_at),
            "submitted_by": row.submitted_by, "channel": row.channel,
            "signed_by": row.signed_kid, "outcome": row.outcome, "state": state,
            "steps": steps, "registry": registry,
        }
        if row.outcome == "refused":
            view["refusal"] = {"code": row.refusal_code, "message": row.refusal_message}
        linked_to = None
        if row.outcome == "linked" and row.record_id is not None:
            linked_to = session.execute(select(Record.opened_by).where(
                Record.id == row.record_id)).scalar_one_or_none()
            view["linked_to"] = linked_to
        if row.imei_key:
            status = status_from_store(session, row.imei_key)
            view["device_status"] = network_answer(status, self.unknown_status)
        view["next_step"] = self._order_next_step(row, state, registry, linked_to)
        return view

    def _order_next_step(self, row: OrderRow, state: str, registry: dict[str, Any] | None,
                         linked_to: str | None) -> str:
        effect = "block" if row.kind in ("block", "track") else "unblock"
        if state == "refused":
            message = row.refusal_message or "the order was refused"
            return f"Not applied: {message}"
        if state == "linked":
            return (f"The device was already on our list under order {linked_to}; this order "
                    "was recorded with it and nothing else needed to change.")
        if state == "accepted":
            return (f"Applied here at once. It goes to the registry with the next sync "
                    f"(every {self._wait_words(self.push_every)}); nothing to do.")
        assert registry is not None
        said = journey.next_step(state, registry.get("receipt"), effect)
        if said:
            return said
        if state == "sent":
            if registry.get("message"):
                return (f"Sending to the registry failed ({registry['message']}); it is retried "
                        "automatically. If this lasts more than an hour, tell the operations "
                        "team.")
            return "Sent to the registry; waiting for its answer. Nothing to do."
        if state == "confirmed":
            return (f"Done: the registry has it. Other operators {effect} the device after "
                    f"their next sync (typically within {self._wait_words(self.pull_every)}).")
        code = str(registry.get("result_code") or "")
        meaning, todo = REGISTRY_CODES.get(code, (
            "the registry rejected the change",
            "Tell the operations team with the order id."))
        return f"Applied here, but {meaning} (code {code or '?'}). {todo}"

    # -- devices -------------------------------------------------------------------------

    def device(self, caller: Caller, text: str) -> dict[str, Any]:
        """The verdict, our records with case details, foreign records minimised, and what
        the person asking can do next."""
        self.require(caller, Permission.READ_CASES)
        imei = parse_lookup(text)
        with self.db.read() as session:
            view = device_view(session, imei, self.me, cipher=self._cipher, role=caller.role)
            filed = session.execute(select(Dispute).where(
                Dispute.imei_key == imei.key).order_by(Dispute.filed_at.desc())).scalars().all()
            disputes = [{"dispute_id": d.dispute_id, "direction": d.direction,
                         "owner": d.owner_id, "filer": d.filer_id, "state": d.state,
                         "filed_at": rfc3339(d.filed_at)} for d in filed]
        own, foreign = [], []
        for r in view.records:
            if r.own:
                item = r.as_dict()
                item.pop("own", None)
                item.pop("id", None)
                own.append(item)
            else:  # data minimisation: never more than owner, country, kind, reason, dates
                foreign.append({"owner": r.owner_id, "owner_country": r.owner_country,
                                "kind": r.kind, "reason": r.reason,
                                "opened_at": rfc3339(r.opened_at),
                                "closed_at": rfc3339(r.closed_at),
                                **({"imei_first": r.imei_first, "imei_last": r.imei_last}
                                   if r.imei_first else {})})
        open_own = [r for r in own if r["closed_at"] is None]
        open_foreign = [r for r in foreign if r["closed_at"] is None]
        result = {
            "imei": view.imei, "imei_key": view.imei_key, "device": view.device,
            "status": network_answer(view.status, self.unknown_status),
            "blocked": str(view.status) == "BLACKLISTED",
            "our_records": own, "foreign_records": foreign, "disputes": disputes,
            "next_step": self._device_next_step(caller, open_own, open_foreign, disputes),
        }
        case_ref = open_own[0]["case_ref"] if open_own else None
        if not foreign:
            self._audit_read(caller, "device", imei_key=imei.key, case_ref=case_ref)
            return result
        # Other operators' records: one device at a time, audited, and at most so many.
        wait = self.foreign_lookups.take(caller.name) if self.foreign_lookups else None
        self._audit_read(caller, "device", imei_key=imei.key, case_ref=case_ref,
                         action="foreign.read", outcome="ok" if wait is None else "refused",
                         owners=sorted({str(r["owner"]) for r in foreign}))
        if wait is not None:
            raise TooMany(
                "too many look-ups of devices other operators block, for now",
                f"wait {wait} seconds; the limit ([api] foreign_lookup_rate) keeps other "
                "operators' records from being copied in bulk", wait)
        return result

    def _device_next_step(self, caller: Caller, own: list[dict[str, Any]],
                          foreign: list[dict[str, Any]], disputes: list[dict[str, Any]]) -> str:
        console = caller.channel == "console"
        if not own and not foreign:
            how = "“Submit a block”" if console else "POST /api/v1/orders"
            return (f"Not blocked: no operator has an open record of this device. To block it, "
                    f"submit a block with the police case reference ({how}).")
        steps = []
        if own:
            how = "“Upload a signed order”" if console else "POST /api/v1/orders"
            steps.append(f"We ({self.me}) hold it under case {own[0]['case_ref']}. Only a "
                         f"police-signed lift order removes it ({how}).")
        if foreign:
            owners = ", ".join(dict.fromkeys(f"{r['owner']} ({r['owner_country']})"
                                             for r in foreign))
            waiting = [d for d in disputes if d["direction"] == "filed" and d["state"] == "open"]
            if waiting:
                steps.append(f"Blocked by {owners}. Your dispute {waiting[0]['dispute_id']} "
                             f"is waiting for {waiting[0]['owner']}'s answer.")
            else:
                how = "“File a dispute”" if console else "POST /api/v1/disputes"
                steps.append(f"Blocked by {owners}: only that operator can remove its record, "
                             "at the request of the police. If the police say the block is "
                             f"wrong, file a dispute with your police case reference ({how}).")
        return " ".join(steps)

    # -- disputes ------------------------------------------------------------------------

    def disputes(self, caller: Caller, *, direction: str | None = None,
                 state: str | None = None) -> list[dict[str, Any]]:
        self.require(caller, Permission.READ_CASES)
        if direction not in (None, "filed", "received"):
            raise BadInput("direction is filed or received", code="malformed")
        if state not in (None, "open", "lifted", "upheld"):
            raise BadInput("state is open, lifted or upheld", code="malformed")
        rows = self._disputes().list(direction=direction, state=state)
        self._enrich(rows)
        self._audit_read(caller, "disputes", direction=direction, state=state, count=len(rows))
        return rows

    def dispute(self, caller: Caller, dispute_id: str) -> dict[str, Any]:
        self.require(caller, Permission.READ_CASES)
        with self.db.read() as session:
            row = session.execute(select(Dispute).where(Dispute.dispute_id == dispute_id)
                                  ).scalar_one_or_none()
        if row is None:
            raise NotFound(f"no dispute {dispute_id[:90]} here", "see the list of disputes",
                          code="no_dispute")
        view = next(d for d in self._disputes().list(imei_key=row.imei_key)
                    if d["dispute_id"] == dispute_id)
        self._enrich([view])
        self._audit_read(caller, "dispute", imei_key=row.imei_key, dispute_id=dispute_id)
        return view

    def _enrich(self, rows: list[dict[str, Any]]) -> None:
        enrich_disputes(self.db, self.me, rows)

    def file_dispute(self, caller: Caller, imei: str, case_ref: str, reason: str,
                     owner: str | None = None) -> dict[str, Any]:
        self.require(caller, Permission.FILE_DISPUTE)
        result = self._disputes().file(imei, case_ref, reason, caller.actor, owner or None)
        self._enrich([result])
        return result

    def uphold(self, caller: Caller, dispute_id: str, reason: str) -> dict[str, Any]:
        """Answer a dispute about our record: the record stands, for ``reason``."""
        self.require(caller, Permission.ANSWER_DISPUTE)
        result = self._disputes().answer(dispute_id, "upheld", reason, caller.actor)
        self._enrich([result])
        return result

    def lift_for_dispute(self, caller: Caller, dispute_id: str, token: str) -> OrderOutcome:
        """Answer a dispute with the police's signed lift order for the disputed device."""
        self.require(caller, Permission.SUBMIT_ORDER)
        row = received_dispute(self.db, dispute_id, "see the list of disputes")
        payload = verify_order(token, self._trusted_keys()).payload
        kind = payload.get("kind") if isinstance(payload, dict) else None
        try:
            key = parse_typed(str(payload.get("imei", ""))).key if isinstance(payload, dict) \
                else None
        except BadInput:
            key = None
        if kind != "lift" or key != row.imei_key:
            raise Refused(
                f"this signed order is not a lift of IMEI {format_imei(Imei(row.imei_key))}",
                "upload the police's lift order for the disputed device; a block or another "
                "device's order belongs on “Upload a signed order”", code="wrong_order")
        return self.submit_signed(caller, token)

    def waiting_disputes(self, caller: Caller) -> int:
        """How many disputes about our records wait for an answer (a count: no case data)."""
        if not allowed(caller.role, Permission.READ_CASES):
            return 0
        with self.db.read() as session:
            return session.execute(select(func.count()).select_from(Dispute).where(
                Dispute.direction == "received", Dispute.state == "open")).scalar_one()

    # -- the audit trail -----------------------------------------------------------------

    def audit_events(self, caller: Caller, *, after: int = 0, limit: int = 100
                     ) -> list[dict[str, Any]]:
        self.require(caller, Permission.READ_AUDIT)
        limit = max(1, min(int(limit), 1000))
        with self.db.read() as session:
            rows = session.execute(select(AuditEvent).where(AuditEvent.id > after)
                                   .order_by(AuditEvent.id).limit(limit)).scalars().all()
            events = [{"id": e.id, "at": rfc3339(e.at), "actor": e.actor, "role": e.role,
                       "action": e.action, "imei_key": e.imei_key, "case_ref": e.case_ref,
                       "outcome": e.outcome, "detail": json.loads(e.detail or "{}"),
                       "hash": e.hash} for e in rows]
        self._audit_read(caller, "audit", after=after, count=len(events))
        return events
