"""The configuration's values: one parser per kind of value, each returning the checked value
or raising ``TypeError``/``ValueError`` with what was expected (``imeisync.config`` adds the
file and the key). The registry's file uses the same ones (``registry.config``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from imeisync.config_sections import Listen
from imeisync.domain.errors import BadInput
from imeisync.domain.fields import COUNTRY, COUNTRY_RULE, OPERATOR_ID, OPERATOR_ID_RULE

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``30s``, ``5m``, ``2h``, ``7d`` (and ``250ms``) → seconds.

    >>> parse_duration("5m")
    300.0
    """
    match = _DURATION.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30s, 5m, 2h or 7d")
    return float(int(match.group(1)) * _DURATION_UNITS[match.group(2)])


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a string")
    return value


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
        return value.lower() in {"true", "1", "yes"}
    raise TypeError("true or false")


def integer(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise TypeError("a whole number")


def fraction(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("a fraction between 0 and 1, e.g. 0.25")
    if isinstance(value, str) and value.endswith("%"):
        value = float(value[:-1]) / 100
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError("a fraction between 0 and 1, e.g. 0.25") from None
    if not 0 <= number <= 1:
        raise TypeError("a fraction between 0 and 1, e.g. 0.25")
    return number


def check_listen(raw: Any) -> str:
    value = string(raw)
    host, sep, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))  # the servers bind addresses, not names
    except ValueError:
        host = ""
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise TypeError("IP:PORT, e.g. 127.0.0.1:8080 or [::1]:8080")
    return value


def parse_listen(value: str, what: str = "listen") -> tuple[str, int]:
    """A listen address given on a command line, checked like the config's: (host, port)."""
    try:
        check_listen(value)
    except TypeError as exc:
        raise BadInput(f"{what} {value!r} is not valid: expected {exc}") from None
    return Listen.of(value).address



def one_of(*choices: str, fold: Callable[[str], str] = str) -> Callable[[Any], str]:
    """A validator for a key that takes one of ``choices`` (after ``fold``, e.g. str.upper)."""
    expected = ", ".join(f'"{c}"' for c in choices[:-1]) + f' or "{choices[-1]}"'

    def check(raw: Any) -> str:
        value = fold(string(raw))
        if value not in choices:
            raise TypeError(expected)
        return value

    return check


status_choice = one_of("WHITELISTED", "NOT_FOUND")
log_level_choice = one_of("DEBUG", "INFO", "WARNING", "ERROR", fold=str.upper)
unknown_tac_choice = one_of("ignore", "grey", "black")
log_format_choice = one_of("kv", "json")
transport_choice = one_of("tcp", "sctp", fold=str.lower)


def check_country(raw: Any) -> str:
    value = string(raw)
    if not COUNTRY.fullmatch(value):
        raise TypeError(COUNTRY_RULE)
    return value


def check_operator_id(raw: Any) -> str:
    value = string(raw)
    if not OPERATOR_ID.fullmatch(value):
        raise TypeError(f"an operator id: {OPERATOR_ID_RULE}")
    return value


def time_of_day(raw: Any) -> str:
    value = string(raw)
    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
        raise TypeError("a time of day HH:MM, e.g. 03:30")
    return value


def at_least(parse: Callable[[Any], Any], low: float, what: str) -> Callable[[Any], Any]:
    """``parse``, then refuse values below ``low`` (an interval of 0s, a retention of 0 days)."""

    def check(value: Any) -> Any:
        parsed = parse(value)
        if parsed < low:
            raise TypeError(what)
        return parsed

    return check





def share(value: Any) -> float:
    """``[eir] per_client_share``: a fraction above 0 (0 would refuse every check)."""
    share = fraction(value)
    if share <= 0:
        raise TypeError("a fraction above 0 and at most 1, e.g. 0.5")
    return share


def listen_or_off(value: Any) -> str:
    """``[s13] listen``: IP:PORT, or empty for off."""
    return "" if string(value) == "" else check_listen(value)



_DIAMETER_IDENTITY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,253}[A-Za-z0-9])?")


def diameter_identity(raw: Any) -> str:
    value = string(raw)
    if not _DIAMETER_IDENTITY.fullmatch(value):
        raise TypeError("a host or realm name (FQDN letters, digits, '.' and '-'), "
                        "e.g. eir1.epc.mnc001.mcc238.3gppnetwork.org")
    return value


def peer_list(value: Any) -> list[str]:
    """``[s13] peers``: the Origin-Host values allowed to connect, or ``["*"]`` for any."""
    if isinstance(value, str):  # IMEISYNC_S13_PEERS="mme1.example,mme2.example"
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list):
        raise TypeError('a list of peer Origin-Host names, or ["*"] for any')
    if value == ["*"]:
        return value
    return [diameter_identity(item) for item in value]


def http_url_or_empty(raw: Any) -> str:
    """``[sightings] webhook_url``: empty (no alerts pushed) or an http(s) URL."""
    value = string(raw)
    if value and not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", value):
        raise TypeError("an http:// or https:// URL of the police unit's alert endpoint, "
                        "or empty for none")
    return value


Parser = Callable[[Any], Any]


def seconds(example: str) -> Parser:
    return at_least(parse_duration, 1, f"a duration of at least 1s, e.g. {example}")

# section -> key -> (parser, default). Paths are resolved against the config file's folder.
