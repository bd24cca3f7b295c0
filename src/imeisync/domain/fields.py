r"""The rules for the fields that orders, exceptions, disputes and the registry's feed carry,
each written once, with errors that name their field (``error.field``).

Every check raises ``BadInput`` with the caller's ``code`` (the outside contract names codes
per surface: ``malformed_order`` for orders, ``malformed`` at the registry...), so one rule
serves every surface without changing what each surface answers.

Free text follows one rule: a one-line field (a case reference, a police unit) holds no
control character at all — not a tab, not a newline, not DEL; a multi-line field (a note, a
dispute's reason) may hold newlines and tabs and no other control character.

>>> def refusal(check, *args):
...     try:
...         check(*args)
...     except BadInput as error:
...         return error.field, error.message
>>> text(" CPH-2026-7 ", CASE_REF)
'CPH-2026-7'
>>> refusal(text, "CPH\t7", CASE_REF)
('case_ref', "field 'case_ref' contains control characters")
>>> refusal(text, "CPH\x7f7", CASE_REF)
('case_ref', "field 'case_ref' contains control characters")
>>> text("seen at\tthe shop\nby staff", REASON)
'seen at\tthe shop\nby staff'
>>> refusal(text, "bell\x07", REASON)
('reason', "field 'reason' contains control characters")
>>> refusal(text, "   ", POLICE_UNIT)
('police_unit', "field 'police_unit' is empty")
>>> refusal(text, "x" * 65, CASE_REF)
('case_ref', "field 'case_ref' is 65 characters; at most 64 are allowed")
>>> refusal(text, 7, CASE_REF)
('case_ref', "field 'case_ref' must be text, got int")
>>> operator_id("op-dk")
'op-dk'
>>> refusal(operator_id, "op dk", "filer")
('filer', "field 'filer' = 'op dk' is not an operator id")
>>> refusal(country, "dk")
('country', "field 'country' = 'dk' is not a country code")
>>> imsi('imsi-238 01 0000000001')
'238010000000001'
>>> refusal(imsi, '2380')
('imsi', 'IMSI 2380 has 4 digits; an IMSI has 5 to 15')
>>> try:
...     text("", CASE_REF, code="malformed_order")
... except BadInput as error:
...     (error.field, error.code)
('case_ref', 'malformed_order')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from imeisync.domain.errors import BadInput

# How operators are named, at the registry and in every record's owner: also the key id of
# their request signatures (and so a file name: no slashes, no leading dot, at most 64).
OPERATOR_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
OPERATOR_ID_RULE = "letters, digits, '.', '_' or '-' (at most 64), starting with a letter or digit"
COUNTRY = re.compile(r"[A-Z]{2}")
COUNTRY_RULE = "an ISO 3166 two-letter country code in capitals, e.g. DK"
# The registry's change and dispute ids (an order id is the same shape, longer: ORDER_ID).
REFERENCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,79}")
ORDER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")

OPENING_REASONS = ("stolen", "lost", "fraud")
LIFT_REASONS = ("recovered", "wrongly_reported", "other")

_ONE_LINE_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MULTI_LINE_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # newline and tab are fine


@dataclass(frozen=True, slots=True)
class Text:
    """A free-text field: its name, its bound (outside input: a 10 MB case reference is
    refused, not stored) and whether it may break lines."""

    name: str
    limit: int | None = None
    multiline: bool = False


CASE_REF = Text("case_ref", 64)
POLICE_UNIT = Text("police_unit", 128)
NOTE = Text("note", 2000, multiline=True)
REASON = Text("reason", 2000, multiline=True)  # a dispute's reason or an answer's


def text(raw: Any, rule: Text, *, code: str = "malformed") -> str:
    """``raw`` stripped, if it is text that keeps ``rule``; else ``BadInput`` naming it."""
    name = rule.name
    if not isinstance(raw, str):
        raise BadInput(f"field {name!r} must be text, got {type(raw).__name__}",
                       code=code, field=name)
    value = raw.strip()
    if not value:
        raise BadInput(f"field {name!r} is empty", code=code, field=name)
    if rule.limit is not None and len(value) > rule.limit:
        raise BadInput(f"field {name!r} is {len(value)} characters; at most {rule.limit} "
                       "are allowed", code=code, field=name)
    if (_MULTI_LINE_CONTROL if rule.multiline else _ONE_LINE_CONTROL).search(value):
        raise BadInput(f"field {name!r} contains control characters",
                       "only newlines and tabs may break the text" if rule.multiline
                       else "write it on one line, without tabs", code=code, field=name)
    return value


def operator_id(value: Any, name: str = "owner", *, code: str = "malformed") -> str:
    """An operator id (``OPERATOR_ID``), as sent; ``BadInput`` naming ``name`` otherwise."""
    if not isinstance(value, str) or not OPERATOR_ID.fullmatch(value):
        raise BadInput(f"field {name!r} = {str(value)[:30]!r} is not an operator id",
                       OPERATOR_ID_RULE, code=code, field=name)
    return value


def country(value: Any, name: str = "country", *, code: str = "malformed") -> str:
    """An ISO 3166 alpha-2 code in capitals; ``BadInput`` naming ``name`` otherwise."""
    if not isinstance(value, str) or not COUNTRY.fullmatch(value):
        raise BadInput(f"field {name!r} = {str(value)[:10]!r} is not a country code",
                       COUNTRY_RULE, code=code, field=name)
    return value


def imsi(value: str) -> str:
    """An IMSI as typed: 5 to 15 ASCII digits, ``imsi-`` prefix and spaces tolerated."""
    digits = value.strip().removeprefix("imsi-").replace(" ", "")
    if not (digits.isascii() and digits.isdigit()):
        raise BadInput(f"IMSI {value[:40]!r} is not all digits",
                       "an IMSI is 5 to 15 digits (MCC, MNC, subscriber number)",
                       code="imsi_format", field="imsi")
    if not 5 <= len(digits) <= 15:
        raise BadInput(f"IMSI {digits[:40]} has {len(digits)} digits; an IMSI has 5 to 15",
                       "copy it from the subscriber's record", code="imsi_length", field="imsi")
    return digits
