"""The S13 attach check (TS 29.272 ME-Identity-Check) against python-diameter as the MME.

A real S13 process on loopback over TCP, a real store; python-diameter's ``Node`` does the
base protocol on the MME's side, so CER/CEA, DWR/DWA and DPR/DPA are judged by another
implementation. Raw sockets check what the Node hides (E bits, AVP order, closes).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from imeisync.adapters.diameter import codec as c
from imeisync.adapters.keys import generate_keypair
from imeisync.adapters.police_jws import sign_order
from imeisync.domain.imei import luhn_check_digit
from support.eir_harness import free_port, imeisync, seed, wait_for
from support.s13_harness import MME, Mme, RawPeer, S13Server, cer, ecr, write_s13_config

BLOCKED = "35209900176148"
TRACKED = "49015420323751"
BOTH = "35417803685978"
CLONED = "35686800004141"
UNKNOWN = "01234567890123"
LEGIT_IMSI = "238010000000001"
OTHER_IMSI = "238010000000002"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S13Server]:
    folder = tmp_path_factory.mktemp("s13")
    url = f"sqlite:///{folder / 'imeisync.db'}"
    seed(url, [(BLOCKED, "block", "op-se"), (TRACKED, "track", "op-se"),
               (BOTH, "block", "op-se"), (BOTH, "track", "op-no"),
               (CLONED, "block", "op-dk")],
         exceptions=[(CLONED, LEGIT_IMSI)])
    port = free_port()
    with S13Server(write_s13_config(folder, url, port=port), port) as srv:
        yield srv


@pytest.fixture(scope="module")
def mme(served: S13Server) -> Iterator[Mme]:
    node = Mme(served.port).start()
    yield node
    node.stop()


def full(key: str) -> str:
    return key + luhn_check_digit(key)


@pytest.mark.parametrize("imei", [BLOCKED, full(BLOCKED), BLOCKED + "0"],
                         ids=["14-digits", "15-with-check-digit", "14-plus-spare"])
def test_blocked_device_gets_2001_and_equipment_status_blacklisted(mme: Mme, imei: str) -> None:
    answer = mme.check(imei)
    assert (answer.result_code, answer.equipment_status) == (c.SUCCESS, 1)


def test_tracked_device_is_greylisted_and_block_wins_over_track(mme: Mme) -> None:
    assert mme.check(TRACKED).equipment_status == 2
    assert mme.check(BOTH).equipment_status == 1


def test_unknown_device_is_whitelisted_by_default(mme: Mme) -> None:
    answer = mme.check(UNKNOWN)
    assert (answer.result_code, answer.equipment_status) == (c.SUCCESS, 0)
    assert answer.experimental_result is None


def test_exception_lets_only_its_imsi_through_the_block(mme: Mme) -> None:
    assert mme.check(CLONED, imsi=LEGIT_IMSI).equipment_status == 0
    assert mme.check(CLONED, imsi=OTHER_IMSI).equipment_status == 1
    assert mme.check(CLONED).equipment_status == 1


def test_eca_echoes_session_id_and_proxy_info_and_never_carries_vsai(served: S13Server) -> None:
    proxy = c.avp_grouped(c.PROXY_INFO, c.avp_text(c.PROXY_HOST, "dra1.epc.test"),
                          c.avp_text(c.PROXY_STATE, b"\x01opaque"))
    request = ecr(BLOCKED, session="mme1.epc.test;42;abc")
    request = _with(request, proxy)
    with RawPeer(served.port).open() as peer:
        answer = peer.ask(request)
    assert answer.header.code == c.CMD_ECR and answer.header.app == c.APP_S13
    assert answer.header.hbh == 7 and answer.header.e2e == 7 and not answer.error_bit
    assert answer.codes()[0] == c.SESSION_ID
    assert answer.avps[0].value(answer.raw) == b"mme1.epc.test;42;abc"
    assert proxy in answer.raw
    assert c.VENDOR_SPECIFIC_APPLICATION_ID not in answer.codes()
    assert answer.result == c.SUCCESS and answer.u32(c.EQUIPMENT_STATUS) == 1
    for code in (c.AUTH_SESSION_STATE, c.ORIGIN_HOST, c.ORIGIN_REALM):
        assert code in answer.codes()


def _with(message: bytes, *avps: bytes) -> bytes:
    """``message`` with ``avps`` appended (header length fixed)."""
    body = message[20:] + b"".join(avps)
    head = c.read_header(message)
    return c.header(head.flags, head.code, head.app, head.hbh, head.e2e, len(body)) + body


def test_cea_advertises_s13_and_who_we_are(served: S13Server) -> None:
    with RawPeer(served.port) as peer:
        peer.send(cer())
        answer = peer.read()
    assert answer is not None and answer.result == c.SUCCESS and not answer.error_bit
    assert answer.u32(c.AUTH_APPLICATION_ID) == c.APP_S13
    assert answer.u32(c.SUPPORTED_VENDOR_ID) == c.VENDOR_3GPP
    for code in (c.ORIGIN_HOST, c.ORIGIN_REALM, c.HOST_IP_ADDRESS, c.VENDOR_ID, c.PRODUCT_NAME,
                 c.ORIGIN_STATE_ID, c.VENDOR_SPECIFIC_APPLICATION_ID):
        assert code in answer.codes(), code
    vsai = next(a for a in answer.avps if a.code == c.VENDOR_SPECIFIC_APPLICATION_ID)
    inner = {a.code: a.u32(answer.raw) for a in c.read_grouped(answer.raw, vsai)}
    assert inner == {c.VENDOR_ID: c.VENDOR_3GPP, c.AUTH_APPLICATION_ID: c.APP_S13}
    address = next(a for a in answer.avps if a.code == c.HOST_IP_ADDRESS)
    assert address.value(answer.raw) == b"\x00\x01" + socket.inet_aton("127.0.0.1")


def test_peer_not_in_the_list_gets_3010_and_is_disconnected(served: S13Server) -> None:
    with RawPeer(served.port) as peer:
        peer.send(cer("rogue.example.net"))
        answer = peer.read()
        assert answer is not None and answer.result == c.UNKNOWN_PEER and answer.error_bit
        assert peer.closed()
    assert "rogue.example.net" in served.output()


def test_cer_without_s13_gets_5010_and_is_disconnected(served: S13Server) -> None:
    with RawPeer(served.port) as peer:
        peer.send(cer(apps=(4,)))  # Diameter Credit-Control only
        answer = peer.read()
        assert answer is not None and answer.result == c.NO_COMMON_APPLICATION
        assert peer.closed()


def test_cer_through_a_relay_is_accepted(served: S13Server) -> None:
    with RawPeer(served.port) as peer:
        peer.send(cer(apps=(c.APP_RELAY,)))
        answer = peer.read()
        assert answer is not None and answer.result == c.SUCCESS


# python-diameter's own connection thread trips over the socket its forced stop closed
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_python_diameter_refused_peer_never_becomes_ready(served: S13Server) -> None:
    rogue = Mme(served.port, host="rogue.epc.test")
    try:
        with pytest.raises(Exception):  # noqa: B017 -- python-diameter's own "not ready" error
            rogue.start(timeout=3)
    finally:
        rogue.stop()


def test_watchdog_keeps_python_diameter_connected_and_dwr_is_answered(served: S13Server,
                                                                      mme: Mme) -> None:
    with RawPeer(served.port).open() as peer:
        dwr = c.message(c.FLAG_R, c.CMD_DWR, 0, 99, 99, c.avp_text(c.ORIGIN_HOST, MME),
                        c.avp_text(c.ORIGIN_REALM, "epc.test"))
        answer = peer.ask(dwr)
    assert (answer.header.code, answer.result, answer.header.hbh) == (c.CMD_DWR, c.SUCCESS, 99)
    assert c.ORIGIN_STATE_ID in answer.codes()
    assert mme.check(BLOCKED).equipment_status == 1


def test_dpr_from_the_peer_is_answered_then_closed(served: S13Server) -> None:
    with RawPeer(served.port).open() as peer:
        dpr = c.message(c.FLAG_R, c.CMD_DPR, 0, 5, 5, c.avp_text(c.ORIGIN_HOST, MME),
                        c.avp_text(c.ORIGIN_REALM, "epc.test"), c.avp_u32(c.DISCONNECT_CAUSE, 0))
        answer = peer.ask(dpr)
        assert (answer.header.code, answer.result) == (c.CMD_DPR, c.SUCCESS)
        assert peer.closed()


def test_many_outstanding_requests_and_partial_reads_on_one_connection(
        served: S13Server) -> None:
    requests = [ecr([BLOCKED, TRACKED, UNKNOWN][i % 3], hbh=1000 + i) for i in range(600)]
    expected = [[1, 2, 0][i % 3] for i in range(600)]
    with RawPeer(served.port).open() as peer:
        stream = b"".join(requests)
        for start in range(0, len(stream), 997):  # writes that split headers and AVPs
            peer.send(stream[start:start + 997])
        answers = [peer.read() for _ in requests]
    assert [a.header.hbh for a in answers if a] == [1000 + i for i in range(600)]
    # What arrives in one read beyond the peer's share of [eir] max_inflight is refused by
    # admission control (3004, E bit; test_admission.py); everything else gets its verdict.
    got = [a.u32(c.EQUIPMENT_STATUS) if a and a.result == c.SUCCESS else None for a in answers]
    assert all(a.result == c.TOO_BUSY and a.error_bit for a, g in zip(answers, got, strict=True)
               if a and g is None)
    assert [g for g in got if g is not None] == [e for e, g in zip(expected, got, strict=True)
                                                if g is not None]
    assert sum(g is not None for g in got) >= 64  # at least one share (default 128 × 0.5)


def test_byte_by_byte_and_several_messages_in_one_write(served: S13Server) -> None:
    with RawPeer(served.port).open() as peer:
        for byte in ecr(BLOCKED):
            peer.send(bytes([byte]))
        assert peer.read().u32(c.EQUIPMENT_STATUS) == 1  # type: ignore[union-attr]
        peer.send(ecr(TRACKED, hbh=1) + ecr(UNKNOWN, hbh=2) + ecr(BLOCKED, hbh=3))
        got = [peer.read() for _ in range(3)]
    assert [a.u32(c.EQUIPMENT_STATUS) for a in got if a] == [2, 0, 1]


def test_many_peers_at_once(served: S13Server) -> None:
    peers = [RawPeer(served.port) for _ in range(40)]
    try:
        for peer in peers:
            peer.send(cer())
        for peer in peers:
            assert peer.read().result == c.SUCCESS  # type: ignore[union-attr]
        for n, peer in enumerate(peers):
            peer.send(ecr(BLOCKED if n % 2 else TRACKED, hbh=n))
        for n, peer in enumerate(peers):
            assert peer.read().u32(c.EQUIPMENT_STATUS) == (1 if n % 2 else 2)  # type: ignore
    finally:
        for peer in peers:
            peer.close()


# -- servers of their own ---------------------------------------------------------------------


def test_unknown_device_is_5422_without_result_code_when_configured(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'imeisync.db'}"
    seed(url, [(BLOCKED, "block", "op-se")])
    port = free_port()
    config = write_s13_config(tmp_path, url, port=port, unknown_status="NOT_FOUND")
    with S13Server(config, port):
        with RawPeer(port).open() as peer:
            answer = peer.ask(ecr(UNKNOWN))
            blocked = peer.ask(ecr(BLOCKED))
        node = Mme(port).start()
        try:
            via_node = node.check(UNKNOWN)
        finally:
            node.stop()
    assert answer.experimental == c.EQUIPMENT_UNKNOWN and not answer.error_bit
    assert c.RESULT_CODE not in answer.codes() and c.EQUIPMENT_STATUS not in answer.codes()
    exp = next(a for a in answer.avps if a.code == c.EXPERIMENTAL_RESULT)
    assert {a.code: a.u32(answer.raw) for a in c.read_grouped(answer.raw, exp)} == {
        c.VENDOR_ID: c.VENDOR_3GPP, c.EXPERIMENTAL_RESULT_CODE: c.EQUIPMENT_UNKNOWN}
    assert blocked.result == c.SUCCESS and blocked.u32(c.EQUIPMENT_STATUS) == 1
    assert via_node.result_code is None
    assert via_node.experimental_result.experimental_result_code == c.EQUIPMENT_UNKNOWN


def test_order_block_exception_and_lift_reach_s13_within_one_second(
        tmp_path: Path, database_url: str) -> None:
    seed(database_url, [(TRACKED, "track", "op-se")])
    port = free_port()
    config = write_s13_config(tmp_path, database_url, port=port)
    imei = full(BLOCKED)
    with S13Server(config, port), RawPeer(port).open() as peer:
        def status(imsi: str | None = None) -> int | None:
            return peer.ask(ecr(BLOCKED, imsi=imsi)).u32(c.EQUIPMENT_STATUS)

        assert status() == 0
        imeisync(config, "order", "block", "--imei", imei, "--case", "CPH-7", "--unit", "CPH")
        visible = wait_for(lambda: status() == 1, 1.0)
        imeisync(config, "exception", "add", "--imei", imei, "--imsi", LEGIT_IMSI,
                 "--case", "CPH-7")
        wait_for(lambda: status(LEGIT_IMSI) == 0, 1.0)
        assert status(OTHER_IMSI) == 1
        imeisync(config, "order", "submit", str(_signed_lift(tmp_path, imei)))
        lifted = wait_for(lambda: status() == 0, 1.0)
    assert visible <= 1.0 and lifted <= 1.0


def _signed_lift(folder: Path, imei: str) -> Path:
    """A lift order signed by a police authority the operator trusts."""
    private, public = generate_keypair("cph-police", folder / "police")
    shutil.copy(public, folder / "police-keys" / "cph-police.pub")
    token = sign_order({"order_id": f"LIFT-{time.time_ns()}", "kind": "lift", "imei": imei,
                        "case_ref": "CPH-7", "police_unit": "CPH", "reason": "recovered",
                        "issued_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
                       private, "cph-police")
    path = folder / "lift.jws"
    path.write_text(token)
    return path


def test_index_not_loaded_yet_answers_3004_too_busy(tmp_path: Path) -> None:
    gone = tmp_path / "missing" / "imeisync.db"  # unreadable: the index cannot be built
    port = free_port()
    config = write_s13_config(tmp_path, f"sqlite:///{gone}", port=port)
    srv = S13Server(config, port).start(ready=False)
    try:
        with RawPeer(port).open() as peer:
            answer = peer.ask(ecr(BLOCKED))
    finally:
        srv.stop()
    assert answer.result == c.TOO_BUSY and answer.error_bit
    assert c.EQUIPMENT_STATUS not in answer.codes()


def test_idle_peer_gets_dwr_and_is_closed_when_it_does_not_answer(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'imeisync.db'}"
    seed(url, [])
    port = free_port()
    with S13Server(write_s13_config(tmp_path, url, port=port, watchdog="1s"), port):
        node = Mme(port).start()
        with RawPeer(port).open() as peer:
            peer.sock.settimeout(3)
            started = time.monotonic()
            dwr = peer.read()
            assert dwr is not None and dwr.header.code == c.CMD_DWR
            assert dwr.header.flags & c.FLAG_R and 0.8 <= time.monotonic() - started < 2.5
            peer.answer_watchdog(dwr)
            again = peer.read()  # answered: the connection lives on, and is watched again
            assert again is not None and again.header.code == c.CMD_DWR
            assert peer.closed(timeout=4), "an unanswered DWR closes the connection"
        try:
            time.sleep(2.5)  # python-diameter answers our DWRs itself: it stays connected
            assert node.check(UNKNOWN).result_code == c.SUCCESS
        finally:
            node.stop()


def test_sigterm_sends_dpr_to_every_peer_then_exits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'imeisync.db'}"
    seed(url, [])
    port = free_port()
    srv = S13Server(write_s13_config(tmp_path, url, port=port), port).start()
    with RawPeer(port).open() as one, RawPeer(port).open("mme2.epc.test") as two:
        os.kill(srv.pid, signal.SIGTERM)
        for peer in (one, two):
            dpr = peer.read()
            assert dpr is not None and dpr.header.code == c.CMD_DPR
            assert dpr.header.flags & c.FLAG_R
            assert dpr.u32(c.DISCONNECT_CAUSE) == c.DISCONNECT_REBOOTING
            peer.answer_disconnect(dpr)
        assert srv.proc is not None
        assert srv.proc.wait(timeout=5) == 0
        assert one.closed(1) and two.closed(1)
    assert "sent DPR to 2 peer(s)" in srv.stop()


def test_sctp_transport_is_refused_clearly_where_the_kernel_lacks_it(tmp_path: Path) -> None:
    from imeisync.entrypoints.s13 import sctp_available

    if sctp_available():
        pytest.skip("this kernel has SCTP: see test_s13_sctp")
    url = f"sqlite:///{tmp_path / 'imeisync.db'}"
    port = free_port()
    config = write_s13_config(tmp_path, url, port=port)
    config.write_text(config.read_text() + 'transport = "sctp"\n')
    srv = S13Server(config, port)
    with pytest.raises(RuntimeError) as failed:
        srv.start(timeout=10)
    assert "no SCTP" in str(failed.value) and "Traceback" not in str(failed.value)


def test_probe_prints_the_verdict_an_mme_would_get(served: S13Server) -> None:
    import subprocess
    import sys

    from support.eir_harness import cli_env

    def run(imei: str, host: str = MME) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "imeisync.entrypoints.s13_probe", f"127.0.0.1:{served.port}",
             imei, "--origin-host", host, "--realm", "epc.test"],
            capture_output=True, text=True, env=cli_env(), timeout=30)

    blocked = run(full(BLOCKED))
    assert blocked.returncode == 0 and blocked.stdout.startswith("BLACKLISTED"), blocked
    refused = run(BLOCKED, host="rogue.epc.test")
    assert refused.returncode == 1 and "3010" in refused.stdout


def test_any_peer_when_configured_with_a_star_and_it_is_logged(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'imeisync.db'}"
    seed(url, [])
    port = free_port()
    with S13Server(write_s13_config(tmp_path, url, port=port, peers='["*"]'), port) as srv:
        with RawPeer(port) as peer:
            peer.send(cer("anyone.example.net"))
            answer = peer.read()
        assert answer is not None and answer.result == c.SUCCESS
        assert "level=warning" in srv.output() and "any Diameter peer may connect" in srv.output()
