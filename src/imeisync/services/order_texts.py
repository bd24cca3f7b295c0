"""What order intake tells people: the one-line refusals and confirmations of ``orders``."""

from __future__ import annotations

from imeisync.domain.errors import Refused
from imeisync.domain.orders import Order, OrderKind
from imeisync.domain.ranges import describe
from imeisync.store.models import Record


def not_owner(order: Order, owners: str, me: str) -> Refused:
    return Refused(
        f"{order.device_text()} is blocked by {owners}, not by {me}; "
        "only the operator that reported a device may delete its record",
        "the police must ask that operator to delete it; you can file a dispute "
        "so that it reviews its record",
        code="not_owner",
    )


def no_record(order: Order, me: str) -> Refused:
    return Refused(
        f"{order.device_text()} has no open record of {me}; there is nothing to lift",
        "check the IMEI and its history with `imeisync show IMEI`",
        code="no_record",
    )


def part_of_range(order: Order, record: Record, me: str) -> Refused:
    """A lift naming part of a range: a range is lifted whole, by the range or its order."""
    span = describe(record.imei_key, record.imei_key_last or record.imei_key)
    return Refused(
        f"{order.device_text()} is inside {me}'s IMEI range {span}, opened by order "
        f"{record.opened_by} (case {record.case_ref}); a range is lifted as a whole",
        'lift the whole range with a police order naming "imei_range" {first, last} as '
        "blocked, then block the devices that stay stolen",
        code="inside_range",
    )


def message(order: Order, action: str, record: Record | None, me: str,
            name: str | None = None) -> str:
    """The confirmation; ``name`` is the device model from the TAC table, where known."""
    device = order.device_text() + (f" ({name})" if name else "")
    if action == "open":
        doing = "blocked" if order.kind is OrderKind.BLOCK else "tracked (greylisted)"
        return (f"{device} {doing} under case {order.case_ref}; "
                "queued for the registry")
    assert record is not None
    since = f"{record.opened_at:%Y-%m-%d %H:%M}Z"
    within = ("" if record.imei_key_last is None or order.is_range else
              f" (inside range {describe(record.imei_key, record.imei_key_last)} of order "
              f"{record.opened_by})")
    if action == "link":
        doing = "blocked" if record.kind == "block" else "tracked"
        return (f"{device} was already {doing} by {me} since {since} under case "
                f"{record.case_ref}{within}; order {order.order_id} (case {order.case_ref}) is "
                "linked to that record, nothing else changed")
    return (f"{device}: {me}'s record (case {record.case_ref}, since {since}) lifted, "
            f"reason {order.reason}; queued for the registry")
