"""IMEI ranges: a stolen shipment of consecutive serials, blocked by one order.

A range names its first and last IMEI as a person typed them (check digits verified), inside one
TAC (a range never spans device models), first ≤ last, at most ``max_range`` devices. Stored,
pushed and matched by its 14-digit keys ``first_key``..``last_key`` (both included).

>>> r = parse_range({"first": "35209900176148-1", "last": "352099001761507"}, max_range=100)
>>> r.first_key, r.last_key, r.size
('35209900176148', '35209900176150', 3)
>>> r.covers('35209900176149'), r.covers('35209900176151')
(True, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imeisync.domain.errors import BadInput
from imeisync.domain.imei import Imei, InvalidImei, format, is_key, parse_typed

DEFAULT_MAX_RANGE = 100_000
_CODE = "malformed_range"


@dataclass(frozen=True, slots=True)
class ImeiRange:
    first: str  # 15 digits, check digit verified
    last: str
    first_key: str  # 14-digit keys, both included
    last_key: str

    @property
    def size(self) -> int:
        return int(self.last_key) - int(self.first_key) + 1

    @property
    def tac(self) -> str:
        return self.first_key[:8]

    def covers(self, key: str) -> bool:
        return self.first_key <= key <= self.last_key

    def text(self) -> str:
        """'35-209900-176148-1 … 35-209900-176150-5 (3 devices)' for messages."""
        return describe(self.first_key, self.last_key)


def describe(first_key: str, last_key: str) -> str:
    """A range of keys as people read it: both ends with check digits and the count."""
    count = int(last_key) - int(first_key) + 1
    return (f"{show_key(first_key)} … {show_key(last_key)} "
            f"({count} device{'s' if count != 1 else ''})")


def show_key(key: str) -> str:
    """A 14-digit key as people write the IMEI: with its check digit, grouped."""
    return format(Imei(key))


def overlaps(first_a: str, last_a: str, first_b: str, last_b: str) -> bool:
    """Do two key intervals (ends included) share a key? A single is first == last."""
    return first_a <= last_b and first_b <= last_a


def _end(value: Any, end: str) -> str:
    if not isinstance(value, str):
        raise BadInput(f"imei_range.{end} must be a 15-digit IMEI as text",
                       code=_CODE, field=f"imei_range.{end}")
    try:
        return parse_typed(value).key
    except InvalidImei as exc:
        raise BadInput(f"imei_range.{end}: {exc.message}", exc.hint,
                       code=_CODE, field=f"imei_range.{end}") from None


def parse_range(value: Any, *, max_range: int = DEFAULT_MAX_RANGE) -> ImeiRange:
    """Validate ``{"first": IMEI15, "last": IMEI15}``; one clear ``BadInput`` for anything off."""
    if not isinstance(value, dict) or set(value) != {"first", "last"}:
        raise BadInput("imei_range must be an object with exactly 'first' and 'last'",
                       'write it like {"first": "352099001761481", "last": "352099001762000"}',
                       code=_CODE, field="imei_range")
    first_key, last_key = _end(value["first"], "first"), _end(value["last"], "last")
    return make_range(first_key, last_key, max_range=max_range)


def make_range(first_key: str, last_key: str, *, max_range: int = DEFAULT_MAX_RANGE) -> ImeiRange:
    """The range rule on two 14-digit keys (also what the registry checks on its wire keys)."""
    if not (is_key(first_key) and is_key(last_key)):
        raise BadInput("a range's ends are 14-digit IMEI keys", code=_CODE, field="imei_range")
    if first_key[:8] != last_key[:8]:
        raise BadInput(
            f"range ends have different TACs ({first_key[:8]} and {last_key[:8]}); "
            "a range stays inside one device model",
            "split it into one range per TAC", code=_CODE, field="imei_range")
    if first_key > last_key:
        raise BadInput(
            f"range first {show_key(first_key)} comes after last {show_key(last_key)}",
            "swap them: first is the lowest serial", code=_CODE, field="imei_range")
    size = int(last_key) - int(first_key) + 1
    if size > max_range:
        raise BadInput(
            f"range of {size} devices is larger than the {max_range} allowed "
            "([police] max_range)",
            "split it, or check the serials: a typo in the first digits makes a huge range",
            code="range_too_large", field="imei_range")
    return ImeiRange(Imei(first_key).full, Imei(last_key).full, first_key, last_key)


# -- the registry's wire form: "imei" (14-digit key), or "imei_first" and "imei_last" ------

WIRE_RANGE_LIMIT = 1_000_000  # a whole TAC: what any member's [police] max_range may allow


def wire_device(key: str, last: str | None) -> dict[str, str]:
    """A change's or feed entry's device fields.

    >>> wire_device("35209900176148", None)
    {'imei': '35209900176148'}
    >>> wire_device("35209900176148", "35209900176150")
    {'imei_first': '35209900176148', 'imei_last': '35209900176150'}
    """
    return {"imei": key} if last is None else {"imei_first": key, "imei_last": last}


def parse_wire_device(data: dict[str, Any], *, max_range: int = WIRE_RANGE_LIMIT,
                      ) -> tuple[str, str | None]:
    """(key, None) for ``imei``, (first, last) for ``imei_first``/``imei_last``; ``BadInput``
    naming what is wrong (a malformed or too large range, both forms, neither)."""
    single = "imei" in data
    ranged = "imei_first" in data or "imei_last" in data
    if single == ranged:
        raise BadInput("a change names either imei or imei_first and imei_last",
                       code=_CODE, field="imei")
    if single:
        key = data["imei"]
        if not is_key(key):
            raise BadInput(f"imei {str(key)[:20]!r} is not 14 digits (TAC + serial)",
                           code=_CODE, field="imei")
        return key, None
    first, last = data.get("imei_first"), data.get("imei_last")
    if not (is_key(first) and is_key(last)):
        raise BadInput("imei_first and imei_last must both be 14 digits (TAC + serial)",
                       code=_CODE, field="imei_first")
    span = make_range(first, last, max_range=max_range)
    return span.first_key, span.last_key
