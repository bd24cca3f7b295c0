"""Why a text is not an IMEI: the error classes and the messages that name the offending
character, its position and what to type instead (the slow path of ``imeisync.domain.imei``)."""

from __future__ import annotations

import unicodedata

from imeisync.domain.errors import BadInput


class InvalidImei(BadInput):
    """The text is not an acceptable IMEI. ``code`` defaults to a short reason per subclass."""

    default_code = "imei_invalid"

    def __init__(self, message: str, hint: str | None = None, *, code: str | None = None):
        super().__init__(message, hint, code=code or self.default_code, field="imei")


class InvalidFormat(InvalidImei):
    """Empty, or a character that is not an ASCII digit (or an allowed separator / prefix)."""

    default_code = "imei_format"


class InvalidLength(InvalidImei):
    """The right characters, but the wrong number of digits."""

    default_code = "imei_length"


class InvalidChecksum(InvalidImei):
    """15 digits a person typed, but the Luhn check digit does not match (a typo)."""

    default_code = "imei_checksum"


DIGITS = frozenset("0123456789")
SEPARATORS = " -./"
ECHO_CHARS = 40
# unicodedata has no names for control characters.
_CONTROL_NAMES = (
    *("NUL", "SOH", "STX", "ETX", "EOT", "ENQ", "ACK", "BEL"),
    *("BACKSPACE", "TAB", "LINE FEED", "VT", "FF", "CARRIAGE RETURN", "SO", "SI"),
    *("DLE", "DC1", "DC2", "DC3", "DC4", "NAK", "SYN", "ETB"),
    *("CAN", "EM", "SUB", "ESC", "FS", "GS", "RS", "US"),
)


def is_digits(text: str) -> bool:
    """Only the ASCII digits 0-9 (``str.isdigit`` alone also takes ``'١'`` and ``'１'``)."""
    return text.isascii() and text.isdigit()


def echo(text: str) -> str:
    """The input as it may appear in a message: at most ~40 characters."""
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "…"


def quote(text: str) -> str:
    """``repr`` of the input, so that invisible characters show, cut to ~40 characters."""
    shown = repr(text[: ECHO_CHARS + 1])
    if len(text) <= ECHO_CHARS and len(shown) <= ECHO_CHARS + 20:
        return shown
    return shown[:ECHO_CHARS] + "…"


def digit_count(n: int) -> str:
    return "1 digit" if n == 1 else f"{n} digits"


def describe(char: str) -> str:
    """``'١' (ARABIC-INDIC DIGIT ONE, U+0661)``; ASCII letters without the code point."""
    point = ord(char)
    name = unicodedata.name(char, "")
    if not name:
        if point < 32:
            name = _CONTROL_NAMES[point]
        elif point == 127:
            name = "DELETE"
        else:
            name = "unnamed character"
    if char.isascii() and char.isprintable():
        return f"{char!r} ({name})"
    return f"{char!r} ({name}, U+{point:04X})"


def hint_for(char: str) -> str:
    if not char.isascii() and unicodedata.decimal(char, None) is not None:
        return (
            f"that is the digit {unicodedata.decimal(char)} from another script; "
            "retype the IMEI with the ASCII digits 0-9"
        )
    if char in "Oo":
        return "did you mean the digit 0?"
    if char in "IilL|":
        return "did you mean the digit 1?"
    return "retype it with digits only; spaces, dashes, dots and slashes between them are fine"


def typed_format_error(text: str) -> InvalidFormat:
    """The first character of ``text`` that is neither an ASCII digit nor a separator."""
    for position, char in enumerate(text, start=1):
        if char not in DIGITS and char not in SEPARATORS:
            hint = hint_for(char)
            if text[:5].lower() in ("imei-", "imeis"):
                hint = "leave out the imei-/imeisv- prefix and type the 15 digits of the IMEI"
            return InvalidFormat(
                f"IMEI {quote(text)} has {describe(char)} at position {position}; "
                "only the digits 0-9 are allowed",
                hint,
            )
    raise AssertionError("unreachable: the compacted text was not all digits")  # pragma: no cover


def network_error(text: str) -> InvalidImei:
    """Why ``parse_network`` refused ``text`` (the slow path)."""
    if text.startswith("imeisv-"):
        prefix, digits, allowed = "imeisv-", text[7:], "16 digits"
    elif text.startswith("imei-"):
        prefix, digits, allowed = "imei-", text[5:], "14 or 15 digits"
    else:
        prefix, digits, allowed = "", text, "14, 15 or 16 digits"
    if not text:
        return InvalidFormat("IMEI is empty", code="imei_empty")
    if not digits:
        return InvalidFormat(f"IMEI {quote(text)} has no digits after {prefix!r}")
    if not is_digits(digits):
        head, sep, _ = text.partition("-")
        if not prefix and sep and head.lower() in ("imei", "imeisv"):
            return InvalidFormat(
                f"IMEI {quote(text)} has an upper-case prefix; "
                "networks send imei- or imeisv- in lower case"
            )
        if not prefix and sep and head and head.isascii() and head.isalpha():
            return InvalidFormat(
                f"PEI {quote(text)} is a {head}- identity, not an IMEI; "
                "only imei- and imeisv- identities are checked",
                code="pei_not_imei",
            )
        position, char = next((i, c) for i, c in enumerate(digits, 1) if c not in DIGITS)
        return InvalidFormat(
            f"IMEI {quote(text)} has {describe(char)} at position {position + len(prefix)}; "
            f"expected {allowed}, optionally after imei- or imeisv-"
        )
    return InvalidLength(
        f"IMEI {echo(text)} has {digit_count(len(digits))}; "
        f"{prefix or 'a bare IMEI'} needs {allowed}"
    )


# Their public home is ``imeisync.domain.imei`` (callers and tracebacks name them there).
for _error in (InvalidImei, InvalidFormat, InvalidLength, InvalidChecksum):
    _error.__module__ = "imeisync.domain.imei"
