"""Wire conformance: tshark's Diameter dissector judges the bytes our S13 node sends.

Requests and answers exchanged with a real S13 process are written to pcap files with
``text2pcap`` — once in TCP, once in SCTP encapsulation (PPID 46, Diameter) — and tshark must
decode Result-Code, Experimental-Result-Code and Equipment-Status as expected, with no
malformed packet and no expert warning. A deliberately broken answer proves the check can fail.

Locally these tests skip when tshark is missing (``./scripts/test`` installs it when run as
root); in CI (``CI`` set) a missing tshark fails them. The live SCTP test skips, saying why,
where the kernel has no SCTP.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from imeisync.adapters.diameter import codec as c
from support.eir_harness import free_port, seed
from support.s13_harness import Answer, RawPeer, S13Server, cer, ecr, write_s13_config

BLOCKED = "35209900176148"
TRACKED = "49015420323751"
CLONED = "35686800004141"
IMSI = "238010000000001"
UNKNOWN = "01234567890123"
FIELDS = ("frame.number", "diameter.cmd.code", "diameter.flags.request", "diameter.flags.error",
          "diameter.Result-Code", "diameter.Experimental-Result-Code",
          "diameter.Equipment-Status")
PROBLEMS = "_ws.malformed || _ws.expert.severity >= 8388608"  # errors
# The only warnings expected: the example of a missing IMEI in 5005's Failed-AVP (RFC 6733
# §7.5: the missing AVP with a minimum-length, here empty, value), and command 999, which the
# test sends precisely because no dictionary knows it.
EXPECTED_WARNINGS = {"Data is empty", "Unknown command, if you know what this is you can add "
                     "it to dictionary.xml"}


def _in_ci() -> bool:
    return os.environ.get("CI", "") not in ("", "0", "false")


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    missing = [tool for tool in ("tshark", "text2pcap") if shutil.which(tool) is None]
    if missing:
        message = f"{', '.join(missing)} not installed (Debian package tshark)"
        if _in_ci():
            pytest.fail(f"conformance tests must run in CI: {message}", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="module")
def exchange(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, bytes]]:
    """(direction, bytes) of one conversation: O = MME to EIR, I = EIR to MME."""
    folder = tmp_path_factory.mktemp("s13-tshark")
    url = f"sqlite:///{folder / 'imeisync.db'}"
    seed(url, [(BLOCKED, "block", "op-se"), (TRACKED, "track", "op-se"),
               (CLONED, "block", "op-se")], exceptions=[(CLONED, IMSI)])
    port = free_port()
    packets: list[tuple[str, bytes]] = []
    config = write_s13_config(folder, url, port=port, unknown_status="NOT_FOUND")
    with S13Server(config, port), RawPeer(port) as peer:
        for request in (cer(), ecr(BLOCKED), ecr(TRACKED), ecr(CLONED, imsi=IMSI),
                        ecr(UNKNOWN), ecr("3520990017614A"), ecr(None),
                        c.message(c.FLAG_R, 999, 0, 8, 8, c.avp_text(c.ORIGIN_HOST, "m.t"),
                                  c.avp_text(c.ORIGIN_REALM, "epc.test")),
                        c.message(c.FLAG_R, c.CMD_DWR, 0, 9, 9, c.avp_text(c.ORIGIN_HOST, "m.t"),
                                  c.avp_text(c.ORIGIN_REALM, "epc.test")),
                        c.message(c.FLAG_R, c.CMD_DPR, 0, 10, 10,
                                  c.avp_text(c.ORIGIN_HOST, "m.t"),
                                  c.avp_text(c.ORIGIN_REALM, "epc.test"),
                                  c.avp_u32(c.DISCONNECT_CAUSE, 0))):
            answer = peer.ask(request)
            packets += [("O", request), ("I", answer.raw)]
    return packets


# Per answer: (command, error bit, Result-Code, Experimental-Result-Code, Equipment-Status)
EXPECTED = [
    ("257", "0", "2001", "", ""),
    ("324", "0", "2001", "", "1"),
    ("324", "0", "2001", "", "2"),
    ("324", "0", "2001", "", "0"),
    ("324", "0", "", "5422", ""),
    ("324", "0", "5004", "", ""),
    ("324", "0", "5005", "", ""),
    ("999", "1", "3001", "", ""),
    ("280", "0", "2001", "", ""),
    ("282", "0", "2001", "", ""),
]


def write_pcap(folder: Path, packets: list[tuple[str, bytes]], encapsulation: str) -> Path:
    """text2pcap's input: a direction line, then an offset-hex dump of each message."""
    lines = []
    for direction, raw in packets:
        lines.append(direction)
        for at in range(0, len(raw), 16):
            lines.append(f"{at:06x} " + " ".join(f"{b:02x}" for b in raw[at:at + 16]))
    dump = folder / f"{encapsulation}.txt"
    dump.write_text("\n".join(lines) + "\n")
    pcap = folder / f"{encapsulation}.pcap"
    ports = ["-T", "40000,3868"] if encapsulation == "tcp" else ["-S", "40000,3868,46"]
    subprocess.run(["text2pcap", "-q", "-D", "-4", "10.0.0.1,10.0.0.2", *ports, str(dump),
                    str(pcap)], check=True, capture_output=True, timeout=30)
    return pcap


