#!/usr/bin/env python3
"""Idle and slow connections against the S13 listener (not a test; loopback, bounded).

While an MME that connected beforehand keeps sending ECRs (one at a time) on its connection:

* ``--idle`` (10,000) TCP connections that never send a byte (from another loopback address);
* ``--slow`` connections dribbling a CER one byte a second, reconnecting when closed;
* ``--flood`` ECRs in one write from a second peer, every second (over its share: 3004);

for ``--duration`` s (``--short``: 12). Printed: the MME's p50/p99 and result codes before,
during and after; the flooding peer's answers by result code; whether a NEW MME is let in
during the flood; RSS of the S13 process before, at peak and after.

    .venv/bin/python scripts/bench/s13_abuse.py [--short] [--idle 10000]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent / "src"))
from attach_abuse import connect_many  # noqa: E402
from eir_proc import ROOT, create_store, free_port, pct, raise_open_files  # noqa: E402
from s13 import EIR, MME, REALM, _verdict, cer, make_ecr  # noqa: E402

BLOCKED_KEY = 35209900176148  # not in the (empty) store: answered 2001 + Equipment-Status 0


def read_message(sock: socket.socket) -> bytes:
    head = b""
    while len(head) < 4:
        part = sock.recv(4 - len(head))
        if not part:
            raise ConnectionError("closed")
        head += part
    length = struct.unpack("!I", head)[0] & 0xFFFFFF
    body = head
    while len(body) < length:
        part = sock.recv(length - len(body))
        if not part:
            raise ConnectionError("closed")
        body += part
    return body


def peer(port: int, host: str) -> tuple[socket.socket, int | None]:
    """A connection that has done its CER: the socket and the CEA's Result-Code."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(cer(host))
    return sock, _verdict(read_message(sock))[0]


class Mme(threading.Thread):
    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.sock, _ = peer(port, MME.format(1))
        self.seen: list[tuple[float, float, int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        hbh = 0
        while not self.stopping.is_set():
            hbh += 1
            started = time.perf_counter()
            try:
                self.sock.sendall(make_ecr(BLOCKED_KEY, "238010000000001", hbh))
                code = _verdict(read_message(self.sock))[0] or 0
            except OSError:
                code = -1
            self.seen.append((time.monotonic(), (time.perf_counter() - started) * 1000, code))
            time.sleep(0.002)

    def between(self, start: float, end: float) -> str:
        rows = [(ms, code) for at, ms, code in self.seen if start <= at < end]
        lat = [ms for ms, _ in rows]
        return (f"MME p50 {pct(lat, 50):.3f} ms, p99 {pct(lat, 99):.3f} ms over {len(rows):,} "
                f"ECRs, result codes {sorted({code for _, code in rows})}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_s13(work: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    db = work / "imeisync.db"
    (work / "police-keys").mkdir(parents=True, exist_ok=True)
    create_store(db)
    config = work / "imeisync.toml"
    hosts = ", ".join(f'"{MME.format(n)}"' for n in range(1, 4))
    config.write_text(
        f'[operator]\nid = "op-dk"\ncountry = "DK"\n[database]\nurl = "sqlite:///{db}"\n'
        f'[police]\ntrusted_keys = "{work / "police-keys"}"\n'
        f'[security]\ndata_key_file = "{work / "data.key"}"\n[log]\nlevel = "INFO"\n'
        f'[eir]\nlisten = "127.0.0.1:{free_port()}"\nworkers = 1\n'
        f'index_file = "{work / "attach-index.bin"}"\n'
        f'[s13]\nlisten = "127.0.0.1:{port}"\norigin_host = "{EIR}"\n'
        f'origin_realm = "{REALM}"\npeers = [{hosts}]\nwatchdog = "30s"\n', encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMEISYNC_")}
    env["PYTHONPATH"] = str(ROOT / "src")
    log = work / "s13.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "imeisync.entrypoints.s13", "--config",
                                 str(config)], stdout=handle, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + 60
    while "attach index ready" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the S13 listener did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return proc, port, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--short", action="store_true")
    parser.add_argument("--duration", type=int, default=30)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--slow", type=int, default=200)
    parser.add_argument("--flood", type=int, default=2_000)
    args = parser.parse_args()
    if args.short:
        args.duration = 12
    limit = raise_open_files(args.idle + args.slow + 4096)
    print(f"S13 listener under idle and slow connections, loopback, ulimit -n {limit}; the "
          "machine may be shared: figures are indicative", flush=True)
    with tempfile.TemporaryDirectory(prefix="s13-abuse-") as tmp:
        proc, port, log = start_s13(Path(tmp))
        try:
            mme = Mme(port)
            mme.start()
            t0 = time.monotonic()
            time.sleep(3)
            print(f"before: {mme.between(t0, time.monotonic())}; RSS {rss_mib(proc.pid):.1f} MiB",
                  flush=True)
            t1 = time.monotonic()
            flooder, _ = peer(port, MME.format(2))
            burst = b"".join(make_ecr(BLOCKED_KEY, "238010000000001", n)
                             for n in range(args.flood))
            slow = connect_many(port, args.slow)
            idle = connect_many(port, args.idle)
            print(f"opened in {time.monotonic() - t1:.1f}s: {len(idle):,} idle, {len(slow)} "
                  "dribbling a CER; a second peer sends "
                  f"{args.flood:,} ECRs in one write every second", flush=True)
            flood_codes: Counter[int] = Counter()
            slow_closed, peak, newcomer, tick = 0, 0.0, "", 0
            cer_bytes = cer(MME.format(3))
            ended = time.monotonic() + args.duration
            while time.monotonic() < ended:
                tick += 1
                flooder.sendall(burst)
                for _ in range(args.flood):
                    flood_codes[_verdict(read_message(flooder))[0] or 0] += 1
                for n, sock in enumerate(slow):
                    try:
                        sock.send(cer_bytes[tick - 1:tick] or b"\x00")
                    except OSError:
                        slow_closed += 1
                        sock.close()
                        slow[n] = connect_many(port, 1)[0]
                if tick == 2:
                    try:
                        sock, code = peer(port, MME.format(3))
                        sock.close()
                        newcomer = f"CEA {code}"
                    except OSError as exc:
                        newcomer = f"not let in ({type(exc).__name__})"
                peak = max(peak, rss_mib(proc.pid))
                time.sleep(1)
            t2 = time.monotonic()
            print(f"during ({args.duration}s): {mme.between(t1, t2)}; RSS peak {peak:.1f} MiB")
            print(f"  the flooding peer's answers: {dict(sorted(flood_codes.items()))} "
                  f"(3004 = DIAMETER_TOO_BUSY)")
            print(f"  a new MME during the flood: {newcomer}; slow connections closed by the "
                  f"server: {slow_closed}")
            for sock in [*idle, *slow, flooder]:
                sock.close()
            time.sleep(2)
            t3 = time.monotonic()
            time.sleep(3)
            mme.stopping.set()
            mme.join(timeout=15)
            sock, code = peer(port, MME.format(3))
            sock.close()
            print(f"after: {mme.between(t3, time.monotonic())}; RSS {rss_mib(proc.pid):.1f} "
                  f"MiB; a new MME: CEA {code}")
            errors = [line for line in log.read_text(errors="replace").splitlines()
                      if "ERROR" in line or "Traceback" in line]
            print(f"server log: {len(errors)} error line(s)" + (f": {errors[:3]}" if errors
                                                                else ""))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the session it was started in
                proc.wait(timeout=5)


if __name__ == "__main__":
    main()
