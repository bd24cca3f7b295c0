"""Admission control on the attach check: a client over its share is refused at once (N5g-eir
503 NF_CONGESTION + Retry-After, S13 3004 with the E bit) while another client is served, and
connections that idle or dribble are closed.

Real servers on 127.0.0.1 (Granian for N5g-eir, the S13 child for Diameter); the flooding
client connects from 127.0.0.2 (loopback too) so that it is another AMF address than the
served one. A burst is one write of many requests: the server reads them together, so they wait
in one batch of the worker's event loop, which is what admission bounds.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest

from imeisync.adapters.diameter import codec as c
from imeisync.adapters.diameter.s13 import OUTCOMES
from imeisync.entrypoints.admission import (
    HEADER_READ_TIMEOUT_MS,
    PING_INTERVAL_MS,
    PING_TIMEOUT_S,
    STREAMS_PER_CONNECTION,
    WINDOW_BYTES,
    Admission,
)
from support.eir_harness import EIC, EirServer, free_port, seed, write_eir_config
from support.s13_harness import MME, RawPeer, S13Server, cer, ecr, write_s13_config

BLOCKED = "35209900176148"
FLOODER = "127.0.0.2"  # another address of the loopback interface: another client
# One worker, 8 checks per loop batch, a quarter (2) of them per client.
LIMITS = "max_inflight = 8\nper_client_share = 0.25\n"


def with_limits(config: Path) -> Path:
    text = config.read_text()
    config.write_text(text.replace("[eir]\n", "[eir]\n" + LIMITS, 1))
    return config


# -- the batch rule, on a real event loop ---------------------------------------------------------


def test_a_batch_admits_each_client_its_share_and_the_worker_max_inflight_then_resets() -> None:
    async def scenario() -> list[list[bool]]:
        admission = Admission(max_inflight=6, per_client_share=0.5)  # share 3, 6 in all
        batches = []
        for clients in (["a"] * 5 + ["b"] * 2, ["b", "c", "d", "a", "b", "c", "d", "e"]):
            batches.append([admission.admit(client) for client in clients])
            await asyncio.sleep(0)  # the loop runs its next batch: the reset came first
        return batches

    first, second = asyncio.run(scenario())
    assert first == [True] * 3 + [False] * 2 + [True, True]  # a: its 3; b still served
    assert second == [True] * 6 + [False] * 2  # fresh batch; the worker's 6, then refused


@pytest.mark.parametrize(("max_inflight", "share"), [(0, 0.5), (8, 0.0), (8, 1.5)])
def test_limits_out_of_range_are_refused(max_inflight: int, share: float) -> None:
    with pytest.raises(ValueError):
        Admission(max_inflight, share)


# -- N5g-eir over real Granian ------------------------------------------------------------------


@pytest.fixture(scope="module")
def eir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EirServer]:
    folder = tmp_path_factory.mktemp("admission-eir")
    url = f"sqlite:///{folder / 'imeisync.db'}"
    seed(url, [(BLOCKED, "block", "op-se")])
    port = free_port()
    with EirServer(with_limits(write_eir_config(folder, url, port=port)), port) as srv:
        yield srv


def h2_burst(port: int, count: int, source: str = FLOODER) -> list[tuple[int, dict[str, str],
                                                                         bytes]]:
    """``count`` attach checks on one HTTP/2 connection, sent in one write; the answers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    for _ in range(count):
        conn.send_headers(conn.get_next_available_stream_id(), [
            (":method", "GET"), (":scheme", "http"), (":authority", "127.0.0.1"),
            (":path", f"{EIC}?pei=imei-{BLOCKED}0")], end_stream=True)
    sock.sendall(conn.data_to_send())
    heads: dict[int, tuple[int, dict[str, str]]] = {}
    bodies: dict[int, bytes] = {}
    done: set[int] = set()
    try:
        while len(done) < count:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    fields = {k.decode(): v.decode() for k, v in event.headers}
                    heads[event.stream_id] = (int(fields[":status"]), fields)
                elif isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
                    conn.acknowledge_received_data(event.flow_controlled_length,
                                                   event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    done.add(event.stream_id)
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return [(*heads[sid], bodies.get(sid, b"")) for sid in sorted(done)]


def congested(srv: EirServer) -> float:
    for line in httpx.get(srv.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("imeisync_attach_checks_total") and 'outcome="congested"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no congested outcome in /metrics")


def test_a_client_over_its_share_gets_503_nf_congestion_while_another_is_served(
        eir: EirServer) -> None:
    before = congested(eir)
    served: list[int] = []
    stop = threading.Event()

    def other_amf() -> None:  # one check at a time from 127.0.0.1, all through the flood
        with httpx.Client(base_url=eir.url, timeout=5) as client:
            while not stop.is_set() or len(served) < 20:
                served.append(client.get(EIC, params={"pei": f"imei-{BLOCKED}0"}).status_code)

    thread = threading.Thread(target=other_amf)
    thread.start()
    try:
        answers = [a for _ in range(10) for a in h2_burst(eir.port, 30)]
    finally:
        stop.set()
        thread.join(timeout=30)
    assert len(answers) == 300
    refused = [a for a in answers if a[0] == 503]
    admitted = [a for a in answers if a[0] != 503]
    assert refused and admitted, [a[0] for a in answers]
    for _, fields, body in refused:
        problem = json.loads(body)
        assert fields["content-type"] == "application/problem+json"
        assert fields["retry-after"] == "1"
        assert (problem["status"], problem["cause"]) == (503, "NF_CONGESTION")
    assert {(s, json.loads(b)["status"]) for s, _, b in admitted} == {(200, "BLACKLISTED")}
    assert served and set(served) == {200}, served
    assert congested(eir) - before == len(refused)


def test_after_the_burst_the_flooding_client_is_served_again(eir: EirServer) -> None:
    h2_burst(eir.port, 30)
    with httpx.Client(timeout=5, transport=httpx.HTTPTransport(local_address=FLOODER)) as client:
        answer = client.get(eir.url + EIC, params={"pei": f"imei-{BLOCKED}0"})
    assert (answer.status_code, answer.json()) == (200, {"status": "BLACKLISTED"})


def test_http2_settings_cap_streams_and_windows_per_connection(eir: EirServer) -> None:
    sock = socket.create_connection(("127.0.0.1", eir.port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    settings: dict[int, int] = {}
    try:
        while not settings:
            for event in conn.receive_data(sock.recv(65536)):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    settings = {k: v.new_value for k, v in event.changed_settings.items()}
    finally:
        sock.close()
    assert settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == STREAMS_PER_CONNECTION
    assert settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] == WINDOW_BYTES


def _closed_after(port: int, payload: bytes, limit: float) -> float:
    sock = socket.create_connection(("127.0.0.1", port), timeout=limit)
    try:
        sock.sendall(payload)
        started = time.monotonic()
        while sock.recv(65536):
            pass
        return time.monotonic() - started
    except TimeoutError:
        return float("inf")
    finally:
        sock.close()


def test_dribbling_idle_and_silent_http2_connections_are_closed(eir: EirServer) -> None:
    header_timeout = HEADER_READ_TIMEOUT_MS / 1000
    ping_deadline = PING_INTERVAL_MS / 1000 + PING_TIMEOUT_S
    cases = {  # payload → the limit it must be closed within
        "half a request (slowloris)": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ",
                                       header_timeout + 3),
        "keep-alive left idle": (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", header_timeout + 3),
        "HTTP/2 that never answers a PING": (
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]),
            ping_deadline + 3),
    }
    took: dict[str, float] = {}
    threads = [threading.Thread(target=lambda n=name, p=payload, t=limit: took.__setitem__(
        n, _closed_after(eir.port, p, t))) for name, (payload, limit) in cases.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, (_, limit) in cases.items():
        assert took[name] <= limit, (name, took[name])
    assert httpx.get(eir.url + "/healthz", timeout=5).status_code == 200


# -- S13 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s13(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S13Server]:
    folder = tmp_path_factory.mktemp("admission-s13")
    url = f"sqlite:///{folder / 'imeisync.db'}"
    seed(url, [(BLOCKED, "block", "op-se")])
    port = free_port()
    config = with_limits(write_s13_config(folder, url, port=port))
    with S13Server(config, port, board=folder / "board") as srv:
        yield srv


def test_a_peer_over_its_share_gets_3004_with_the_e_bit_while_another_peer_is_served(
        s13: S13Server) -> None:
    count = 200
    with RawPeer(s13.port).open() as flooder, RawPeer(s13.port).open("mme2.epc.test") as other:
        flooder.send(b"".join(ecr(BLOCKED, hbh=n) for n in range(count)))
        answers = [flooder.read() for _ in range(count)]
        served = other.ask(ecr(BLOCKED, hbh=7))
    assert all(answers)
    assert [a.header.hbh for a in answers if a] == list(range(count))  # each answered, in order
    busy = [a for a in answers if a and a.result == c.TOO_BUSY]
    verdicts = [a for a in answers if a and a.result == c.SUCCESS]
    assert busy and verdicts and len(busy) + len(verdicts) == count
    assert all(a.error_bit for a in busy)  # RFC 6733 §7.1.3: a protocol error
    assert all(a.u32(c.EQUIPMENT_STATUS) == 1 for a in verdicts)
    assert (served.result, served.u32(c.EQUIPMENT_STATUS)) == (c.SUCCESS, 1)
    assert not served.error_bit
    deadline = time.monotonic() + 5  # the child writes its figures once a second
    while s13.figures()["counts"][OUTCOMES.index("congested")] < len(busy):
        assert time.monotonic() < deadline, s13.figures()["counts"]
        time.sleep(0.1)


def test_connections_beyond_the_per_peer_cap_get_a_cea_3004_and_are_closed(
        s13: S13Server) -> None:
    from imeisync.entrypoints.s13_server import Settings

    cap = Settings("x", "y", None).max_connections_per_peer
    peers = [RawPeer(s13.port) for _ in range(cap + 1)]
    try:
        results = [peer.ask(cer(MME)) for peer in peers]
        assert [a.result for a in results] == [c.SUCCESS] * cap + [c.TOO_BUSY]
        assert results[-1].error_bit
        assert peers[-1].closed()
        assert peers[0].ask(ecr(BLOCKED)).u32(c.EQUIPMENT_STATUS) == 1  # the others go on
    finally:
        for peer in peers:
            peer.close()


def test_tshark_decodes_a_refusal_as_an_eca_3004_with_the_e_bit(s13: S13Server,
                                                               tmp_path: Path) -> None:
    from test_s13_tshark import PROBLEMS, _in_ci, decoded, tshark, write_pcap

    missing = [tool for tool in ("tshark", "text2pcap") if shutil.which(tool) is None]
    if missing:
        if _in_ci():
            pytest.fail(f"{', '.join(missing)} not installed (Debian package tshark)")
        pytest.skip(f"{', '.join(missing)} not installed (Debian package tshark)")
    requests = [ecr(BLOCKED, hbh=n) for n in range(200)]
    with RawPeer(s13.port).open() as flooder:
        flooder.send(b"".join(requests))
        answers = [flooder.read() for _ in requests]
    n = next(i for i, a in enumerate(answers) if a and a.result == c.TOO_BUSY)
    refusal = answers[n]
    assert refusal is not None
    pcap = write_pcap(tmp_path, [("O", requests[n]), ("I", refusal.raw)], "tcp")
    rows = [(row[1], row[3] in ("1", "True"), row[4]) for row in decoded(pcap)]
    assert rows == [("324", False, ""), ("324", True, "3004")]
    assert tshark(pcap, "-Y", PROBLEMS) == "", "tshark reports a malformed packet or an error"


def test_connections_beyond_the_listener_cap_are_closed_at_once(s13: S13Server) -> None:
    from imeisync.entrypoints.s13_server import Settings

    cap = Settings("x", "y", None).max_connections  # before CER included
    socks = [socket.create_connection(("127.0.0.1", s13.port), timeout=5)
             for _ in range(cap + 8)]
    for sock in socks:
        sock.setblocking(False)

    def closed(sock: socket.socket) -> bool:
        try:
            return sock.recv(1) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    try:
        deadline = time.monotonic() + 5  # well before the 10 s a connection without CER gets
        while not all(closed(sock) for sock in socks[-8:]):
            assert time.monotonic() < deadline, [closed(sock) for sock in socks[-8:]]
            time.sleep(0.1)
        assert [n for n, sock in enumerate(socks[:cap - 16]) if closed(sock)] == []
    finally:
        for sock in socks:
            sock.close()
    with RawPeer(s13.port).open() as peer:  # once they are gone, peers are let in again
        assert peer.ask(ecr(BLOCKED)).u32(c.EQUIPMENT_STATUS) == 1
