"""Bad input on S13: a clear Diameter error or a closed connection, never a crash.

One S13 process serves the whole module; a well-behaved MME stays connected throughout and
must get correct answers after every abuse (``good`` fixture), and the process must not grow.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from imeisync.adapters.diameter import codec as c
from support.eir_harness import free_port, seed, wait_for
from support.s13_harness import RawPeer, S13Server, cer, ecr, write_s13_config

BLOCKED = "35209900176148"
TI = c.TERMINAL_INFORMATION
V = c.VENDOR_3GPP


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S13Server]:
    folder = tmp_path_factory.mktemp("s13-bad")
    url = f"sqlite:///{folder / 'imeisync.db'}"
    seed(url, [(BLOCKED, "block", "op-se")])
    port = free_port()
    # watchdog 4s: a silent or stalled connection is closed after 4 s (stall timeout = Tw)
    config = write_s13_config(folder, url, port=port, watchdog="4s")
    with S13Server(config, port, board=folder / "board") as srv:
        yield srv
    assert "Traceback" not in srv.output()


@pytest.fixture
def good(served: S13Server) -> Iterator[RawPeer]:
    peer = RawPeer(served.port, timeout=5).open()
    yield peer
    peer.close()


@pytest.fixture(autouse=True)
def still_answers(served: S13Server, good: RawPeer) -> Iterator[None]:
    yield
    # the well-behaved peer on its own connection is unaffected (and answers our DWRs)
    deadline = time.monotonic() + 5
    while True:
        good.send(ecr(BLOCKED, hbh=4242))
        answer = good.read()
        assert answer is not None, "the good peer's connection was dropped"
        if answer.header.flags & c.FLAG_R and answer.header.code == c.CMD_DWR:
            good.answer_watchdog(answer)
            answer = good.read()
        assert answer is not None
        if answer.header.hbh == 4242:
            break
        assert time.monotonic() < deadline
    assert answer.result == c.SUCCESS and answer.u32(c.EQUIPMENT_STATUS) == 1
    assert served.proc is not None and served.proc.poll() is None


def ecr_body(*avps: bytes, hbh: int = 9) -> bytes:
    """An ECR with exactly ``avps`` after the usual Session-Id/Origin/Destination AVPs."""
    base = [c.avp_text(c.SESSION_ID, "mme1.epc.test;1;9"),
            c.avp_u32(c.AUTH_SESSION_STATE, 1), c.avp_text(c.ORIGIN_HOST, "mme1.epc.test"),
            c.avp_text(c.ORIGIN_REALM, "epc.test"), c.avp_text(c.DESTINATION_REALM, "epc.test")]
    return c.message(c.FLAG_R | c.FLAG_P, c.CMD_ECR, c.APP_S13, hbh, hbh, *base, *avps)


def terminal(imei: bytes | None, *extra: bytes, software: bytes | None = b"01") -> bytes:
    inner = []
    if imei is not None:
        inner.append(c.avp(c.IMEI, imei, vendor=V))
    if software is not None:
        inner.append(c.avp(c.SOFTWARE_VERSION, software, vendor=V))
    return c.avp_grouped(TI, *inner, *extra, vendor=V)


def patched_length(message: bytes, length: int) -> bytes:
    return bytes([1]) + length.to_bytes(3, "big") + message[4:]


# -- framing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 12, 22, 16 * 1024 * 1024 - 4],
                         ids=["zero", "twelve", "not-multiple-of-4", "16MB"])
def test_impossible_message_length_is_refused_and_closed(served: S13Server, length: int) -> None:
    with RawPeer(served.port).open() as peer:
        peer.send(patched_length(ecr(BLOCKED), length))
        answer = peer.read()
        if answer is not None:
            assert answer.result == c.INVALID_MESSAGE_LENGTH
        assert peer.closed()


def test_version_other_than_1_is_refused_with_5011_and_closed(served: S13Server) -> None:
    with RawPeer(served.port).open() as peer:
        peer.send(bytes([2]) + ecr(BLOCKED)[1:])
        answer = peer.read()
        assert answer is not None and answer.result == c.UNSUPPORTED_VERSION
        assert peer.closed()


def test_one_megabyte_ecr_is_refused_without_being_read(served: S13Server) -> None:
    big = c.avp(4000, b"x" * (1 << 20), mandatory=False)
    with RawPeer(served.port).open() as peer:
        with_big = ecr_body(terminal(b"35209900176148"), big)
        # closed while we may still be writing: refused without reading it
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            peer.send(with_big)
        answer = peer.read()
        if answer is not None:
            assert answer.result == c.INVALID_MESSAGE_LENGTH
        assert peer.closed()


def test_truncated_header_then_close_is_harmless(served: S13Server) -> None:
    for cut in (1, 3, 4, 11, 19):
        with RawPeer(served.port).open() as peer:
            peer.send(ecr(BLOCKED)[:cut])


def test_half_a_header_then_silence_is_closed_after_a_timeout(served: S13Server) -> None:
    with RawPeer(served.port).open() as peer:
        peer.send(ecr(BLOCKED)[:10])
        started = time.monotonic()
        assert peer.closed(timeout=8)
        assert 3.5 <= time.monotonic() - started <= 8
    wait_for(lambda: served.figures()["connections"] == 1, 5.0, 0.2)  # the good peer
    assert served.figures()["closed"].get("stalled mid-message", 0) >= 1


def test_connection_that_never_sends_cer_is_closed(served: S13Server) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=8) as sock:
        assert sock.recv(100) == b""  # closed by the server after the stall timeout


# -- AVPs -------------------------------------------------------------------------------------


def test_avp_length_overrunning_the_message_is_5014(served: S13Server) -> None:
    message = bytearray(ecr_body(terminal(b"35209900176148")))
    # the last AVP (Terminal-Information) claims more than the message holds
    start = len(message) - len(terminal(b"35209900176148"))
    struct.pack_into("!I", message, start + 4, (0xC0 << 24) | 4000)
    with RawPeer(served.port).open() as peer:
        answer = peer.ask(bytes(message))
    assert answer.result == c.INVALID_AVP_LENGTH and answer.failed()


def test_avp_length_overrunning_its_grouped_avp_is_5014(served: S13Server) -> None:
    imei = bytearray(c.avp(c.IMEI, b"35209900176148", vendor=V))
    struct.pack_into("!I", imei, 4, (0xC0 << 24) | 400)
    with RawPeer(served.port).open() as peer:
        answer = peer.ask(ecr_body(c.avp_grouped(TI, bytes(imei), vendor=V)))
    assert answer.result == c.INVALID_AVP_LENGTH


def test_avp_shorter_than_its_header_is_5014(served: S13Server) -> None:
    broken = struct.pack("!II", 9999, (0x40 << 24) | 4)
    with RawPeer(served.port).open() as peer:
        answer = peer.ask(ecr_body(terminal(b"35209900176148"), broken))
    assert answer.result == c.INVALID_AVP_LENGTH


def test_grouped_nesting_bomb_is_refused_and_cheap(served: S13Server) -> None:
    bomb = c.avp(c.IMEI, b"35209900176148", vendor=V)
    for _ in range(5000):
        bomb = c.avp_grouped(4242, bomb, vendor=V)  # M bit: must be understood
    with RawPeer(served.port).open() as peer:
        inside = peer.ask(ecr_body(c.avp_grouped(TI, bomb, vendor=V), hbh=1))
        on_top = peer.ask(ecr_body(terminal(b"35209900176148"), bomb, hbh=2))
        unflagged = c.avp(4243, bomb, vendor=V, mandatory=False)
        ignored = peer.ask(ecr_body(terminal(b"35209900176148"), unflagged, hbh=3))
    assert inside.result == c.AVP_UNSUPPORTED and inside.failed()
    assert on_top.result == c.AVP_UNSUPPORTED
    assert ignored.result == c.SUCCESS and ignored.u32(c.EQUIPMENT_STATUS) == 1


def test_unknown_avp_with_the_m_bit_is_5001_naming_it(served: S13Server) -> None:
    unknown = c.avp_u32(7777, 1)
    with RawPeer(served.port).open() as peer:
        answer = peer.ask(ecr_body(terminal(b"35209900176148"), unknown))
        without_m = peer.ask(ecr_body(terminal(b"35209900176148"),
                                      c.avp_u32(7777, 1, mandatory=False)))
    assert answer.result == c.AVP_UNSUPPORTED and not answer.error_bit
    assert [a.code for a in answer.failed()] == [7777]
    assert without_m.result == c.SUCCESS


@pytest.mark.parametrize("imei", [b"3520990017614A", b"3520990017614", b"35209900176148123",
                                  b"3520990017614\x00", b"", "35209900176148٣".encode()],
                         ids=["letters", "13-digits", "17-digits", "nul", "empty",
                              "arabic-digit"])
def test_malformed_imei_is_5004_with_the_imei_as_failed_avp(served: S13Server,
                                                            imei: bytes) -> None:
    with RawPeer(served.port).open() as peer:
        answer = peer.ask(ecr_body(terminal(imei)))
    assert answer.result == c.INVALID_AVP_VALUE
    failed = answer.failed()
    assert [(a.code, a.vendor) for a in failed] == [(c.IMEI, V)]
    assert failed[0].value(answer.raw) == imei


def test_malformed_software_version_and_imsi_are_5004(served: S13Server) -> None:
    with RawPeer(served.port).open() as peer:
        svn = peer.ask(ecr_body(terminal(b"35209900176148", software=b"1x")))
        imsi = peer.ask(ecr(BLOCKED, imsi="imsi-2380100"))
    assert svn.result == c.INVALID_AVP_VALUE
    assert [a.code for a in svn.failed()] == [c.SOFTWARE_VERSION]
    assert imsi.result == c.INVALID_AVP_VALUE and [a.code for a in imsi.failed()] == [1]


def test_missing_terminal_information_or_imei_is_5005_with_an_example(
        served: S13Server) -> None:
    with RawPeer(served.port).open() as peer:
        no_terminal = peer.ask(ecr(BLOCKED, terminal=False))
        no_imei = peer.ask(ecr(None))
        no_session = peer.ask(c.message(
            c.FLAG_R, c.CMD_ECR, c.APP_S13, 3, 3, c.avp_u32(c.AUTH_SESSION_STATE, 1),
            c.avp_text(c.ORIGIN_HOST, "mme1.epc.test"), c.avp_text(c.ORIGIN_REALM, "epc.test"),
            c.avp_text(c.DESTINATION_REALM, "epc.test"), terminal(b"35209900176148")))
    assert no_terminal.result == c.MISSING_AVP
    assert [(a.code, a.vendor) for a in no_terminal.failed()] == [(TI, V)]
    assert no_imei.result == c.MISSING_AVP
    assert [(a.code, a.vendor) for a in no_imei.failed()] == [(c.IMEI, V)]
    assert no_session.result == c.MISSING_AVP
    assert [a.code for a in no_session.failed()] == [c.SESSION_ID]


def test_other_realm_unknown_command_and_unknown_application(served: S13Server) -> None:
    with RawPeer(served.port).open() as peer:
        realm = peer.ask(ecr(BLOCKED, realm="other.example"))
        command = peer.ask(c.message(c.FLAG_R, 318, c.APP_S13, 4, 4,
                                     c.avp_text(c.SESSION_ID, "x;1")))
        base_command = peer.ask(c.message(c.FLAG_R, 999, 0, 5, 5))
        application = peer.ask(c.message(c.FLAG_R, 316, 16777251, 6, 6,
                                         c.avp_text(c.SESSION_ID, "x;2")))
    assert realm.result == c.REALM_NOT_SERVED and realm.error_bit
    assert (command.result, command.error_bit, command.header.code) == (
        c.COMMAND_UNSUPPORTED, True, 318)
    assert (base_command.result, base_command.error_bit) == (c.COMMAND_UNSUPPORTED, True)
    assert (application.result, application.error_bit) == (c.APPLICATION_UNSUPPORTED, True)


def test_ecr_before_cer_is_refused_and_closed(served: S13Server) -> None:
    with RawPeer(served.port) as peer:
        peer.send(ecr(BLOCKED))
        answer = peer.read()
        assert answer is not None and answer.result == c.UNKNOWN_PEER and answer.error_bit
        assert peer.closed()


def test_malformed_cer_is_refused_and_closed(served: S13Server) -> None:
    no_host = c.message(c.FLAG_R, c.CMD_CER, 0, 1, 1, c.avp_text(c.ORIGIN_REALM, "epc.test"),
                        c.avp_u32(c.AUTH_APPLICATION_ID, c.APP_S13))
    broken = bytearray(cer())
    struct.pack_into("!I", broken, 24, (0x40 << 24) | 5000)
    for message in (no_host, bytes(broken)):
        with RawPeer(served.port) as peer:
            peer.send(message)
            answer = peer.read()
            assert answer is not None and answer.result in (c.MISSING_AVP, c.INVALID_AVP_LENGTH)
            assert peer.closed()


def test_random_garbage_is_closed(served: S13Server) -> None:
    import random

    rng = random.Random(13)
    for _ in range(50):
        with RawPeer(served.port) as peer:
            peer.send(cer() + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))))


def test_a_thousand_connections_opened_and_dropped_leave_nothing_behind(
        served: S13Server) -> None:
    for _ in range(200):  # warm up allocator pools before measuring
        RawPeer(served.port).close()
    time.sleep(1.2)
    rss, threads = served.rss_kb(), served.threads()
    for n in range(1000):
        peer = RawPeer(served.port)
        if n % 2:
            peer.send(cer())
        peer.close()
    wait_for(lambda: served.figures()["connections"] == 1, 5.0, 0.2)  # the good peer
    assert served.threads() == threads
    assert served.rss_kb() - rss < 4096, "memory grew by more than 4 MB"
    figures = json.loads(json.dumps(served.figures()))
    assert figures["peers"] == {"mme1.epc.test": 1}


def test_unread_answers_do_not_grow_memory_without_bound(served: S13Server) -> None:
    """A peer that writes ECRs and never reads: the server stops reading it."""
    rss = served.rss_kb()
    with RawPeer(served.port).open() as peer:
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.sock.settimeout(0.5)
        burst = ecr(BLOCKED) * 1000
        sent = 0
        try:
            for _ in range(200):
                peer.sock.sendall(burst)
                sent += 1
        except (TimeoutError, BlockingIOError):
            pass
    assert sent < 200, "the server kept reading although its answers were not read"
    assert served.rss_kb() - rss < 32 * 1024


def test_figures_count_refusals_and_answers(served: S13Server) -> None:
    time.sleep(1.1)
    figures = served.figures()
    assert figures["refused"].get("request before CER", 0) >= 1
    assert figures["ready"] is True
    codes = {(cmd, code) for cmd, code, _ in figures["answers"]}
    assert (c.CMD_CER, c.SUCCESS) in codes
