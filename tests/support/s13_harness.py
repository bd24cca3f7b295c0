"""Helpers for the S13 tests: the S13 process on loopback, and two kinds of MME.

* ``S13Server`` runs ``python -m imeisync.entrypoints.s13 --config PATH`` on a free 127.0.0.1
  port, waits until it listens, and stops it with SIGTERM (returning what it logged).
* ``Mme`` is python-diameter's own ``Node`` as the MME: it does CER/CEA, answers our DWRs and
  DPRs by itself, and sends ECRs through an S13 application — an independent implementation
  judging ours. (python-diameter 0.9.0 is known to lose answers that carry only an
  Experimental-Result on its *answering* side — see scripts/bench/s13.py; on this, the
  requesting side, the 5422 answer arrives, and ``RawPeer`` reads the raw bytes anyway.)
* ``RawPeer`` is a socket that writes whatever bytes a test wants (python-diameter's message
  classes encode the well-formed ones) and reads raw answers, for the bad-input cases.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from diameter.message import Message
from diameter.message.avp.grouped import TerminalInformation
from diameter.message.commands import (
    CapabilitiesExchangeRequest,
    DeviceWatchdogAnswer,
    DisconnectPeerAnswer,
    MeIdentityCheckRequest,
)

from imeisync.adapters.diameter import codec as c
from imeisync.entrypoints.telemetry import RUN_DIR_ENV
from support.eir_harness import cli_env, free_port, write_eir_config

MME = "mme1.epc.test"
REALM = "epc.test"
EIR = "eir1.epc.test"


def write_s13_config(folder: Path, database_url: str, *, port: int,
                     peers: str = f'["{MME}", "mme2.epc.test"]', watchdog: str = "30s",
                     unknown_status: str = "WHITELISTED") -> Path:
    path = write_eir_config(folder, database_url, port=free_port(),
                            unknown_status=unknown_status)
    path.write_text(path.read_text() + (
        f'[s13]\nlisten = "127.0.0.1:{port}"\norigin_host = "{EIR}"\n'
        f'origin_realm = "{REALM}"\npeers = {peers}\nwatchdog = "{watchdog}"\n'))
    return path


class S13Server:
    def __init__(self, config: Path, port: int, *, board: Path | None = None):
        self.config = config
        self.port = port
        self.board = board  # the run folder it writes its figures to (as under the daemon)
        self.log = config.parent / f"s13-{port}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0, *, ready: bool = True) -> S13Server:
        handle = open(self.log, "wb")  # noqa: SIM115 -- the child writes it until stop()
        env = cli_env()
        if self.board is not None:
            self.board.mkdir(parents=True, exist_ok=True)
            env[RUN_DIR_ENV] = str(self.board)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imeisync.entrypoints.s13", "--config", str(self.config)],
            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        handle.close()
        deadline = time.monotonic() + timeout
        marker = "attach index ready" if ready else "s13 listening on"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"s13 server exited early:\n{self.output()}")
            if marker in self.output():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"s13 server not ready within {timeout}s:\n{self.output()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def figures(self) -> dict[str, Any]:
        """Its last figures on the board (written once a second)."""
        assert self.board is not None
        return json.loads((self.board / f"s13-{self.pid}.json").read_bytes())

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 15) -> str:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own session only
                self.proc.wait(timeout=5)
        self.proc = None
        return self.output()

    def __enter__(self) -> S13Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- messages ------------------------------------------------------------------------------


def cer(host: str = MME, apps: tuple[int, ...] = (c.APP_S13,), hbh: int = 1) -> bytes:
    msg = CapabilitiesExchangeRequest()
    msg.header.hop_by_hop_identifier = hbh
    msg.header.end_to_end_identifier = hbh
    msg.origin_host = host.encode()
    msg.origin_realm = REALM.encode()
    msg.host_ip_address = "127.0.0.1"
    msg.vendor_id = 10415
    msg.product_name = "test-mme"
    msg.auth_application_id = list(apps)
    return bytes(msg.as_bytes())


def ecr(imei: str | None, *, imsi: str | None = None, software: str | None = "01",
        hbh: int = 7, session: str = f"{MME};1;7", realm: str = REALM,
        terminal: bool = True) -> bytes:
    msg = MeIdentityCheckRequest()
    msg.header.application_id = c.APP_S13
    msg.header.hop_by_hop_identifier = hbh
    msg.header.end_to_end_identifier = hbh
    msg.session_id = session
    msg.auth_session_state = 1
    msg.origin_host = MME.encode()
    msg.origin_realm = REALM.encode()
    msg.destination_realm = realm.encode()
    if terminal:
        info = TerminalInformation(software_version=software) if imei is None else \
            TerminalInformation(imei=imei, software_version=software)
        msg.terminal_information = info
    if imsi is not None:
        msg.user_name = imsi
    return bytes(msg.as_bytes())


def decode(raw: bytes) -> Any:
    return Message.from_bytes(raw)


class Answer:
    """A raw answer read with our own minimal reader (independent of python-diameter)."""

    def __init__(self, raw: bytes):
        self.raw = raw
        self.header = c.read_header(raw)
        self.avps = c.read_avps(raw, 20, len(raw))

    def codes(self) -> list[int]:
        return [a.code for a in self.avps]

    def u32(self, code: int) -> int | None:
        for a in self.avps:
            if a.code == code:
                return a.u32(self.raw)
        return None

    @property
    def result(self) -> int | None:
        return self.u32(c.RESULT_CODE)

    @property
    def experimental(self) -> int | None:
        for a in self.avps:
            if a.code == c.EXPERIMENTAL_RESULT:
                for inner in c.read_grouped(self.raw, a):
                    if inner.code == c.EXPERIMENTAL_RESULT_CODE:
                        return inner.u32(self.raw)
        return None

    @property
    def error_bit(self) -> bool:
        return bool(self.header.flags & c.FLAG_E)

    def failed(self) -> list[c.Avp]:
        for a in self.avps:
            if a.code == c.FAILED_AVP:
                return c.read_grouped(self.raw, a)
        return []


class RawPeer:
    def __init__(self, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> Answer | None:
        """The next message, or None when the server closed the connection."""
        while True:
            if len(self.pending) >= 4:
                length = int.from_bytes(self.pending[1:4], "big")
                if len(self.pending) >= length:
                    raw, self.pending = self.pending[:length], self.pending[length:]
                    return Answer(raw)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.pending += chunk

    def open(self, host: str = MME) -> RawPeer:
        self.send(cer(host))
        answer = self.read()
        assert answer is not None and answer.result == c.SUCCESS, answer
        return self

    def ask(self, data: bytes) -> Answer:
        self.send(data)
        answer = self.read()
        assert answer is not None, "the server closed the connection"
        return answer

    def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout`` (other messages
        it sends meanwhile, e.g. a DWR, are read and dropped)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if self.read() is None:
                    return True
        except TimeoutError:
            return False

    def answer_watchdog(self, request: Answer) -> None:
        dwa = DeviceWatchdogAnswer()
        dwa.header.hop_by_hop_identifier = request.header.hbh
        dwa.header.end_to_end_identifier = request.header.e2e
        dwa.result_code = c.SUCCESS
        dwa.origin_host = MME.encode()
        dwa.origin_realm = REALM.encode()
        self.send(bytes(dwa.as_bytes()))

    def answer_disconnect(self, request: Answer) -> None:
        dpa = DisconnectPeerAnswer()
        dpa.header.hop_by_hop_identifier = request.header.hbh
        dpa.header.end_to_end_identifier = request.header.e2e
        dpa.result_code = c.SUCCESS
        dpa.origin_host = MME.encode()
        dpa.origin_realm = REALM.encode()
        self.send(bytes(dpa.as_bytes()))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- python-diameter's Node as the MME ------------------------------------------------------


class Mme:
    """python-diameter's ``Node`` connected to the EIR, with an S13 client application."""

    def __init__(self, port: int, host: str = MME):
        from diameter.node import Node
        from diameter.node.application import SimpleThreadingApplication

        self.node = Node(host, REALM, vendor_ids=[10415])
        self.node.wakeup_interval = 1  # its timers are checked this often
        self.peer = self.node.add_peer(f"aaa://{EIR}:{port};transport=tcp", REALM,
                                       ["127.0.0.1"], is_persistent=True, is_default=True)
        self.app = SimpleThreadingApplication(c.APP_S13, is_auth_application=True,
                                              request_handler=lambda app, msg: None)
        self.node.add_application(self.app, [self.peer])
        self.host = host

    def start(self, timeout: float = 10) -> Mme:
        self.node.start()
        self.app.wait_for_ready(timeout)
        return self

    def check(self, imei: str, imsi: str | None = None, software: str = "01") -> Any:
        msg = MeIdentityCheckRequest()
        msg.session_id = self.node.session_generator.next_id()
        msg.auth_session_state = 1
        msg.origin_host = self.host.encode()
        msg.origin_realm = REALM.encode()
        msg.destination_realm = REALM.encode()
        msg.terminal_information = TerminalInformation(imei=imei, software_version=software)
        if imsi is not None:
            msg.user_name = imsi
        return self.app.send_request(msg, timeout=5)

    def stop(self) -> None:
        self.node.stop(wait_timeout=3, force=True)