def tshark(pcap: Path, *args: str) -> str:
    done = subprocess.run(["tshark", "-n", "-r", str(pcap), *args], capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout


def decoded(pcap: Path) -> list[list[str]]:
    fields = [arg for name in FIELDS for arg in ("-e", name)]
    out = tshark(pcap, "-T", "fields", "-E", "separator=\t", "-E", "occurrence=f", *fields)
    return [line.split("\t") for line in out.splitlines()]


@pytest.mark.parametrize("encapsulation", ["tcp", "sctp"])
def test_tshark_decodes_our_answers_as_expected(tmp_path: Path,
                                                exchange: list[tuple[str, bytes]],
                                                encapsulation: str) -> None:
    pcap = write_pcap(tmp_path, exchange, encapsulation)
    rows = decoded(pcap)
    assert len(rows) == len(exchange), rows
    answers = [row for row in rows if row[2] in ("0", "False")]
    requests = [row for row in rows if row[2] in ("1", "True")]
    assert len(requests) == len(answers) == len(EXPECTED), rows
    got = [(row[1], "1" if row[3] in ("1", "True") else "0", *row[4:7]) for row in answers]
    assert got == EXPECTED
    assert tshark(pcap, "-Y", PROBLEMS) == "", "tshark reports malformed packets or errors"
    warnings = tshark(pcap, "-Y", "_ws.expert.severity == 6291456", "-T", "fields",
                      "-e", "frame.number", "-e", "_ws.expert.message")
    found = {tuple(line.split("\t")) for line in warnings.splitlines()}
    assert {message for _, message in found} <= EXPECTED_WARNINGS, found
    assert {int(frame) for frame, message in found if message == "Data is empty"} == {14}


def test_the_conformance_check_can_fail(tmp_path: Path,
                                        exchange: list[tuple[str, bytes]]) -> None:
    broken = bytearray(exchange[3][1])  # the first ECA
    broken[26] = 0xFF  # its Session-Id AVP now claims 65 KB
    pcap = write_pcap(tmp_path, [("I", bytes(broken))], "tcp")
    assert tshark(pcap, "-Y", PROBLEMS) != ""


def test_live_sctp_association_gets_the_same_answers(tmp_path: Path) -> None:
    from imeisync.entrypoints.s13 import sctp_available

    if not sctp_available():
        pytest.skip("this kernel has no SCTP: socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) "
                    "fails (modprobe sctp where allowed); the SCTP encapsulation is still "
                    "checked by tshark above")
    url = f"sqlite:///{tmp_path / 'imeisync.db'}"
    seed(url, [(BLOCKED, "block", "op-se")])
    port = free_port()
    config = write_s13_config(tmp_path, url, port=port)
    config.write_text(config.read_text() + 'transport = "sctp"\n')
    with S13Server(config, port):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        try:
            got = []
            for request in (cer(), ecr(BLOCKED)):
                sock.sendall(request)
                data = b""
                while len(data) < 4 or len(data) < int.from_bytes(data[1:4], "big"):
                    data += sock.recv(65536)
                got.append(Answer(data))
        finally:
            sock.close()
    assert got[0].result == c.SUCCESS
    assert got[1].result == c.SUCCESS and got[1].u32(c.EQUIPMENT_STATUS) == 1
