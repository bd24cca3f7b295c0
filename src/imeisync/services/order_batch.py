"""One batch of police orders inside one write transaction: plan every order under the
ownership rule (refusing the whole batch if any is refused), then write records, outbox changes,
order rows and audit events in bulk. ``OrderIntake`` (services/orders.py) opens the transaction
and records refusals; the types the callers see (``Actor``, ``OrderOutcome``, ``BatchRefused``)
live here and are re-exported there.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from imeisync.adapters.data_crypto import DataCipher
from imeisync.domain.errors import Conflict, ImeisyncError, Refused
from imeisync.domain.imei import format as format_imei
from imeisync.domain.imei import luhn_check_digit as luhn
from imeisync.domain.orders import Order, OrderKind
from imeisync.domain.ownership import RemovalOutcome, decide_removal
from imeisync.domain.ranges import describe, overlaps
from imeisync.services import audit, tacs
from imeisync.services.order_texts import message, no_record, not_owner, part_of_range
from imeisync.store.models import ChangeLog, OutboxChange, Record
from imeisync.store.models import Order as OrderRow

_CHUNK = 500  # IN-list size for batch look-ups


@dataclass(frozen=True)
class Actor:
    """Who entered the order: a staff id (CLI ``--as``) or an API token's name, and its role."""

    name: str
    role: str = "liaison"
    channel: str = "cli"  # cli | import | api | console


@dataclass(frozen=True)
class OrderOutcome:
    order_id: str
    kind: str
    imei: str
    imei_key: str
    outcome: str  # accepted | linked
    record_id: int
    case_ref: str
    change_id: str | None  # the outbox change, None when nothing changed
    message: str
    imei_last: str | None = None  # a range order's last IMEI (imei is its first)
    device: str | None = None  # "Apple iPhone 15, TAC 35…" where the TAC table knows it

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class BatchRefused(ImeisyncError):
    """Some orders of a batch were refused: nothing of the batch was applied."""

    problems: list[tuple[int, ImeisyncError]] = field(default_factory=list)
    exit_code = 1

    def __post_init__(self) -> None:
        super().__init__(
            f"{len(self.problems)} order(s) refused; nothing was applied",
            "fix the lines named and submit the whole batch again",
        )


