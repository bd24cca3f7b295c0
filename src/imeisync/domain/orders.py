"""Police orders: the payload's schema and the checks that need no database.

A police order arrives signed (JWS) or, for blocks where policy allows, unsigned from
authenticated liaison staff. Either way it becomes an ``Order`` only through ``parse_order``,
which refuses anything outside the schema with one line naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from imeisync.domain.errors import BadInput, Refused
from imeisync.domain.fields import (
    CASE_REF,
    LIFT_REASONS,
    NOTE,
    OPENING_REASONS,
    ORDER_ID,
    POLICE_UNIT,
    Text,
    text,
)
from imeisync.domain.imei import parse_typed
from imeisync.domain.ranges import DEFAULT_MAX_RANGE, describe, parse_range


class OrderKind(StrEnum):
    BLOCK = "block"  # refuse the device on the network (BLACKLISTED)
    TRACK = "track"  # let it attach but report it GREYLISTED, for police tracing a phone
    LIFT = "lift"  # close this operator's open record, at the police's request


# The device: ``imei``, or ``imei_range`` {first, last} for a shipment (one of the two).
_REQUIRED = ("order_id", "kind", "case_ref", "police_unit", "reason", "issued_at")
_OPTIONAL = ("note", "imei", "imei_range")
# A police clock a little ahead of ours is normal; an order from tomorrow is not.
CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    kind: OrderKind
    imei: str  # the full 15 digits as the police wrote them (check digit verified)
    imei_key: str  # the 14-digit key everything matches on
    case_ref: str
    police_unit: str
    reason: str
    issued_at: datetime
    note: str | None = None
    # A range order: ``imei``/``imei_key`` are its first device, these its last (included).
    imei_last: str | None = None
    imei_key_last: str | None = None

    @property
    def opens_record(self) -> bool:
        return self.kind is not OrderKind.LIFT

    @property
    def is_range(self) -> bool:
        return self.imei_key_last is not None

    @property
    def last_key(self) -> str:
        """The last key the order covers (its own key for a single IMEI)."""
        return self.imei_key_last or self.imei_key

    def device_text(self) -> str:
        """'IMEI 35-209900-176148-1' or 'IMEI range 35-… … 35-… (3 devices)' for messages."""
        from imeisync.domain.imei import format

        if self.imei_key_last is None:
            return f"IMEI {format(self.imei)}"
        return f"IMEI range {describe(self.imei_key, self.imei_key_last)}"


_TEXTS = {rule.name: rule for rule in (CASE_REF, POLICE_UNIT, NOTE)}


def _text(payload: dict[str, Any], name: str) -> str:
    return text(payload.get(name), _TEXTS.get(name) or Text(name), code="malformed_order")


def _optional_text(payload: dict[str, Any], name: str) -> str | None:
    return None if payload.get(name) is None else _text(payload, name)


def parse_timestamp(value: str, field: str = "issued_at") -> datetime:
    """RFC 3339 with an explicit offset (``2026-11-21T10:00:00Z``), as UTC."""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        if moment.tzinfo is not None:
            moment.astimezone(UTC)  # the year-1 or year-9999 edge, off the calendar in UTC
    except (ValueError, OverflowError):
        moment = None
    if moment is None or moment.tzinfo is None or "T" not in value.upper():
        raise BadInput(
            f"order field {field!r} = {value[:40]!r} is not an RFC 3339 time with a time zone",
            "write it like 2026-11-21T10:00:00Z",
            code="malformed_order", field=field,
        )
    return moment.astimezone(UTC)


def parse_order(
    payload: Any,
    *,
    now: datetime,
    max_age: timedelta,
    max_range: int = DEFAULT_MAX_RANGE,
) -> Order:
    """Validate an order payload (signed or not) into an ``Order``; raise on anything off."""
    if not isinstance(payload, dict):
        raise BadInput("an order must be a JSON object", code="malformed_order")
    unknown = sorted(set(payload) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise BadInput(
            f"order has unknown field(s): {', '.join(repr(u)[:40] for u in unknown[:5])}",
            f"an order has exactly: {', '.join(_REQUIRED)}, imei or imei_range "
            "(and optionally note)",
            code="malformed_order",
        )
    missing = [name for name in _REQUIRED if name not in payload]
    if missing:
        raise BadInput(
            f"order is missing field(s): {', '.join(missing)}",
            f"an order has: {', '.join(_REQUIRED)}",
            code="malformed_order",
        )
    order_id = _text(payload, "order_id")
    assert order_id is not None
    if not ORDER_ID.fullmatch(order_id):
        raise BadInput(
            f"order_id {order_id[:40]!r} is not valid",
            "use at most 128 letters, digits and . _ : / - (starting with a letter or digit)",
            code="malformed_order",
        )
    kind_text = _text(payload, "kind")
    try:
        kind = OrderKind(kind_text)
    except ValueError:
        raise BadInput(
            f"order kind {kind_text[:20]!r} is not one of block, track, lift",
            code="malformed_order", field="kind",
        ) from None
    if ("imei" in payload) == ("imei_range" in payload):
        raise BadInput(
            "an order names its device with exactly one of 'imei' and 'imei_range'",
            'a single device: "imei": "352099001761481"; a shipment: '
            '"imei_range": {"first": …, "last": …}',
            code="malformed_order", field="imei",
        )
    if "imei_range" in payload:
        span = parse_range(payload["imei_range"], max_range=max_range)
        imei_full, imei_key = span.first, span.first_key
        imei_last, key_last = span.last, span.last_key
    else:
        imei = parse_typed(_text(payload, "imei"))
        imei_full, imei_key, imei_last, key_last = imei.full, imei.key, None, None
    reason = _text(payload, "reason")
    allowed = LIFT_REASONS if kind is OrderKind.LIFT else OPENING_REASONS
    if reason not in allowed:
        raise BadInput(
            f"reason {reason[:30]!r} is not valid for a {kind} order",
            f"use one of: {', '.join(allowed)}",
            code="malformed_order", field="reason",
        )
    issued_text = _text(payload, "issued_at")
    issued_at = parse_timestamp(issued_text)
    if issued_at > now + CLOCK_SKEW:
        raise Refused(
            f"order {order_id} is dated {issued_at:%Y-%m-%d %H:%M}Z, in the future",
            "check the issuing system's clock and have the order issued again",
            code="order_in_future",
        )
    if now - issued_at > max_age:
        raise Refused(
            f"order {order_id} was issued {issued_at:%Y-%m-%d %H:%M}Z, older than the "
            f"{_human(max_age)} this operator accepts",
            "ask the police for a fresh order",
            code="order_too_old",
        )
    return Order(
        order_id=order_id,
        kind=kind,
        imei=imei_full,
        imei_key=imei_key,
        case_ref=_text(payload, "case_ref"),
        police_unit=_text(payload, "police_unit"),
        reason=reason,
        issued_at=issued_at,
        note=_optional_text(payload, "note"),
        imei_last=imei_last,
        imei_key_last=key_last,
    )


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} seconds"
