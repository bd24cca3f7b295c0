"""The Diameter base protocol, server role (RFC 6733), carrying S13 (TS 29.272).

One asyncio ``Protocol`` per connection (TCP, or SCTP one-to-one sockets), its peer state
machine reduced to what a responder needs:

    WAIT_CER ──CER from a listed peer, advertising S13──▶ OPEN ──DPR/DPA──▶ closed
        │ anything else: 3010 (unknown peer) / 5010 (no S13) / 3010 (request before CER), close

* framing survives partial reads and several messages in one read; every message is bounded
  (``codec.MAX_MESSAGE``), so a peer cannot make us buffer more than that;
* OPEN: ECR → ``S13App.answer``; DWR → DWA; DPR → DPA then close; unknown command → 3001
  (E bit); another application → 3007 (E bit); answers to our DWR/DPR are taken here;
* watchdog (RFC 3539): after ``watchdog`` (Tw) without traffic a DWR; no answer within Tw
  closes the connection. A connection that sends no CER, or stops in the middle of a message,
  is closed after ``stall_timeout``;
* a peer that does not read its answers stops being read (``pause_writing``): bounded memory;
* ``drain()``: stop listening, DPR to every open peer, close what has not answered in time.

Counters only on the hot path: answers by command and result code, refusals and closes by
reason, peers connected by Origin-Host. ``S13App`` counts the ECR outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from typing import Any

from imeisync.adapters.diameter import codec as c
from imeisync.adapters.diameter.s13 import AnswerFault, S13App
from imeisync.entrypoints.admission import MAX_INFLIGHT, PER_CLIENT_SHARE, Admission
from imeisync.entrypoints.eir_metrics import (
    BUCKETS,  # one set of latency buckets for both interfaces
)

log = logging.getLogger("imeisync.s13")

_HDR = struct.Struct("!IIIII")
WAIT_CER, OPEN, CLOSING = 0, 1, 2


@dataclass(frozen=True)
class Settings:
    origin_host: str
    origin_realm: str
    peers: frozenset[str] | None  # None: any peer ("*")
    watchdog: float = 30.0
    stall_timeout: float = 10.0  # no CER, or half a message, for this long: close
    drain_timeout: float = 3.0  # DPA wait at shutdown
    max_message: int = c.MAX_MESSAGE
    product_name: str = "imeisync"
    max_inflight: int = MAX_INFLIGHT  # [eir] max_inflight: ECRs per loop batch (admission)
    per_client_share: float = PER_CLIENT_SHARE  # [eir] per_client_share, per Origin-Host
    # Connections: a handful per MME is normal (RFC 6733 wants one per peer pair); the caps
    # bound what a misbehaving or hostile peer can hold (each costs a buffer and a timer slot).
    max_connections: int = 512  # in all, before CER included; beyond: closed at accept
    max_connections_per_peer: int = 64  # per Origin-Host; beyond: CEA 3004, closed


class Node:
    """Shared state of the listener: settings, the S13 application, peers, counters."""

    def __init__(self, app: S13App, settings: Settings):
        self.app = app
        self.settings = settings
        self.admission = Admission(settings.max_inflight, settings.per_client_share)
        self.state_id = int(time.time()) & 0xFFFFFFFF
        self._e2e = (self.state_id & 0xFFF) << 20
        self.connections: set[Connection] = set()
        self.peers: Counter[str] = Counter()  # open connections by Origin-Host
        self.answers: Counter[tuple[int, int]] = Counter()  # (command, result) → sent
        self.refused: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.latency_sum = 0.0
        self.servers: list[asyncio.AbstractServer] = []
        self._ticker: asyncio.Task[None] | None = None
        self._last_fault = 0.0
        origin = (c.avp_text(c.ORIGIN_HOST, settings.origin_host)
                  + c.avp_text(c.ORIGIN_REALM, settings.origin_realm))
        self.origin = origin
        self.state_avp = c.avp_u32(c.ORIGIN_STATE_ID, self.state_id)
        # CEA after Host-IP-Address (which depends on the connection's local address).
        self.cea_tail = (
            c.avp_u32(c.VENDOR_ID, 0)
            + c.avp_text(c.PRODUCT_NAME, settings.product_name, mandatory=False)
            + self.state_avp
            + c.avp_u32(c.SUPPORTED_VENDOR_ID, c.VENDOR_3GPP)
            + c.avp_u32(c.AUTH_APPLICATION_ID, c.APP_S13)
            + c.avp_grouped(c.VENDOR_SPECIFIC_APPLICATION_ID,
                            c.avp_u32(c.VENDOR_ID, c.VENDOR_3GPP),
                            c.avp_u32(c.AUTH_APPLICATION_ID, c.APP_S13))
        )

    # -- listening ---------------------------------------------------------------------------

    async def listen(self, host: str, port: int, transport: str = "tcp") -> int:
        """Start accepting; returns the port (a free one when ``port`` is 0)."""
        loop = asyncio.get_running_loop()
        if transport == "sctp":
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(256)
            sock.setblocking(False)
            server = await loop.create_server(lambda: Connection(self), sock=sock)
        else:
            server = await loop.create_server(lambda: Connection(self), host, port,
                                              reuse_address=True, backlog=1024)
        self.servers.append(server)
        if self._ticker is None:
            self._ticker = loop.create_task(self._tick())
        return int(server.sockets[0].getsockname()[1])

    async def _tick(self) -> None:
        period = max(0.05, min(1.0, self.settings.watchdog / 4, self.settings.stall_timeout / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for conn in list(self.connections):
                conn.check(now)

    async def drain(self) -> None:
        """Shutdown: no new connections, DPR to every open peer, wait for DPAs (bounded)."""
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.disconnect()
        deadline = time.monotonic() + self.settings.drain_timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.close("shutdown")
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    # -- helpers -----------------------------------------------------------------------------

    def next_e2e(self) -> int:
        self._e2e = (self._e2e + 1) & 0xFFFFFFFF
        return self._e2e

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def fault(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_fault > 10:  # at most one traceback per 10 s
            self._last_fault = now
            log.exception("s13: %s", what)

    def peers_by_host(self) -> dict[str, int]:
        return {host: n for host, n in self.peers.items() if n}


class Connection(asyncio.Protocol):
    """One peer connection: framing, the peer state machine, the watchdog."""

    def __init__(self, node: Node):
        self.node = node
        self.app = node.app
        self.transport: asyncio.Transport | None = None
        self.state = WAIT_CER
        self.host: str | None = None
        self.buf = b""
        self.loop = asyncio.get_running_loop()
        self.opened = self.last_rx = self.loop.time()
        self.dwr_sent: float | None = None
        self.hbh = 0
        self.local_ip = "127.0.0.1"
        self.reason = "peer closed"

    # -- transport callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.node.connections.add(self)
        if len(self.node.connections) > self.node.settings.max_connections:
            self.node.refused["too many connections"] += 1
            self.close("too many connections")
            return
        sockname = transport.get_extra_info("sockname")
        if sockname:
            self.local_ip = sockname[0]

    def connection_lost(self, exc: Exception | None) -> None:
        self.node.connections.discard(self)
        self.node.closed[self.reason] += 1
        if self.state != WAIT_CER and self.host is not None:
            self.node.peers[self.host] -= 1
            if self.node.peers[self.host] <= 0:
                del self.node.peers[self.host]
        self.state = CLOSING
        self.transport = None
        self.buf = b""

    def pause_writing(self) -> None:  # the peer does not read its answers: stop reading
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        buf = self.buf + data if self.buf else data
        size = len(buf)
        off = 0
        out: list[bytes] = []
        close = False
        max_message = self.node.settings.max_message
        answer, observe, clock = self.app.answer, self.node.observe, time.perf_counter
        admission = self.node.admission
        gate, fast = admission.gate, admission.fast
        unpack = _HDR.unpack_from
        while size - off >= 20:
            word, fc, app, hbh, e2e = unpack(buf, off)
            length = word & 0xFFFFFF
            if word >> 24 != 1 or length & 3 or length < 20 or length > max_message:
                try:
                    c.frame_length(buf, off, max_message)  # says why
                except c.FramingError as error:
                    self._framing_answer(buf, off, error, out)
                self.reason = "framing"
                close = True
                break
            if size - off < length:
                break
            end = off + length
            try:
                if fc & 0x80000000 and self.state == OPEN and fc & 0xFFFFFF == c.CMD_ECR \
                        and app == c.APP_S13:  # the hot path: an ECR on an open connection
                    started = clock()
                    n = gate[0]  # admission: ECRs admitted in this loop batch
                    if n < fast:
                        if not n:
                            admission.start_batch()
                        gate[0] = n + 1
                    elif not admission.admit_deep(self.host):
                        out.append(self.app.congested(buf, off, end, fc >> 24, hbh, e2e))
                        off = end
                        continue
                    out.append(answer(buf, off, end, fc >> 24, hbh, e2e))
                    observe(clock() - started)
                elif fc & 0x80000000:  # another request
                    close = self._request(buf, off, end, fc >> 24, fc & 0xFFFFFF, app, hbh, e2e,
                                          out)
                else:
                    close = self._answer(buf, off, end, fc & 0xFFFFFF)
            except AnswerFault as fault:  # counted by the application (outcome "error")
                out.append(fault.answer)
                self.node.fault("answering an ECR failed")
            except Exception:
                self.node.fault("handling a message failed")
                out.append(self._error(fc >> 24, fc & 0xFFFFFF, app, hbh, e2e,
                                       c.UNABLE_TO_COMPLY))
            off = end
            if close:
                break
        if not close and 0 < size - off < 20 and buf[off] != 1:  # a header that cannot be
            self.reason = "framing"                              # Diameter: no need to wait
            close = True
        self.buf = b"" if close or off == size else buf[off:]
        transport = self.transport
        if transport is None:
            return
        if out:
            transport.write(b"".join(out) if len(out) > 1 else out[0])
        if close:
            transport.close()

    # -- requests ------------------------------------------------------------------------

    def _request(self, buf: bytes, off: int, end: int, flags: int, code: int, app: int,
                 hbh: int, e2e: int, out: list[bytes]) -> bool:
        """Answer one request into ``out``; True when the connection is to be closed."""
        node = self.node
        if self.state == OPEN:  # (ECRs are answered in data_received)
            if app == c.APP_BASE:
                if code == c.CMD_DWR:
                    out.append(self._base_answer(flags, code, hbh, e2e, node.state_avp))
                    return False
                if code == c.CMD_DPR:
                    out.append(self._base_answer(flags, code, hbh, e2e))
                    self.reason = "peer disconnected (DPR)"
                    return True
                if code == c.CMD_CER:  # already open: RFC 6733 §5.3 has no second exchange
                    out.append(self._error(flags, code, app, hbh, e2e, c.UNABLE_TO_COMPLY,
                                           protocol=False))
                    return False
                out.append(self._error(flags, code, app, hbh, e2e, c.COMMAND_UNSUPPORTED))
                return False
            if app == c.APP_S13:
                out.append(self._error(flags, code, app, hbh, e2e, c.COMMAND_UNSUPPORTED))
            else:
                out.append(self._error(flags, code, app, hbh, e2e, c.APPLICATION_UNSUPPORTED))
            return False
        if self.state == WAIT_CER:
            if code == c.CMD_CER and app == c.APP_BASE:
                return self._cer(buf, off, end, flags, hbh, e2e, out)
            node.refused["request before CER"] += 1
            self.reason = "request before CER"
            out.append(self._error(flags, code, app, hbh, e2e, c.UNKNOWN_PEER))
            return True
        return False  # CLOSING: requests are no longer answered

    def _answer(self, buf: bytes, off: int, end: int, code: int) -> bool:
        """An answer from the peer (to our DWR or DPR); True to close."""
        if self.state == WAIT_CER:
            self.reason = "answer before CER"
            return True
        if code == c.CMD_DWR:
            self.dwr_sent = None
        elif code == c.CMD_DPR and self.state == CLOSING:
            self.reason = "disconnected (DPR sent)"
            return True
        return False

    def _cer(self, buf: bytes, off: int, end: int, flags: int, hbh: int, e2e: int,
             out: list[bytes]) -> bool:
        node = self.node
        try:
            avps = c.read_avps(buf, off + 20, end)
            host = realm = None
            apps: set[int] = set()
            for avp in avps:
                if avp.vendor:
                    continue
                if avp.code == c.ORIGIN_HOST:
                    host = avp.value(buf)
                elif avp.code == c.ORIGIN_REALM:
                    realm = avp.value(buf)
                elif avp.code in (c.AUTH_APPLICATION_ID, c.ACCT_APPLICATION_ID):
                    apps.add(avp.u32(buf))
                elif avp.code == c.VENDOR_SPECIFIC_APPLICATION_ID:
                    for inner in c.read_grouped(buf, avp):
                        if inner.code in (c.AUTH_APPLICATION_ID, c.ACCT_APPLICATION_ID) \
                                and not inner.vendor:
                            apps.add(inner.u32(buf))
        except c.AvpError as error:
            node.refused["malformed CER"] += 1
            self.reason = "malformed CER"
            out.append(self._cea(flags, hbh, e2e, error.result_code, c.failed_avp(error.failed)
                                 if error.failed else b""))
            return True
        if host is None or realm is None:
            node.refused["malformed CER"] += 1
            self.reason = "malformed CER"
            missing = c.ORIGIN_HOST if host is None else c.ORIGIN_REALM
            out.append(self._cea(flags, hbh, e2e, c.MISSING_AVP,
                                 c.failed_avp(c.empty_avp(missing))))
            return True
        name = host.decode("utf-8", "replace")
        allowed = node.settings.peers
        if allowed is not None and name not in allowed:
            node.refused["unknown peer"] += 1
            self.reason = "unknown peer"
            log.warning("s13: refused a CER from %r (not in [s13] peers)", name[:255])
            out.append(self._cea(flags, hbh, e2e, c.UNKNOWN_PEER))
            return True
        if c.APP_S13 not in apps and c.APP_RELAY not in apps:
            node.refused["no common application"] += 1
            self.reason = "no common application"
            log.warning("s13: refused %r: its CER does not advertise S13 (16777252)", name[:255])
            out.append(self._cea(flags, hbh, e2e, c.NO_COMMON_APPLICATION))
            return True
        if node.peers[name] >= node.settings.max_connections_per_peer:
            node.refused["too many connections from the peer"] += 1
            self.reason = "too many connections from the peer"
            log.warning("s13: refused a connection from %s: it has %d open already",
                        name[:255], node.peers[name])
            out.append(self._cea(flags, hbh, e2e, c.TOO_BUSY))
            return True
        self.state = OPEN
        self.host = name
        node.peers[name] += 1
        log.info("s13: peer %s (realm %s) connected", name[:255],
                 realm.decode("utf-8", "replace")[:255])
        out.append(self._cea(flags, hbh, e2e, c.SUCCESS))
        return False

    # -- building answers ----------------------------------------------------------------

    def _cea(self, flags: int, hbh: int, e2e: int, result: int, extra: bytes = b"") -> bytes:
        self.node.answers[(c.CMD_CER, result)] += 1
        error = c.FLAG_E if 3000 <= result < 4000 else 0
        body = (c.avp_u32(c.RESULT_CODE, result) + self.node.origin
                + c.avp_address(c.HOST_IP_ADDRESS, self.local_ip) + self.node.cea_tail + extra)
        return c.header(error, c.CMD_CER, c.APP_BASE, hbh, e2e, len(body)) + body

    def _base_answer(self, flags: int, code: int, hbh: int, e2e: int, extra: bytes = b""
                     ) -> bytes:
        self.node.answers[(code, c.SUCCESS)] += 1
        body = c.avp_u32(c.RESULT_CODE, c.SUCCESS) + self.node.origin + extra
        return c.header(flags & c.FLAG_P, code, c.APP_BASE, hbh, e2e, len(body)) + body

    def _error(self, flags: int, code: int, app: int, hbh: int, e2e: int, result: int, *,
               protocol: bool = True, session: bytes = b"") -> bytes:
        """An answer-message (RFC 6733 §7.2): E bit for protocol errors (3xxx)."""
        self.node.answers[(code, result)] += 1
        body = session + self.node.origin + c.avp_u32(c.RESULT_CODE, result)
        bits = (flags & c.FLAG_P) | (c.FLAG_E if protocol else 0)
        return c.header(bits, code, app, hbh, e2e, len(body)) + body

    def _framing_answer(self, buf: bytes, off: int, error: c.FramingError,
                        out: list[bytes]) -> None:
        """Tell a peer whose message we cannot frame why, when its header is a request."""
        _, fc, app, hbh, e2e = _HDR.unpack_from(buf, off)
        if fc & 0x80000000:
            out.append(self._error(fc >> 24, fc & 0xFFFFFF, app, hbh, e2e, error.result_code,
                                   protocol=False))

    # -- timers and requests of our own --------------------------------------------------

    def check(self, now: float) -> None:
        settings = self.node.settings
        if self.state == WAIT_CER and now - self.opened > settings.stall_timeout:
            self.node.refused["no CER"] += 1
            self.close("no CER in time")
        elif self.buf and now - self.last_rx > settings.stall_timeout:
            self.close("stalled mid-message")
        elif self.state == OPEN:
            if self.dwr_sent is not None:
                if now - self.dwr_sent >= settings.watchdog:
                    log.warning("s13: peer %s did not answer the watchdog; closing",
                                self.host)
                    self.close("watchdog")
            elif now - self.last_rx >= settings.watchdog:
                self.dwr_sent = now
                self._send(c.CMD_DWR, self.node.state_avp)
        elif self.state == CLOSING and now - self.last_rx > settings.drain_timeout:
            self.close("no DPA")

    def disconnect(self) -> None:
        """DPR (REBOOTING): we are going away; the peer answers DPA and we close."""
        if self.state == OPEN:
            self.state = CLOSING
            self.last_rx = self.loop.time()
            self._send(c.CMD_DPR, c.avp_u32(c.DISCONNECT_CAUSE, c.DISCONNECT_REBOOTING))
        elif self.state == WAIT_CER:
            self.close("shutdown")

    def _send(self, code: int, extra: bytes) -> None:
        if self.transport is None:
            return
        self.hbh = (self.hbh + 1) & 0xFFFFFFFF
        self.transport.write(c.message(c.FLAG_R, code, c.APP_BASE, self.hbh,
                                       self.node.next_e2e(), self.node.origin, extra))

    def close(self, reason: str) -> None:
        self.reason = reason
        if self.transport is not None:
            self.transport.abort() if reason != "shutdown" else self.transport.close()


def describe(node: Node) -> dict[str, Any]:
    """What ``/healthz`` says about the S13 listener."""
    return {"peers": node.peers_by_host(), "connections": len(node.connections)}