class OrderBatch:
    """One batch inside one write transaction: plan every order, then write in bulk."""

    def __init__(self, session: Session, actor: Actor, kid: str | None, now: datetime, *,
                 operator_id: str, operator_country: str,
                 cipher: Callable[[], DataCipher]):
        self.session = session
        self.actor = actor
        self.kid = kid
        self.now = now
        self.me = operator_id
        self.country = operator_country
        self.cipher = cipher  # called only when an order carries a note
        self.ranges: dict[str, list[Record]] = {}  # open range records per TAC, by run()

    def run(
        self, orders: Sequence[Order], progress: Callable[[int], None] | None
    ) -> list[OrderOutcome]:
        problems: list[tuple[int, ImeisyncError]] = []
        taken = self._taken_order_ids([o.order_id for o in orders])
        open_by_key = self._open_records({o.imei_key for o in orders if not o.is_range})
        self.ranges = self._open_ranges({o.imei_key[:8] for o in orders})
        seen_ids: set[str] = set()
        plans: list[tuple[Order, str, Record | None]] = []  # (order, action, record)
        for index, order in enumerate(orders):
            if order.order_id in taken or order.order_id in seen_ids:
                problems.append((index, Conflict(
                    f"order {order.order_id} was already received"
                    + (f" and {taken[order.order_id]}" if order.order_id in taken else ""),
                    "a police order is applied once; a new request needs a new order_id",
                    code="replayed_order_id",
                )))
                continue
            seen_ids.add(order.order_id)
            if self.kid is None and order.kind is not OrderKind.BLOCK:
                problems.append((index, Refused(
                    f"a {order.kind} order needs a police signature",
                    "submit the police's signed order with `imeisync order submit FILE`",
                    code="signature_required",
                )))
                continue
            try:
                if order.is_range:
                    action, record = self._plan_range(order)
                else:
                    action, record = self._plan(order, open_by_key.setdefault(order.imei_key, []))
            except Refused as exc:
                problems.append((index, exc))
                continue
            plans.append((order, action, record))
        if problems:
            raise BatchRefused(problems)
        return self._write(plans, progress)

    def _taken_order_ids(self, order_ids: list[str]) -> dict[str, str]:
        taken: dict[str, str] = {}
        for start in range(0, len(order_ids), _CHUNK):
            rows = self.session.execute(
                select(OrderRow.order_id, OrderRow.outcome, OrderRow.received_at).where(
                    OrderRow.order_id.in_(order_ids[start : start + _CHUNK]),
                    OrderRow.outcome != "refused",
                )
            )
            for order_id, outcome, received in rows:
                assert order_id is not None  # matched by IN (...), so not NULL
                taken[order_id] = f"{outcome} on {received:%Y-%m-%d %H:%M}Z"
        return taken

    def _open_records(self, keys: set[str]) -> dict[str, list[Record]]:
        found: dict[str, list[Record]] = {}
        ordered = sorted(keys)
        for start in range(0, len(ordered), _CHUNK):
            rows = self.session.execute(
                select(Record).where(
                    Record.imei_key.in_(ordered[start : start + _CHUNK]),
                    Record.closed_at.is_(None), Record.imei_key_last.is_(None),
                )
            ).scalars()
            for record in rows:
                found.setdefault(record.imei_key, []).append(record)
        return found

    def _open_ranges(self, tacs: set[str]) -> dict[str, list[Record]]:
        """Open range records per TAC (a range never leaves its TAC, so this finds them all)."""
        found: dict[str, list[Record]] = {}
        for tac in sorted(tacs):
            found[tac] = list(self.session.execute(
                select(Record).where(
                    Record.imei_key.between(tac + "000000", tac + "999999"),
                    Record.imei_key_last.is_not(None), Record.closed_at.is_(None),
                ).order_by(Record.imei_key)
            ).scalars())
        return found

    def _covering_ranges(self, key: str) -> list[Record]:
        return [r for r in self.ranges.get(key[:8], ())
                if r.imei_key <= key <= (r.imei_key_last or r.imei_key)]

    def _plan_range(self, order: Order) -> tuple[str, Record | None]:
        """A range order: open, link (the same range again) or close (a lift of the same range)."""
        first, last = order.imei_key, order.last_key
        in_tac = self.ranges.setdefault(first[:8], [])
        touching = [r for r in in_tac if overlaps(first, last, r.imei_key, r.imei_key_last or "")]
        same = [r for r in touching if (r.imei_key, r.imei_key_last) == (first, last)]
        own_touching = [r for r in touching if r.owner_id == self.me]
        if order.kind is OrderKind.LIFT:
            decision = decide_removal(same, self.me)
            if decision.allowed:
                record = decision.own[0]
                in_tac.remove(record)  # a second lift in the same batch finds nothing
                return "close", record
            if own_touching and not decision.others:
                raise part_of_range(order, own_touching[0], self.me)
            if not decision.others:
                decision = decide_removal(touching, self.me)
            if decision.outcome is RemovalOutcome.NOT_OWNER:
                raise not_owner(order, decision.owners_text(), self.me)
            raise no_record(order, self.me)
        own_same = next((r for r in same if r.owner_id == self.me), None)
        if own_same is not None:
            return self._link_or_conflict(order, own_same)
        if own_touching:
            other = own_touching[0]
            raise Refused(
                f"{order.device_text()} overlaps {self.me}'s open range "
                f"{describe(other.imei_key, other.imei_key_last or other.imei_key)} "
                f"(order {other.opened_by}, case {other.case_ref})",
                "ranges of one operator may not overlap: lift that range first, or choose "
                "serials outside it", code="range_overlap",
            )
        single = self.session.execute(
            select(Record.imei_key, Record.opened_by, Record.case_ref).where(
                Record.imei_key.between(first, last), Record.imei_key_last.is_(None),
                Record.owner_id == self.me, Record.closed_at.is_(None),
            ).limit(1)
        ).first()
        if single is not None:
            raise Refused(
                f"{order.device_text()} includes IMEI {format_imei(single[0] + luhn(single[0]))}"
                f", which {self.me} already holds under order {single[1]} (case {single[2]})",
                "lift that record first, or submit ranges that leave it out",
                code="range_overlap",
            )
        # Later orders of the batch see this range as ours (overlaps are refused).
        in_tac.append(Record(imei_key=first, imei_key_last=last, owner_id=self.me,
                             owner_country=self.country, kind=str(order.kind),
                             opened_by=order.order_id, case_ref=order.case_ref))
        return "open", None

    def _link_or_conflict(self, order: Order, own: Record) -> tuple[str, Record | None]:
        if own.kind != order.kind:
            since = f"{own.opened_at:%Y-%m-%d %H:%M}Z" if own.opened_at else "now"
            doing = "blocks" if own.kind == "block" else "tracks (greylists)"
            raise Refused(
                f"{self.me} already {doing} {order.device_text()} since {since} "
                f"under case {own.case_ref}; "
                f"a {order.kind} order cannot change that",
                "lift the existing record with a police order first, then submit this one",
                code="kind_conflict",
            )
        if own.id is None:  # opened earlier in this very batch
            raise Refused(f"{order.device_text()} is named twice in this batch",
                          "keep one of the two orders", code="conflict")
        return "link", own

    def _withdraw_unsent(self, record_ids: list[int]) -> set[int]:
        """Records whose insert had not left us yet: the insert is cancelled (and so is the
        lift's remove), so nothing reaches the registry. One that is in flight (``sent``) is
        left alone; the remove then follows it in outbox order. The push claims rows under
        a row lock, so a block is either cancelled here or claimed there, never both."""
        if not record_ids:
            return set()
        outbox = OutboxChange.__table__
        found = set(self.session.execute(
            update(outbox).where(outbox.c.record_id.in_(record_ids),
                                 outbox.c.action == "insert", outbox.c.state == "pending")
            .values(state="cancelled").returning(outbox.c.record_id)).scalars())
        return found

    def _plan(self, order: Order, open_records: list[Record]) -> tuple[str, Record | None]:
        """Decide what the order does: ("open", None), ("link", rec) or ("close", rec).

        ``open_records`` are the device's own single records; ranges covering it count too:
        a device inside a range is blocked by it, and only the whole range can be lifted.
        """
        covering = open_records + self._covering_ranges(order.imei_key)
        if order.kind is OrderKind.LIFT:
            decision = decide_removal(covering, self.me)
            if decision.outcome is RemovalOutcome.NOT_OWNER:
                raise not_owner(order, decision.owners_text(), self.me)
            if decision.outcome is RemovalOutcome.NO_RECORD:
                raise no_record(order, self.me)
            single = next((r for r in decision.own if r.imei_key_last is None), None)
            if single is None:
                raise part_of_range(order, decision.own[0], self.me)
            open_records.remove(single)  # a second lift in the same batch finds nothing
            return "close", single
        own = next((r for r in covering if r.owner_id == self.me), None)
        if own is None:
            return "open", None
        return self._link_or_conflict(order, own)

    def _write(
        self, plans: list[tuple[Order, str, Record | None]],
        progress: Callable[[int], None] | None,
    ) -> list[OrderOutcome]:
        now, me = self.now, self.me
        country = self.country
        cipher = self.cipher() if any(o.note for o, _, _ in plans) else None
        # 1. records opened by these orders, ids returned in order
        new_rows = [
            {
                "imei_key": o.imei_key, "imei_key_last": o.imei_key_last,
                "owner_id": me, "owner_country": country,
                "kind": str(o.kind), "reason": o.reason, "source": "order",
                "case_ref": o.case_ref, "police_unit": o.police_unit,
                "note_enc": cipher.encrypt(o.note, context=f"order:{o.order_id}")
                if (o.note and cipher) else None,
                "opened_at": now, "opened_by": o.order_id,
            }
            for o, action, _ in plans if action == "open"
        ]
        new_ids: list[int] = []
        if new_rows:
            table = Record.__table__
            result = self.session.execute(
                insert(table).returning(table.c.id, sort_by_parameter_order=True), new_rows
            )
            new_ids = list(result.scalars())
        # 2. records closed by lifts
        closes = [
            {"id": r.id, "closed_at": now, "closed_by": o.order_id, "close_reason": o.reason}
            for o, action, r in plans if action == "close" and r is not None
        ]
        if closes:
            self.session.execute(update(Record), closes)
        withdrawn = self._withdraw_unsent([r.id for o, a, r in plans
                                           if a == "close" and r is not None])
        # 3. change log, outbox, order rows and audit events, in the order given
        changes, outbox, order_rows, events, outcomes = [], [], [], [], []
        names = tacs.device_names(self.session, {o.imei_key[:8] for o, _, _ in plans})
        opened = iter(new_ids)
        for order, action, record in plans:
            change_id: str | None = None
            if action == "open":
                record_id = next(opened)
                case_ref = order.case_ref
            else:
                assert record is not None
                record_id = record.id
                case_ref = record.case_ref or order.case_ref
            if action in ("open", "close"):
                change_id = f"{me}:{uuid.uuid4().hex}"
                # A close names the record's own keys (a lift of a range names the same ones).
                key_last = order.imei_key_last if action == "open" else record.imei_key_last  # type: ignore[union-attr]
                changes.append({
                    "imei_key": order.imei_key, "imei_key_last": key_last, "subject": "record",
                    "op": "open" if action == "open" else "close",
                    "kind": str(order.kind) if action == "open" else record.kind,  # type: ignore[union-attr]
                    "at": now,
                })
                outbox.append({
                    "change_id": change_id, "order_id": order.order_id, "record_id": record_id,
                    "action": "insert" if action == "open" else "remove",
                    "imei_key": order.imei_key, "imei_key_last": key_last,
                    "kind": str(order.kind) if action == "open" else record.kind,  # type: ignore[union-attr]
                    "reason": order.reason, "at": now, "attempts": 0,
                    "state": "cancelled" if record_id in withdrawn else "pending",
                })
            outcome = "linked" if action == "link" else "accepted"
            order_rows.append({
                "order_id": order.order_id, "kind": str(order.kind), "imei": order.imei,
                "imei_key": order.imei_key, "imei_key_last": order.imei_key_last,
                "case_ref": order.case_ref,
                "police_unit": order.police_unit, "reason": order.reason,
                "issued_at": order.issued_at, "received_at": now,
                "submitted_by": self.actor.name, "channel": self.actor.channel,
                "signed_kid": self.kid, "outcome": outcome, "record_id": record_id,
            })
            events.append(audit.Event(
                actor=self.actor.name, role=self.actor.role, action=f"order.{order.kind}",
                outcome=outcome, at=now, imei_key=order.imei_key, case_ref=order.case_ref,
                detail={"order_id": order.order_id, "record_id": record_id,
                        "imei_key_last": order.imei_key_last,
                        "change_id": change_id, "channel": self.actor.channel,
                        "kid": self.kid, "reason": order.reason},
            ))
            outcomes.append(OrderOutcome(
                order_id=order.order_id, kind=str(order.kind), imei=order.imei,
                imei_key=order.imei_key, outcome=outcome, record_id=record_id,
                case_ref=case_ref or "", change_id=change_id,
                message=(f"{order.device_text()}: lifted; its block had not left {me} yet, so "
                         "both are withdrawn and nothing goes to the registry")
                if action == "close" and record_id in withdrawn
                else message(order, action, record, me, names.get(order.imei_key[:8])),
                imei_last=order.imei_last, device=names.get(order.imei_key[:8]),
            ))
        # Core inserts (Model.__table__): the ORM's bulk path costs more than the database here.
        for model, rows in ((ChangeLog, changes), (OutboxChange, outbox), (OrderRow, order_rows)):
            for start in range(0, len(rows), 5000):
                self.session.execute(insert(model.__table__), rows[start : start + 5000])
                if progress and model is OrderRow:
                    progress(len(rows[start : start + 5000]))
        audit.append(self.session, events)
        return outcomes
