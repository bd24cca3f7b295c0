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
