"""The S13 application: ME-Identity-Check-Request in, ME-Identity-Check-Answer out.

TS 29.272 §7.2.19–20 (the messages), §7.3.2–6 and §7.3.51 (Terminal-Information, IMEI,
Software-Version, Equipment-Status), §7.4.3 (5422). The verdict is the attach index's, whose
rule is ``domain.verdict`` — the same as the N5g-eir answer; ``network_answer`` maps an unknown
device by ``[eir] unknown_status`` here as there.

Pure: bytes in, bytes out, no I/O, no logging on the hot path. The request is read in place in
one pass over its top-level AVPs; the answer is the request's own Session-Id AVP, a body
encoded once per verdict at start-up, and the Proxy-Info AVPs echoed as received.

Answers:

* 2001 + Equipment-Status 0 (white), 1 (black), 2 (grey);
* an unknown device: 2001 + 0 (``WHITELISTED``) or ``NOT_FOUND``: Experimental-Result
  {10415, 5422} and neither Result-Code nor Equipment-Status;
* Terminal-Information, IMEI, Session-Id, Origin-Host/Realm, Destination-Realm or
  Auth-Session-State missing → 5005 + Failed-AVP (an example of the missing AVP);
* an IMEI that is not 14 or 15 digits, a Software-Version that is not 2 digits, a User-Name
  that is not an IMSI (5 to 15 digits) → 5004 + Failed-AVP (the AVP as received);
* an unknown AVP with the M bit → 5001 + Failed-AVP; a malformed AVP length → 5014;
* a Destination-Realm that is not ours → 3003 (E bit); no index yet → 3004 (E bit), so the
  MME asks its other EIR.

No Vendor-Specific-Application-Id in the answer (TS 29.272 §7.2.20, note), no E bit on 5xxx.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from imeisync.adapters.diameter import codec as c
from imeisync.domain.verdict import Status, network_answer

_HDR = struct.Struct("!IIIII")
_AVP = struct.Struct("!II")
_U32 = struct.Struct("!I")

EQUIPMENT_STATUS = {"WHITELISTED": 0, "BLACKLISTED": 1, "GREYLISTED": 2}

# Outcome labels (index into S13App.counts) and the result code each answers with.
# ``too_busy``: no index yet; ``congested``: refused by admission control (both 3004).
OUTCOMES = ("WHITELISTED", "BLACKLISTED", "GREYLISTED", "NOT_FOUND", "missing_avp",
            "invalid_avp_value", "avp_unsupported", "invalid_avp_length", "realm_not_served",
            "too_busy", "error", "congested")
RESULT_OF = (c.SUCCESS, c.SUCCESS, c.SUCCESS, c.EQUIPMENT_UNKNOWN, c.MISSING_AVP,
             c.INVALID_AVP_VALUE, c.AVP_UNSUPPORTED, c.INVALID_AVP_LENGTH, c.REALM_NOT_SERVED,
             c.TOO_BUSY, c.UNABLE_TO_COMPLY, c.TOO_BUSY)
_TOO_BUSY = OUTCOMES.index("too_busy")
_ERROR = OUTCOMES.index("error")
_CONGESTED = OUTCOMES.index("congested")
_BY_RESULT = {code: OUTCOMES.index(name) for name, code in zip(OUTCOMES, RESULT_OF, strict=True)
              if code not in (c.SUCCESS, c.EQUIPMENT_UNKNOWN) and name != "congested"}

# Which required AVPs were seen (bits), and an example of each for Failed-AVP.
_REQUIRED = {c.ORIGIN_HOST: 1, c.ORIGIN_REALM: 2, c.DESTINATION_REALM: 4,
             c.AUTH_SESSION_STATE: 8}
_ALL_REQUIRED = 15
# Base AVPs an ECR may carry that need no reading here.
_IGNORED = frozenset({c.DRMP, c.VENDOR_SPECIFIC_APPLICATION_ID, c.DESTINATION_HOST,
                      c.ROUTE_RECORD, c.ORIGIN_STATE_ID})


class Reject(Exception):
    """The request cannot be answered with a verdict: ``result`` (+ Failed-AVP)."""

    def __init__(self, result: int, failed: bytes = b""):
        super().__init__(result)
        self.result = result
        self.failed = failed


LookupFn = Callable[[int, "str | None"], Status]


class S13App:
    """Answers ECRs for one node (Origin-Host/Realm) from ``lookup(key, imsi)``.

    ``ready()`` is asked only when ``lookup`` fails with ``AttributeError`` (no index yet:
    ``eir.KeeperLookup``), so the hot path pays nothing for it. ``counts`` are per outcome
    (``OUTCOMES``), read by the metrics collector.
    """

    def __init__(self, lookup: LookupFn, ready: Callable[[], bool], *, origin_host: str,
                 origin_realm: str, unknown_status: str = "WHITELISTED",
                 sightings: Callable[[str], Callable[..., None] | None] | None = None):
        self.lookup = lookup
        self.ready = ready
        self.realm = origin_realm.encode()
        self.origin = (c.avp_text(c.ORIGIN_HOST, origin_host)
                       + c.avp_text(c.ORIGIN_REALM, origin_realm))
        self.counts = [0] * len(OUTCOMES)
        session_state = c.avp_u32(c.AUTH_SESSION_STATE, c.NO_STATE_MAINTAINED)
        # Per verdict: the answer's body, its outcome, and the sighting hook of an answer that
        # may be a sighting (``sightings(answer)``: adapters/sighting_queue), else None.
        self.bodies: dict[Status, tuple[bytes, int, Callable[..., None] | None]] = {}
        for status in Status:
            answer = network_answer(status, unknown_status)
            if answer == "NOT_FOUND":
                result = c.avp_grouped(c.EXPERIMENTAL_RESULT,
                                       c.avp_u32(c.VENDOR_ID, c.VENDOR_3GPP),
                                       c.avp_u32(c.EXPERIMENTAL_RESULT_CODE, c.EQUIPMENT_UNKNOWN))
                body = result + session_state + self.origin
            else:
                body = (c.avp_u32(c.RESULT_CODE, c.SUCCESS) + session_state + self.origin
                        + c.avp_u32(c.EQUIPMENT_STATUS, EQUIPMENT_STATUS[answer],
                                    vendor=c.VENDOR_3GPP))
            self.bodies[status] = (body, OUTCOMES.index(answer),
                                   sightings(answer) if sightings is not None else None)
        self._session_state = session_state

    def answer(self, buf: bytes, off: int, end: int, flags: int, hbh: int, e2e: int) -> bytes:
        """The ECA for the ECR at ``buf[off:end]`` (header already read by the caller).

        Raises ``AnswerFault`` (carrying a 5012 answer to send) only on a bug of ours.
        """
        session, proxies, terminal, user, seen, problem = self._scan(buf, off + 20, end)
        try:
            if problem is None and (seen != _ALL_REQUIRED or not session or terminal < 0):
                problem = self._missing(session, seen, terminal)
            if problem is None:
                key, imsi = self._identity(buf, terminal, user)
                try:
                    body, outcome, sighted = self.bodies[self.lookup(key, imsi)]
                except AttributeError:
                    if self.ready():
                        raise
                    problem = Reject(c.TOO_BUSY)
            if problem is not None:
                raise problem
        except Reject as reject:
            self.counts[_BY_RESULT[reject.result]] += 1
            if reject.result < 4000:  # protocol errors: answer-message with the E bit
                return self._protocol_error(flags, hbh, e2e, session, proxies, reject.result)
            body = (c.avp_u32(c.RESULT_CODE, reject.result) + self._session_state + self.origin
                    + (c.failed_avp(reject.failed) if reject.failed else b""))
        except Exception as exc:
            self.counts[_ERROR] += 1
            body = (c.avp_u32(c.RESULT_CODE, c.UNABLE_TO_COMPLY) + self._session_state
                    + self.origin)
            raise AnswerFault(self._eca(flags, hbh, e2e, session, body, proxies)) from exc
        else:
            self.counts[outcome] += 1
            if sighted:  # O(1), never blocks; the ECR's bytes are parsed by the writer
                sighted(key, imsi, buf[off:end], None)
        return self._eca(flags, hbh, e2e, session, body, proxies)

    def congested(self, buf: bytes, off: int, end: int, flags: int, hbh: int, e2e: int
                  ) -> bytes:
        """3004 DIAMETER_TOO_BUSY (E bit) for an ECR admission control refused: its Session-Id
        and Proxy-Info echoed, no verdict looked up."""
        session, proxies, *_ = self._scan(buf, off + 20, end)
        self.counts[_CONGESTED] += 1
        return self._protocol_error(flags, hbh, e2e, session, proxies, c.TOO_BUSY)

    @staticmethod
    def _eca(flags: int, hbh: int, e2e: int, session: bytes, body: bytes,
             proxies: list[bytes]) -> bytes:
        if proxies:
            body += b"".join(proxies)
        return _HDR.pack(0x01000000 | (20 + len(session) + len(body)),
                         ((flags & c.FLAG_P) << 24) | c.CMD_ECR, c.APP_S13, hbh, e2e) \
            + session + body

    def _protocol_error(self, flags: int, hbh: int, e2e: int, session: bytes,
                        proxies: list[bytes], result: int) -> bytes:
        body = session + self.origin + c.avp_u32(c.RESULT_CODE, result) + b"".join(proxies)
        return c.header((flags & c.FLAG_P) | c.FLAG_E, c.CMD_ECR, c.APP_S13, hbh, e2e,
                        len(body)) + body

    def _scan(self, buf: bytes, pos: int, end: int
              ) -> tuple[bytes, list[bytes], int, int, int, Reject | None]:
        """One pass over the top-level AVPs: the Session-Id AVP and Proxy-Info AVPs as
        received (echoed), where Terminal-Information and User-Name start, which required
        AVPs were seen, and the first problem (the scan goes on past an unacceptable AVP, so
        the error answer still carries Session-Id; it stops at a broken length)."""
        session = b""
        proxies: list[bytes] = []
        terminal = user = -1
        seen = 0
        problem: Reject | None = None
        unpack = _AVP.unpack_from
        required = _REQUIRED.get
        realm = self.realm
        while pos < end:
            if end - pos < 8:
                return session, proxies, terminal, user, seen, problem or Reject(
                    c.INVALID_AVP_LENGTH)  # not even a header: no AVP to name
            code, fl = unpack(buf, pos)
            length = fl & 0xFFFFFF
            if fl & 0x80000000:  # V bit: a vendor AVP
                vendor = _U32.unpack_from(buf, pos + 8)[0] if end - pos >= 12 else 0
                if length < 12 or pos + length > end:
                    return session, proxies, terminal, user, seen, problem or Reject(
                        c.INVALID_AVP_LENGTH, c.offending_header(code, fl >> 24, vendor))
                if vendor == c.VENDOR_3GPP and code == c.TERMINAL_INFORMATION:
                    terminal = pos
                elif (fl & 0x40000000 and problem is None  # M bit
                      and not (vendor == c.VENDOR_3GPP and code == c.SUPPORTED_FEATURES)):
                    problem = Reject(c.AVP_UNSUPPORTED, bytes(buf[pos:pos + length]))
            else:
                if length < 8 or pos + length > end:
                    return session, proxies, terminal, user, seen, problem or Reject(
                        c.INVALID_AVP_LENGTH, c.offending_header(code, fl >> 24, 0))
                bit = required(code, 0)
                if bit:
                    seen |= bit
                    if (bit == 4 and buf[pos + 8:pos + length] != realm  # Destination-Realm
                            and problem is None):
                        problem = Reject(c.REALM_NOT_SERVED)
                elif code == c.SESSION_ID:
                    session = buf[pos:pos + ((length + 3) & ~3)]
                elif code == c.USER_NAME:
                    user = pos
                elif code == c.PROXY_INFO:
                    proxies.append(buf[pos:pos + ((length + 3) & ~3)])
                elif code not in _IGNORED and fl & 0x40000000 and problem is None:
                    problem = Reject(c.AVP_UNSUPPORTED, bytes(buf[pos:pos + length]))
            pos += (length + 3) & ~3
        return session, proxies, terminal, user, seen, problem

    @staticmethod
    def _missing(session: bytes, seen: int, terminal: int) -> Reject | None:
        if not session:
            return Reject(c.MISSING_AVP, c.empty_avp(c.SESSION_ID))
        if seen != _ALL_REQUIRED:
            for code, bit in _REQUIRED.items():
                if not seen & bit:
                    return Reject(c.MISSING_AVP, c.empty_avp(code))
        if terminal < 0:
            return Reject(c.MISSING_AVP,
                          c.empty_avp(c.TERMINAL_INFORMATION, vendor=c.VENDOR_3GPP))
        return None

    @staticmethod
    def _identity(buf: bytes, terminal: int, user: int) -> tuple[int, str | None]:
        """The 14-digit key from Terminal-Information/IMEI and the IMSI from User-Name.

        Terminal-Information's AVPs are read in place (one level: an inner grouped AVP with
        the M bit is unsupported, without it ignored, so nesting costs nothing)."""
        unpack, u32 = _AVP.unpack_from, _U32.unpack_from
        pos = terminal + 12
        end = terminal + (u32(buf, terminal + 4)[0] & 0xFFFFFF)
        imei = software = -1
        while pos < end:
            if end - pos < 8:
                raise Reject(c.INVALID_AVP_LENGTH)
            code, fl = unpack(buf, pos)
            length = fl & 0xFFFFFF
            vendor = u32(buf, pos + 8)[0] if fl & 0x80000000 and end - pos >= 12 else 0
            if length < (12 if fl & 0x80000000 else 8) or pos + length > end:
                raise Reject(c.INVALID_AVP_LENGTH, c.offending_header(code, fl >> 24, vendor))
            if vendor == c.VENDOR_3GPP and code == c.IMEI:
                imei = pos
            elif vendor == c.VENDOR_3GPP and code == c.SOFTWARE_VERSION:
                software = pos
            elif fl & 0x40000000 and not (vendor == c.VENDOR_3GPP and code == c.MEID_3GPP2):
                raise Reject(c.AVP_UNSUPPORTED, bytes(buf[pos:pos + length]))
            pos += (length + 3) & ~3
        if imei < 0:
            raise Reject(c.MISSING_AVP, c.empty_avp(c.IMEI, vendor=c.VENDOR_3GPP))
        length = u32(buf, imei + 4)[0] & 0xFFFFFF
        digits = buf[imei + 12:imei + length]
        # TS 29.272 §7.3.4: 14 digits, or 15 with the check digit; keyed on the first 14
        # (DOMAIN.md: an attach-time identity is never refused for its check digit).
        if not (14 <= len(digits) <= 15 and digits.isdigit()):
            raise Reject(c.INVALID_AVP_VALUE, bytes(buf[imei:imei + length]))
        if software >= 0:
            length = u32(buf, software + 4)[0] & 0xFFFFFF
            svn = buf[software + 12:software + length]
            if not (len(svn) == 2 and svn.isdigit()):
                raise Reject(c.INVALID_AVP_VALUE, bytes(buf[software:software + length]))
        imsi = None
        if user >= 0:
            length = u32(buf, user + 4)[0] & 0xFFFFFF
            value = buf[user + 8:user + length]
            if not (5 <= len(value) <= 15 and value.isdigit()):
                raise Reject(c.INVALID_AVP_VALUE, bytes(buf[user:user + length]))
            imsi = value.decode("ascii")
        return int(digits[:14]), imsi


class AnswerFault(Exception):
    """The handler failed unexpectedly; ``answer`` (5012) is still to be sent, then logged."""

    def __init__(self, answer: bytes):
        super().__init__("ECR handling failed")
        self.answer = answer
