"""IMEI (International Mobile Equipment Identity), as people type it and as networks send it.

An IMEI is a TAC (8 digits, type allocation code: the device model), an SNR (6 digits, the
serial) and a Luhn check digit: 15 digits. An IMEISV replaces the check digit with a 2-digit
software version: 16 digits, no check digit (3GPP TS 23.003).

The check digit is never sent in signalling; it only catches transcription errors by people.
So there are two ways in:

* ``parse_typed()`` -- a number a person typed (police orders, CSV imports, the CLI): separators
  allowed, exactly 15 digits, and the check digit must be right.
* ``parse_network()`` -- an identity a network or the registry sent: ``imei-``/``imeisv-`` or
  bare, 14, 15 or 16 digits, no separators, and the check digit is never validated.

Both give an ``Imei`` whose ``key`` (TAC + SNR, 14 digits) is what everything stores and matches on.

More information:

* 3GPP TS 23.003 section 6.2, TS 22.016
* https://en.wikipedia.org/wiki/International_Mobile_Equipment_Identity

>>> compact('35-209900-176148-1')
'352099001761481'
>>> imei = parse_typed('35 209900 176148 1')
>>> imei.key, imei.tac, imei.snr, imei.check_digit
('35209900176148', '35209900', '176148', '1')
>>> str(imei)
'352099001761481'
>>> format('352099001761481')
'35-209900-176148-1'
>>> luhn_check_digit('49015420323751')
'8'
>>> is_valid_typed('490154203237518'), is_valid_typed('490154203237510')
(True, False)
>>> parse_typed('490154203237510')  # doctest: +ELLIPSIS
Traceback (most recent call last):
    ...
imeisync.domain.imei.InvalidChecksum: IMEI 490154203237510: check digit is 0, expected 8 — ...
>>> parse_typed('35209900176148')  # doctest: +ELLIPSIS
Traceback (most recent call last):
    ...
imeisync.domain.imei.InvalidLength: IMEI 35209900176148 has 14 digits; a police order needs ...

Networks send no check digit, or a wrong one, or an IMEISV; all of them key the same:

>>> parse_network('imeisv-3568680000414120')
Imei(key='35686800004141', check_digit=None, svn='20')
>>> parse_network('imei-012345678901234').key  # the 3GPP example: its check digit is wrong
'01234567890123'
>>> key_of_network('35686800004141') == key_of_typed('356868-000041-418')
True
>>> parse_network('imeisv-3568680000414120').full  # the check digit is computed
'356868000041418'

The attach index stores keys as integers; leading zeros survive the round trip:

>>> key_to_int('01234567890123')
1234567890123
>>> int_to_key(1234567890123)
'01234567890123'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard

from imeisync.domain.imei_errors import (
    SEPARATORS,
    InvalidChecksum,
    InvalidFormat,
    InvalidImei,
    InvalidLength,
    digit_count,
    echo,
    is_digits,
    network_error,
    quote,
    typed_format_error,
)

__all__ = [
    "Imei",
    "InvalidChecksum",
    "InvalidFormat",
    "InvalidImei",
    "InvalidLength",
    "compact",
    "format",
    "int_to_key",
    "is_key",
    "is_valid_typed",
    "key_of_network",
    "key_of_typed",
    "key_to_int",
    "luhn_check_digit",
    "parse_network",
    "parse_typed",
]


_STRIP_SEPARATORS = str.maketrans("", "", SEPARATORS)
# Luhn: a doubled digit contributes the sum of the digits of its double.
_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)
# Longer typed input is refused before looking at it: 15 digits with separators fit easily.
_MAX_TYPED_CHARS = 64
_KEY_LIMIT = 10**14

_TYPED_HINT = "copy all 15 digits from the device (dial *#06#), its box or the police report"
def luhn_check_digit(digits14: str) -> str:
    """The Luhn check digit over the 14 digits TAC + SNR.

    From the rightmost digit leftwards, every other digit (starting with the rightmost) is
    doubled and the digits of the products are added to the undoubled digits; the check digit
    is ``(10 - sum mod 10) mod 10``.

    >>> luhn_check_digit('49015420323751')
    '8'
    >>> luhn_check_digit('35209900176148')
    '1'
    """
    if len(digits14) != 14:
        raise InvalidLength(
            f"the check digit is computed over 14 digits (TAC + serial), "
            f"not {len(digits14)}: {quote(digits14)}"
        )
    if not is_digits(digits14):
        raise InvalidFormat(
            f"the check digit is computed over ASCII digits only: {quote(digits14)}"
        )
    # 14 digits: the rightmost (index 13) is doubled, so the odd indices are.
    total = sum(_DOUBLED[ord(c) - 48] for c in digits14[1::2])
    total += sum(ord(c) - 48 for c in digits14[0::2])
    return "0123456789"[-total % 10]


def compact(text: str) -> str:
    """The text without spaces, dashes, dots and slashes; nothing else is removed.

    >>> compact('35 209900/176148.1')
    '352099001761481'
    """
    return text.translate(_STRIP_SEPARATORS)


@dataclass(frozen=True, slots=True)
class Imei:
    """One device identity. ``key`` (TAC + SNR, 14 digits) is what is stored and matched on.

    ``check_digit`` is the 15th digit as given: validated when a person typed it, as sent (maybe
    a spare ``'0'``) when a network did. ``svn`` is the software version of an IMEISV.
    Equality compares all three fields: to ask "same device?", compare ``key``.

    >>> Imei('01234567890123')
    Imei(key='01234567890123', check_digit=None, svn=None)
    >>> Imei('01234567890123').full
    '012345678901237'
    """

    key: str
    check_digit: str | None = None
    svn: str | None = None

    def __post_init__(self) -> None:
        if len(self.key) != 14 or not is_digits(self.key):
            raise InvalidFormat(
                f"an IMEI key is 14 ASCII digits (TAC + serial), not {quote(self.key)}"
            )
        if self.check_digit is not None and (
            len(self.check_digit) != 1 or not is_digits(self.check_digit)
        ):
            raise InvalidFormat(f"an IMEI check digit is one ASCII digit, not {self.check_digit!r}")
        if self.svn is not None and (len(self.svn) != 2 or not is_digits(self.svn)):
            raise InvalidFormat(f"an IMEISV software version is two ASCII digits, not {self.svn!r}")

    @property
    def tac(self) -> str:
        """Type allocation code: the first 8 digits, naming the device model."""
        return self.key[:8]

    @property
    def snr(self) -> str:
        """Serial number: digits 9 to 14."""
        return self.key[8:]

    @property
    def full(self) -> str:
        """The 15-digit IMEI: the key and its *computed* check digit.

        Always computed, so it is right even when a network sent a wrong or spare 15th digit
        (``check_digit`` keeps what was sent). For typed input the two agree.
        """
        return self.key + luhn_check_digit(self.key)

    def __str__(self) -> str:
        return self.full


# parse_typed and parse_network have already checked the digits: build the Imei without
# __init__ and __post_init__ (half the cost of the attach-check parse). Slot descriptors
# write the fields directly, which the frozen __setattr__ would refuse.
_new_imei = object.__new__
_set_key = Imei.__dict__["key"].__set__
_set_check_digit = Imei.__dict__["check_digit"].__set__
_set_svn = Imei.__dict__["svn"].__set__


def _trusted(key: str, check_digit: str | None = None, svn: str | None = None) -> Imei:
    imei = _new_imei(Imei)
    _set_key(imei, key)
    _set_check_digit(imei, check_digit)
    _set_svn(imei, svn)
    return imei


def parse_typed(text: str) -> Imei:
    """An IMEI a person typed: 15 ASCII digits, separators allowed, a correct check digit.

    Raises ``InvalidFormat`` (empty, or a character other than 0-9 and `` -./``, named with
    its position in ``text``), ``InvalidLength`` (not 15 digits) or ``InvalidChecksum``.

    >>> parse_typed('35-209900-176148-1')
    Imei(key='35209900176148', check_digit='1', svn=None)
    """
    if len(text) > _MAX_TYPED_CHARS:
        raise InvalidLength(
            f"IMEI input is {len(text)} characters long ({quote(text)}); an IMEI has 15 digits",
            "enter one IMEI at a time",
        )
    digits = compact(text)
    if not digits:
        raise InvalidFormat("IMEI is empty", _TYPED_HINT, code="imei_empty")
    if not is_digits(digits):
        raise typed_format_error(text)
    n = len(digits)
    if n != 15:
        if n == 16:
            message = (
                f"IMEI {digits} has 16 digits; that looks like an IMEISV (TAC, serial and "
                "software version), which carries no check digit, and a police order needs "
                "the 15-digit IMEI"
            )
            hint = "dial *#06# on the device or read its box for the 15-digit IMEI"
        elif n < 15:
            message = (
                f"IMEI {digits} has {digit_count(n)}; a police order needs all 15, "
                "including the check digit"
            )
            hint = _TYPED_HINT
        else:
            message = f"IMEI {echo(digits)} has {n} digits; an IMEI has 15"
            hint = _TYPED_HINT
        raise InvalidLength(message, hint)
    key = digits[:14]
    got = digits[14]
    expected = luhn_check_digit(key)
    if got != expected:
        raise InvalidChecksum(
            f"IMEI {digits}: check digit is {got}, expected {expected}",
            "is a digit mistyped? compare each digit with the device (*#06#) or its box",
        )
    return _trusted(key, got)


def parse_network(text: str) -> Imei:
    """An identity a network or the registry sent; the check digit is never validated.

    Bare or prefixed: ``imei-`` with 14 or 15 digits, ``imeisv-`` with 16; bare 14 (the key),
    15 (an IMEI) or 16 (an IMEISV). No separators. Raises ``InvalidFormat`` or
    ``InvalidLength``, never ``InvalidChecksum``.

    >>> parse_network('imei-352099001761480')
    Imei(key='35209900176148', check_digit='0', svn=None)
    >>> parse_network('35209900176148')
    Imei(key='35209900176148', check_digit=None, svn=None)
    """
    # The attach-check hot path: str methods only, one slice for the key.
    if text.startswith("imei-"):
        digits = text[5:]
        n = len(digits)
        if (n == 14 or n == 15) and is_digits(digits):
            return _trusted(digits[:14], digits[14] if n == 15 else None)
    elif text.startswith("imeisv-"):
        digits = text[7:]
        if len(digits) == 16 and is_digits(digits):
            return _trusted(digits[:14], None, digits[14:])
    else:
        n = len(text)
        if 14 <= n <= 16 and is_digits(text):
            if n == 14:
                return _trusted(text)
            if n == 15:
                return _trusted(text[:14], text[14])
            return _trusted(text[:14], None, text[14:])
    raise network_error(text)


def key_of_typed(text: str) -> str:
    """The 14-digit key of a typed IMEI (validated like ``parse_typed``).

    >>> key_of_typed('35 209900 176148 1')
    '35209900176148'
    """
    return parse_typed(text).key


def key_of_network(text: str) -> str:
    """The 14-digit key of a network identity (accepted like ``parse_network``).

    >>> key_of_network('imeisv-3568680000414120')
    '35686800004141'
    """
    if text.startswith("imeisv-"):
        if len(text) == 23 and is_digits(text[7:]):
            return text[7:21]
    elif text.startswith("imei-"):
        if (len(text) == 19 or len(text) == 20) and is_digits(text[5:]):
            return text[5:19]
    elif 14 <= len(text) <= 16 and is_digits(text):
        return text[:14]
    raise network_error(text)


def format(text_or_imei: str | Imei, separator: str = "-") -> str:
    """The 15-digit IMEI split as TAC (2 + 6), serial (6), check digit (1).

    A string is parsed as typed (so it must be a valid 15-digit IMEI); an ``Imei`` is shown
    with its computed check digit, never its software version.

    >>> format('352099001761481')
    '35-209900-176148-1'
    >>> format(parse_network('imeisv-3568680000414120'), ' ')
    '35 686800 004141 8'
    """
    imei = text_or_imei if isinstance(text_or_imei, Imei) else parse_typed(text_or_imei)
    full = imei.full
    return separator.join((full[:2], full[2:8], full[8:14], full[14:]))


def is_valid_typed(text: str) -> bool:
    """Whether ``parse_typed`` would accept ``text``.

    >>> is_valid_typed('354178036859789'), is_valid_typed('354178036859781')
    (True, False)
    """
    try:
        parse_typed(text)
    except InvalidImei:
        return False
    return True


def is_key(value: object) -> TypeGuard[str]:
    """Is ``value`` a 14-digit key (TAC + serial), as peers and stored rows carry it?

    >>> is_key('49015420323751'), is_key('490154203237518'), is_key(49015420323751)
    (True, False, False)
    """
    return isinstance(value, str) and len(value) == 14 and is_digits(value)


def key_to_int(key: str) -> int:
    """The 14-digit key as an integer, for the attach index (``int_to_key`` restores it).

    >>> key_to_int('00000000000042')
    42
    """
    if not is_key(key):
        raise InvalidFormat(f"an IMEI key is 14 ASCII digits (TAC + serial), not {quote(key)}")
    return int(key)


def int_to_key(n: int) -> str:
    """The 14-digit key, zero-padded, for an integer from ``key_to_int``.

    >>> int_to_key(42)
    '00000000000042'
    """
    if not 0 <= n < _KEY_LIMIT:
        raise ValueError(f"an IMEI key is between 0 and 10**14 - 1, not {n}")
    return f"{n:014d}"


def parse_lookup(text: str) -> Imei:
    """An IMEI as a person gives it for a look-up: 15 typed digits (check digit verified, with
    separators), or what a network log shows (``imei-…``, ``imeisv-…``, 14 or 16 digits).

    >>> parse_lookup("35-209900-176148-1").key
    '35209900176148'
    >>> parse_lookup("imeisv-3520990017614820").key
    '35209900176148'
    """
    text = (text or "").strip()
    if text.lower().startswith("imei"):
        return parse_network(text)
    digits = compact(text)
    if digits.isascii() and digits.isdigit() and len(digits) in (14, 16):
        return parse_network(digits)
    return parse_typed(text)
