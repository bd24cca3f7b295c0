"""What the N5g-eir attach check answers, encoded once, and how it reads its query.

Answers are ``(status, headers, body)`` triples in the shape Granian's RSGI
``response_bytes`` takes, built at import or at app creation, never per request.

The query of ``GET …/equipment-status`` (TS 29.511 §6.2.3.2.3.1) has four parameters: ``pei``
(mandatory), ``supi``, ``gpsi`` and ``supported-features`` (optional). Errors carry the causes
of TS 29.500 Table 5.2.7.2-1 (Rel-16 on), checked in this order:

* no ``pei`` → 400 ``MANDATORY_QUERY_PARAM_MISSING``;
* ``pei`` malformed or given twice → 400 ``MANDATORY_QUERY_PARAM_INCORRECT``;
* a parameter TS 29.511 does not define for this operation (anything but the four above) →
  400 ``INVALID_QUERY_PARAM`` ("the HTTP request contains an unsupported query parameter");
* ``supi`` empty, given twice, or neither ``imsi-<5..15 digits>`` nor ``nai-<something>``;
  ``gpsi`` empty or given twice; ``supported-features`` not hexadecimal (TS 29.571
  ``SupportedFeatures``: ``^[A-Fa-f0-9]*$``, so empty is allowed) → 400
  ``OPTIONAL_QUERY_PARAM_INCORRECT`` naming every such parameter.

Every error names its parameters in ``invalidParams`` (``{"param": "query supi", …}``).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote_plus

from imeisync.domain.errors import BadInput
from imeisync.domain.imei import key_of_network
from imeisync.entrypoints.admission import RETRY_AFTER

Answer = tuple[int, list[tuple[str, str]], bytes]

JSON = "application/json"
PROBLEM = "application/problem+json"
PARAMETERS = ("pei", "supi", "gpsi", "supported-features")
_HEX = frozenset("0123456789abcdefABCDEF")
_ECHO = 64  # characters of an unsupported parameter's name echoed back

_TITLES = {400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           500: "Internal Server Error", 503: "Service Unavailable"}


def response(status: int, body: bytes, content_type: str = JSON,
             extra: tuple[tuple[str, str], ...] = ()) -> Answer:
    return status, [("content-type", content_type), ("content-length", str(len(body))),
                    *extra], body


def problem(status: int, cause: str, detail: str,
            invalid: list[dict[str, str]] | None = None,
            extra: tuple[tuple[str, str], ...] = ()) -> Answer:
    """A TS 29.500 ProblemDetails answer."""
    body: dict[str, Any] = {
        "type": f"https://imeisync.invalid/problems/{cause.lower().replace('_', '-')}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "cause": cause,
    }
    if invalid:
        body["invalidParams"] = invalid
    return response(status, json.dumps(body, ensure_ascii=False).encode(), PROBLEM, extra)


def status_answer(status: str) -> Answer:
    return response(200, json.dumps({"status": status}, separators=(",", ":")).encode())


R_NOT_FOUND = problem(404, "ERROR_EQUIPMENT_UNKNOWN",
                      "the equipment identified by pei is not known to this EIR")
R_PEI_MISSING = problem(400, "MANDATORY_QUERY_PARAM_MISSING",
                        "the query parameter pei is required",
                        [{"param": "query pei", "reason": "missing"}])
R_METHOD = problem(405, "METHOD_NOT_ALLOWED", "equipment-status only supports GET",
                   extra=(("allow", "GET"),))
R_FAULT = problem(500, "SYSTEM_FAILURE", "the EIR failed to answer; the fault has been logged")
R_NOT_READY = problem(503, "NF_CONGESTION",
                      "the EIR is starting and has no blocklist in memory yet; retry shortly",
                      extra=(("retry-after", "1"),))
R_CONGESTED = problem(503, "NF_CONGESTION",
                      "this EIR worker has more attach checks queued than [eir] max_inflight, "
                      "or this client more than its [eir] per_client_share of them; retry",
                      extra=(("retry-after", str(RETRY_AFTER)),))
R_NO_ROUTE = problem(404, "RESOURCE_URI_STRUCTURE_NOT_FOUND", "no such resource")


class Refused(Exception):
    """A query the attach check answers with a 400 (``answer``) instead of a verdict."""

    def __init__(self, answer: Answer):
        super().__init__(answer[0])
        self.answer = answer


def _refuse(cause: str, detail: str, invalid: list[tuple[str, str]]) -> Refused:
    return Refused(problem(400, cause, detail,
                           [{"param": f"query {name}", "reason": why} for name, why in invalid]))


_TWICE = "\x00twice"  # marks a parameter given more than once (no real value contains NUL)
_UNDECODABLE = "\x00undecodable"


def _unquote(text: str) -> str:
    try:
        return unquote_plus(text, errors="strict")
    except UnicodeDecodeError:
        return _UNDECODABLE


def read_query(query: str) -> tuple[int, str | None]:
    """The index key of ``pei`` and the IMSI of ``supi`` (None unless ``imsi-``); raises
    ``Refused`` with the 400 answer for anything TS 29.511 does not allow.

    >>> read_query("pei=imeisv-3568680000414120&supi=imsi-238010000000001")
    (35686800004141, '238010000000001')
    >>> try:
    ...     read_query("pei=imei-35209900176148&supi=imsi-12&supported-features=zz")
    ... except Refused as refused:
    ...     body = json.loads(refused.answer[2])
    >>> body["cause"], [p["param"] for p in body["invalidParams"]]
    ('OPTIONAL_QUERY_PARAM_INCORRECT', ['query supi', 'query supported-features'])
    """
    if "%" not in query and "+" not in query:
        # What AMFs send (``pei=…`` or ``pei=…&supi=…``): read without splitting the rest.
        first, more, rest = query.partition("&")
        if first.startswith("pei=") and (not more or (rest.startswith("supi=")
                                                       and "&" not in rest)):
            key = _pei_key(first[4:])
            if not more:
                return key, None
            imsi, wrong = _supi_imsi(rest[5:])
            if wrong is None:
                return key, imsi
    return _read_all(query)


def _read_all(query: str) -> tuple[int, str | None]:
    """Every parameter, in any order, percent-encoded or not (``read_query``'s general case)."""
    encoded = "%" in query or "+" in query
    pei = supi = gpsi = features = None
    unsupported: list[str] = []
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if encoded:
            name, value = _unquote(name), _unquote(value)
        if name == "pei":
            pei = value if pei is None else _TWICE
        elif name == "supi":
            supi = value if supi is None else _TWICE
        elif name == "gpsi":
            gpsi = value if gpsi is None else _TWICE
        elif name == "supported-features":
            features = value if features is None else _TWICE
        else:
            unsupported.append(name)
    if pei is None:
        raise Refused(R_PEI_MISSING)
    key = _pei_key(pei)
    if unsupported:
        names = [name[:_ECHO] if name != _UNDECODABLE else "(not UTF-8)" for name in unsupported]
        raise _refuse("INVALID_QUERY_PARAM",
                      f"equipment-status does not support the query parameter(s) "
                      f"{', '.join(names)}; TS 29.511 defines {', '.join(PARAMETERS)}",
                      [(name, "not a parameter of this operation") for name in names])
    imsi, wrong = None, []
    if supi is not None:
        imsi, why = _supi_imsi(supi)
        if why is not None:
            wrong.append(("supi", why))
    if gpsi is not None and gpsi in ("", _TWICE, _UNDECODABLE):
        wrong.append(("gpsi", _why(gpsi, "")))
    if features is not None and not (features.isascii() and _HEX.issuperset(features)):
        wrong.append(("supported-features", _why(features, "not hexadecimal digits")))
    if wrong:
        raise _refuse("OPTIONAL_QUERY_PARAM_INCORRECT",
                      f"query parameter(s) {', '.join(n for n, _ in wrong)} malformed", wrong)
    return key, imsi


def _pei_key(pei: str) -> int:
    try:
        if pei in (_TWICE, _UNDECODABLE):
            raise BadInput(_why(pei, ""))
        return int(key_of_network(pei))  # 14 ASCII digits by then: no second check needed
    except BadInput as exc:
        raise _refuse("MANDATORY_QUERY_PARAM_INCORRECT",
                      f"query parameter pei is invalid: {exc.message}",
                      [("pei", exc.message)]) from None


def _supi_imsi(supi: str) -> tuple[str | None, str | None]:
    """(the IMSI of an ``imsi-`` SUPI, None) or (None, None) for a ``nai-`` one, or
    (None, why it is malformed)."""
    if supi.startswith("imsi-"):
        digits = supi[5:]
        if 5 <= len(digits) <= 15 and digits.isascii() and digits.isdigit():
            return digits, None
    elif supi.startswith("nai-") and len(supi) > 4 and supi.isprintable():
        return None, None
    return None, _why(supi, "neither imsi- followed by 5 to 15 digits nor nai- followed by a "
                            "network access identifier")


def _why(value: str, reason: str) -> str:
    if value == _TWICE:
        return "given more than once"
    if value == _UNDECODABLE:
        return "not valid percent-encoded UTF-8"
    return reason if value else "empty"
