"""Accepting police orders: verify, decide under the ownership rule, write in one transaction.

An order is either accepted durably — its record opened or closed, one outbox change for the
registry, its order row and its audit event, all in one serialised transaction — or refused
with one line saying why. A refusal by a rule (replay, not the owner, bad signature, too old)
leaves an order row and an audit event so that forged or mistaken orders are visible; it never
touches records or the outbox. Malformed input (not an order at all) writes nothing.

Single orders and CSV batches go through the same ``apply`` so there is one set of rules.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError

from imeisync.adapters.data_crypto import DataCipher
from imeisync.adapters.police_jws import TrustedKeys, verify_order
from imeisync.domain.errors import ImeisyncError, Refused, Unavailable
from imeisync.domain.imei import format as format_imei
from imeisync.domain.orders import Order, parse_order
from imeisync.domain.ranges import DEFAULT_MAX_RANGE
from imeisync.domain.times import rfc3339
from imeisync.services import audit, tacs
from imeisync.services.order_batch import Actor, BatchRefused, OrderBatch, OrderOutcome
from imeisync.store.db import Database
from imeisync.store.models import Order as OrderRow

__all__ = ["Actor", "BatchRefused", "OrderIntake", "OrderOutcome"]

log = logging.getLogger(__name__)


class OrderIntake:
    def __init__(
        self,
        db: Database,
        *,
        operator_id: str,
        operator_country: str,
        trusted_keys: Callable[[], TrustedKeys],
        cipher: Callable[[], DataCipher],
        allow_unsigned_blocks: bool = True,
        max_order_age: timedelta = timedelta(days=7),
        max_range: int = DEFAULT_MAX_RANGE,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self.db = db
        self.operator_id = operator_id
        self.operator_country = operator_country
        self._trusted_keys = trusted_keys  # loaded lazily: a block needs no police keys
        self._cipher = cipher  # loaded lazily: only orders with notes need the data key
        self.allow_unsigned_blocks = allow_unsigned_blocks
        self.max_order_age = max_order_age
        self.max_range = max_range
        self.clock = clock

    # -- entry points ---------------------------------------------------------------------

    def submit_signed(self, token: str, actor: Actor, *, unknown_tac_ok: bool = False,
                      ) -> OrderOutcome:
        """A police order as a compact JWS: the signature decides who issued it."""
        now = self.clock()
        try:
            verified = verify_order(token, self._trusted_keys())
        except Refused as exc:
            self._record_refusal(actor, exc, now=now)
            raise
        order = self._parse(verified.payload, now, actor, kid=verified.kid)
        return self._apply_one(order, actor, kid=verified.kid, now=now,
                               unknown_tac_ok=unknown_tac_ok)

    def submit_unsigned(self, payload: dict[str, Any], actor: Actor, *,
                        unknown_tac_ok: bool = False) -> OrderOutcome:
        """A block entered by liaison staff from a police report, where policy allows it."""
        now = self.clock()
        payload = dict(payload)
        payload.setdefault("order_id", f"staff-{uuid.uuid4().hex[:20]}")
        payload.setdefault("issued_at", rfc3339(now))
        payload.setdefault("kind", "block")
        order = self._parse(payload, now, actor, kid=None)
        return self._apply_one(order, actor, kid=None, now=now, unknown_tac_ok=unknown_tac_ok)

    def apply(
        self, orders: Sequence[Order], actor: Actor, *, kid: str | None = None,
        progress: Callable[[int], None] | None = None, unknown_tac_ok: bool = False,
    ) -> list[OrderOutcome]:
        """Apply validated orders all together or not at all (raises ``BatchRefused``).

        A block or track whose TAC a loaded TAC table lacks is refused (likely mistyped)
        unless ``unknown_tac_ok`` says the person confirmed the number.

        ``kid`` names the police key that signed them; None means entered by staff unsigned,
        which only a block may be, and only where policy allows. Checked here so that every
        way in (CLI, CSV import, API, console) obeys it.
        """
        if kid is None and not self.allow_unsigned_blocks:
            raise Refused(
                "this operator's policy does not accept unsigned blocks "
                "([police] allow_unsigned_blocks = false)",
                "submit the police's signed order with `imeisync order submit FILE`",
                code="signature_required",
            )
        try:
            with self.db.write() as session:
                session.connection()  # begins the transaction: the writer lock is held now
                # Read the clock under the lock, so that times follow the commit order: a
                # writer that waited must not stamp a close before the open it came after.
                now = self.clock()
                tacs.check_known(session, {o.imei_key[:8]: format_imei(o.imei) for o in orders
                                           if o.opens_record}, confirmed=unknown_tac_ok)
                outcomes = OrderBatch(
                    session, actor, kid, now, operator_id=self.operator_id,
                    operator_country=self.operator_country, cipher=self._cipher,
                ).run(orders, progress)
        except IntegrityError:
            # Writes are serialised, so this means another writer bypassed the lock.
            raise Refused(
                "another order for the same device was accepted at the same moment",
                "look at the device with `imeisync show IMEI` and submit again if still needed",
                code="conflict",
            ) from None
        return outcomes

    # -- helpers --------------------------------------------------------------------------

    def _parse(self, payload: Any, now: datetime, actor: Actor, kid: str | None) -> Order:
        try:
            return parse_order(payload, now=now, max_age=self.max_order_age,
                               max_range=self.max_range)
        except Refused as exc:  # well-formed but refused (too old, from the future)
            self._record_refusal(actor, exc, now=now, payload=payload, kid=kid)
            raise

    def _apply_one(
        self, order: Order, actor: Actor, *, kid: str | None, now: datetime,
        unknown_tac_ok: bool = False,
    ) -> OrderOutcome:
        try:
            return self.apply([order], actor, kid=kid, unknown_tac_ok=unknown_tac_ok)[0]
        except BatchRefused as exc:
            error: ImeisyncError = exc.problems[0][1]
        except Refused as exc:
            error = exc
        self._record_refusal(actor, error, now=now, order=order, kid=kid)
        raise error from None

    def _record_refusal(
        self,
        actor: Actor,
        error: ImeisyncError,
        *,
        now: datetime,
        order: Order | None = None,
        payload: Any = None,
        kid: str | None = None,
    ) -> None:
        fields: dict[str, Any] = {}
        if order is not None:
            fields = {
                "order_id": order.order_id, "kind": str(order.kind), "imei": order.imei,
                "imei_key": order.imei_key, "imei_key_last": order.imei_key_last,
                "case_ref": order.case_ref, "police_unit": order.police_unit,
                "reason": order.reason, "issued_at": order.issued_at,
            }
        elif isinstance(payload, dict) and isinstance(payload.get("order_id"), str):
            fields = {"order_id": payload["order_id"][:128]}
        try:
            with self.db.write() as session:
                session.execute(
                    insert(OrderRow).values(
                        **fields, received_at=now, submitted_by=actor.name, channel=actor.channel,
                        signed_kid=kid, outcome="refused", refusal_code=error.code,
                        refusal_message=str(error)[:2000],
                    )
                )
                audit.append(session, [audit.Event(
                    actor=actor.name, role=actor.role, action="order.refused", outcome="refused",
                    at=now, imei_key=fields.get("imei_key"), case_ref=fields.get("case_ref"),
                    detail={"order_id": fields.get("order_id"), "code": error.code,
                            "channel": actor.channel, "kid": kid},
                )])
        except Unavailable as exc:
            # The refusal stands either way; the person hears about it, the log about this.
            log.warning("refusal of an order could not be recorded: %s", exc)
