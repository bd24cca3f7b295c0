"""The Diameter wire format (RFC 6733 §3, §4): headers and AVPs, read with strict bounds.

Only what an S13 EIR needs: about fifteen AVPs, read in place from the received bytes (offsets,
not copies) and written from pre-encoded pieces. Every length is checked before it is used:

* a message: version 1, length a multiple of 4, at least 20 bytes, at most ``MAX_MESSAGE``
  (``FramingError``: the stream cannot be trusted after it, the connection is closed);
* an AVP: at least its header, inside its message or grouped AVP (``AvpError`` with the
  result code and the offending AVP for Failed-AVP, RFC 6733 §7.5);
* grouped AVPs are decoded only where they are read, at most ``MAX_DEPTH`` levels deep.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

# -- numbers -------------------------------------------------------------------------------

VERSION = 1
HEADER_LEN = 20
MAX_MESSAGE = 65_536  # an ECR is ~300 bytes, a CER with many addresses a few KB
MAX_DEPTH = 8

# Command flags (RFC 6733 §3)
FLAG_R = 0x80
FLAG_P = 0x40
FLAG_E = 0x20
FLAG_T = 0x10
# AVP flags (§4.1)
AVP_V = 0x80
AVP_M = 0x40

CMD_CER = 257
CMD_DWR = 280
CMD_DPR = 282
CMD_ECR = 324  # 3GPP-ME-Identity-Check (TS 29.272 §7.2.19)

APP_BASE = 0
APP_S13 = 16777252
APP_RELAY = 0xFFFFFFFF
VENDOR_3GPP = 10415

# Base AVP codes (RFC 6733 §4.5)
USER_NAME = 1
PROXY_STATE = 33
HOST_IP_ADDRESS = 257
AUTH_APPLICATION_ID = 258
ACCT_APPLICATION_ID = 259
VENDOR_SPECIFIC_APPLICATION_ID = 260
SESSION_ID = 263
ORIGIN_HOST = 264
SUPPORTED_VENDOR_ID = 265
VENDOR_ID = 266
FIRMWARE_REVISION = 267
RESULT_CODE = 268
PRODUCT_NAME = 269
DISCONNECT_CAUSE = 273
AUTH_SESSION_STATE = 277
ORIGIN_STATE_ID = 278
FAILED_AVP = 279
PROXY_HOST = 280
ERROR_MESSAGE = 281
ROUTE_RECORD = 282
DESTINATION_REALM = 283
PROXY_INFO = 284
DESTINATION_HOST = 293
ORIGIN_REALM = 296
EXPERIMENTAL_RESULT = 297
EXPERIMENTAL_RESULT_CODE = 298
INBAND_SECURITY_ID = 299
DRMP = 301
# 3GPP AVP codes (TS 29.272 §7.3, vendor 10415)
SUPPORTED_FEATURES = 628
TERMINAL_INFORMATION = 1401
IMEI = 1402
SOFTWARE_VERSION = 1403
EQUIPMENT_STATUS = 1445
MEID_3GPP2 = 1471

# Result codes (RFC 6733 §7.1; TS 29.272 §7.4.3)
SUCCESS = 2001
COMMAND_UNSUPPORTED = 3001
REALM_NOT_SERVED = 3003
TOO_BUSY = 3004
APPLICATION_UNSUPPORTED = 3007
INVALID_HDR_BITS = 3008
UNKNOWN_PEER = 3010
AVP_UNSUPPORTED = 5001
INVALID_AVP_VALUE = 5004
MISSING_AVP = 5005
NO_COMMON_APPLICATION = 5010
UNSUPPORTED_VERSION = 5011
UNABLE_TO_COMPLY = 5012
INVALID_AVP_LENGTH = 5014
INVALID_MESSAGE_LENGTH = 5015
EQUIPMENT_UNKNOWN = 5422

DISCONNECT_REBOOTING = 0
DISCONNECT_DO_NOT_WANT_TO_TALK_TO_YOU = 2
NO_STATE_MAINTAINED = 1

_HDR = struct.Struct("!IIIII")
_U32 = struct.Struct("!I")
_AVP = struct.Struct("!II")
_AVP_V = struct.Struct("!III")


class FramingError(Exception):
    """The byte stream is not Diameter (or breaks our limits): answer if possible, close."""

    def __init__(self, result_code: int, reason: str):
        super().__init__(reason)
        self.result_code = result_code
        self.reason = reason


class AvpError(Exception):
    """An AVP is malformed or unacceptable: answer ``result_code`` with ``failed`` (raw AVP)."""

    def __init__(self, result_code: int, reason: str, failed: bytes = b""):
        super().__init__(reason)
        self.result_code = result_code
        self.reason = reason
        self.failed = failed


class Header(NamedTuple):
    version: int
    length: int
    flags: int
    code: int
    app: int
    hbh: int
    e2e: int


class Avp(NamedTuple):
    """One AVP inside ``buf``: its value is ``buf[start:end]``, the whole AVP
    ``buf[at:at + length]`` (without padding)."""

    code: int
    flags: int
    vendor: int
    start: int
    end: int
    at: int

    def raw(self, buf: bytes) -> bytes:
        return bytes(buf[self.at:self.end])

    def value(self, buf: bytes) -> bytes:
        return bytes(buf[self.start:self.end])

    def u32(self, buf: bytes) -> int:
        if self.end - self.start != 4:
            raise AvpError(INVALID_AVP_LENGTH, f"AVP {self.code} must hold 4 bytes",
                           self.raw(buf))
        return int(_U32.unpack_from(buf, self.start)[0])


# -- reading ---------------------------------------------------------------------------------


def frame_length(buf: bytes, off: int, max_message: int = MAX_MESSAGE) -> int:
    """The length of the message starting at ``off`` (4 bytes must be there), checked."""
    word: int = _U32.unpack_from(buf, off)[0]
    version, length = word >> 24, word & 0xFFFFFF
    if version != VERSION:
        raise FramingError(UNSUPPORTED_VERSION, f"Diameter version {version}, not 1")
    if length < HEADER_LEN or length & 3:
        raise FramingError(INVALID_MESSAGE_LENGTH,
                           f"message length {length} (at least 20 and a multiple of 4)")
    if length > max_message:
        raise FramingError(INVALID_MESSAGE_LENGTH,
                           f"message length {length} exceeds this node's limit of {max_message}")
    return length


def read_header(buf: bytes, off: int = 0) -> Header:
    word, fc, app, hbh, e2e = _HDR.unpack_from(buf, off)
    return Header(word >> 24, word & 0xFFFFFF, fc >> 24, fc & 0xFFFFFF, app, hbh, e2e)


def read_avps(buf: bytes, start: int, end: int, depth: int = 0) -> list[Avp]:
    """The AVPs in ``buf[start:end]`` (a message body or a grouped AVP's value)."""
    if depth > MAX_DEPTH:
        raise AvpError(INVALID_AVP_VALUE, f"grouped AVPs nested deeper than {MAX_DEPTH}")
    found: list[Avp] = []
    off = start
    while off < end:
        if end - off < 8:
            raise AvpError(INVALID_AVP_LENGTH, "truncated AVP header")
        code, fl = _AVP.unpack_from(buf, off)
        flags, length = fl >> 24, fl & 0xFFFFFF
        head = 8
        vendor = 0
        if flags & AVP_V:
            head = 12
            if end - off < 12:
                raise AvpError(INVALID_AVP_LENGTH, "truncated AVP header")
            vendor = _U32.unpack_from(buf, off + 8)[0]
        if length < head or off + length > end:
            raise AvpError(INVALID_AVP_LENGTH,
                           f"AVP {code} length {length} does not fit its container",
                           offending_header(code, flags, vendor))
        found.append(Avp(code, flags, vendor, off + head, off + length, off))
        off += (length + 3) & ~3
    return found


def read_grouped(buf: bytes, avp: Avp, depth: int = 1) -> list[Avp]:
    return read_avps(buf, avp.start, avp.end, depth)


# -- writing ---------------------------------------------------------------------------------


def avp(code: int, data: bytes, *, vendor: int = 0, mandatory: bool = True) -> bytes:
    """One AVP, padded to a multiple of 4 bytes."""
    flags = (AVP_M if mandatory else 0) | (AVP_V if vendor else 0)
    head = 12 if vendor else 8
    length = head + len(data)
    out = _AVP.pack(code, (flags << 24) | length)
    if vendor:
        out += _U32.pack(vendor)
    return out + data + b"\0" * (-length & 3)


def avp_u32(code: int, value: int, *, vendor: int = 0, mandatory: bool = True) -> bytes:
    return avp(code, _U32.pack(value), vendor=vendor, mandatory=mandatory)


def avp_text(code: int, value: str | bytes, *, vendor: int = 0, mandatory: bool = True) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return avp(code, data, vendor=vendor, mandatory=mandatory)


def avp_address(code: int, address: str) -> bytes:
    """An Address AVP (RFC 6733 §4.3.1): address family 1 (IPv4) or 2 (IPv6), then the bytes."""
    ip = ipaddress.ip_address(address.split("%")[0])
    family = 1 if ip.version == 4 else 2
    return avp(code, struct.pack("!H", family) + ip.packed)


def avp_grouped(code: int, *children: bytes, vendor: int = 0, mandatory: bool = True) -> bytes:
    return avp(code, b"".join(children), vendor=vendor, mandatory=mandatory)


def header(flags: int, code: int, app: int, hbh: int, e2e: int, body_length: int) -> bytes:
    return _HDR.pack((VERSION << 24) | (HEADER_LEN + body_length), (flags << 24) | code, app,
                     hbh, e2e)


def message(flags: int, code: int, app: int, hbh: int, e2e: int, *avps: bytes) -> bytes:
    body = b"".join(avps)
    return header(flags, code, app, hbh, e2e, len(body)) + body


def failed_avp(*raw: bytes) -> bytes:
    """Failed-AVP (RFC 6733 §7.5) holding the offending AVP(s) as received (padded)."""
    padded = [r + b"\0" * (-len(r) & 3) for r in raw]
    return avp_grouped(FAILED_AVP, *padded)


def offending_header(code: int, flags: int, vendor: int) -> bytes:
    """An AVP whose length cannot be trusted, as Failed-AVP carries it (RFC 6733 §7.1.5):
    its header, with an empty payload and a length that is true."""
    head = 12 if flags & AVP_V else 8
    out = _AVP.pack(code, (flags << 24) | head)
    return out + _U32.pack(vendor) if flags & AVP_V else out


def empty_avp(code: int, *, vendor: int = 0) -> bytes:
    """A missing AVP as Failed-AVP carries it: the code with a zero-length value (§7.5)."""
    return avp(code, b"", vendor=vendor)
