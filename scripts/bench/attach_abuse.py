#!/usr/bin/env python3
"""Idle connections and slow clients against the attach check (not a test; loopback, bounded).

While an AMF that connected beforehand keeps checking on its persistent connection:

* ``--idle`` (10,000) TCP connections that never send a byte;
* ``--slow`` HTTP/1.1 slowloris clients, one header byte a second, reconnecting when closed;
* ``--h2`` HTTP/2 clients that open 100 streams each (flow-control window 0, so no answer can
  be sent) and never read nor answer a PING;

for ``--duration`` s (``--short``: 8). Printed: the served AMF's p50/p99 and statuses before,
during and after; whether a NEW connection is served during the flood; how many abusive
connections the server closed; worker RSS before, during and after.

    .venv/bin/python scripts/bench/attach_abuse.py [--short] [--idle 10000] [--workers 1]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eir_proc import EIC, Eir, pct, raise_open_files

ABUSER = "127.0.0.3"  # another address of the loopback interface: not the AMF's
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") \
        + payload


def h2_never_reading(streams: int) -> bytes:
    """Preface, SETTINGS with INITIAL_WINDOW_SIZE 0 (the server may send no DATA), then
    ``streams`` GETs of the attach check (HPACK literals without indexing)."""
    settings = frame(4, 0, 0, (4).to_bytes(2, "big") + (0).to_bytes(4, "big"))
    out = [PREFACE, settings]

    def literal(name: bytes, value: bytes) -> bytes:
        return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

    path = f"{EIC}?pei=imei-350000000000000".encode()
    block = (b"\x82\x86" + literal(b":path", path) + literal(b":authority", b"127.0.0.1"))
    for n in range(streams):
        out.append(frame(1, 0x5, 2 * n + 1, block))  # HEADERS, END_STREAM | END_HEADERS
    return b"".join(out)


def connect_many(port: int, count: int, source: str = ABUSER) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        code = sock.connect_ex(("127.0.0.1", port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            break
        socks.append(sock)
    return socks


def alive(sock: socket.socket) -> bool:
    """Not closed by the server: what it sent (unread so far) is drained, then no EOF and no
    reset."""
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def new_client_first_answer(url: str, timeout: float = 5.0) -> str:
    import http.client

    host, port = url.split("//")[1].split(":")
    started = time.perf_counter()
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        conn.request("GET", f"{EIC}?pei=imei-350000000000000")
        status = conn.getresponse().status
        conn.close()
    except OSError as exc:
        return f"not served within {timeout:.0f}s ({type(exc).__name__})"
    return f"status {status} in {(time.perf_counter() - started) * 1000:.1f} ms"


class Amf(threading.Thread):
    """An AMF connected before the flood: one HTTP/2 connection (as N5g-eir clients use),
    a check every 2 ms throughout; ``(time, ms, status)`` per check, 0 for a failed one."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.seen: list[tuple[float, float, int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(http1=False, http2=True, base_url=self.url, timeout=10) as client:
            n = 0
            while not self.stopping.is_set():
                n += 1
                started = time.perf_counter()
                try:
                    status = client.get(EIC, params={"pei": f"imei-{35 * 10**12 + n:014d}"}
                                        ).status_code
                except httpx.HTTPError:
                    status = 0
                self.seen.append((time.monotonic(), (time.perf_counter() - started) * 1000,
                                  status))
                time.sleep(0.002)

    def between(self, start: float, end: float) -> str:
        rows = [(ms, code) for at, ms, code in self.seen if start <= at < end]
        lat = [ms for ms, _ in rows]
        codes = sorted({code for _, code in rows})
        return (f"AMF p50 {pct(lat, 50):.3f} ms, p99 {pct(lat, 99):.3f} ms over {len(rows):,} "
                f"checks, statuses {codes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--short", action="store_true")
    parser.add_argument("--duration", type=int, default=30)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--slow", type=int, default=200)
    parser.add_argument("--h2", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.short:
        args.duration = 8
    limit = raise_open_files(args.idle + args.slow + args.h2 + 4096)
    print(f"attach check under idle and slow clients, {args.workers} worker(s), loopback, "
          f"ulimit -n {limit}; the machine may be shared: figures are indicative", flush=True)
    with tempfile.TemporaryDirectory(prefix="attach-abuse-") as tmp, \
            Eir(Path(tmp) / "eir", workers=args.workers) as eir:
        amf = Amf(eir.url)
        amf.start()
        t0 = time.monotonic()
        time.sleep(3)
        print(f"before: {amf.between(t0, time.monotonic())}; RSS {eir.rss_mib():.1f} MiB",
              flush=True)
        t1 = time.monotonic()
        h2 = connect_many(eir.port, args.h2)
        time.sleep(0.2)
        for sock in h2:
            with contextlib.suppress(OSError):
                sock.send(h2_never_reading(100))
        slow = connect_many(eir.port, args.slow)
        idle = connect_many(eir.port, args.idle)
        print(f"opened in {time.monotonic() - t1:.1f}s: {len(idle):,} idle, {len(slow)} "
              f"slowloris HTTP/1.1, {len(h2)} HTTP/2 never reading (100 streams each)",
              flush=True)
        slow_closed = 0
        ended = time.monotonic() + args.duration
        newcomer = ""
        peak = 0.0
        tick = 0
        while time.monotonic() < ended:
            tick += 1
            for n, sock in enumerate(slow):  # one byte of a never-ending header
                try:
                    sock.send(b"GET / HTTP/1.1\r\nX-a: " if tick == 1 else b"a")
                except OSError:
                    slow_closed += 1
                    sock.close()
                    slow[n] = connect_many(eir.port, 1)[0]
            if tick == 2:
                newcomer = new_client_first_answer(eir.url)
            peak = max(peak, eir.rss_mib())
            time.sleep(1)
        t2 = time.monotonic()
        idle_closed = sum(not alive(s) for s in idle)
        h2_closed = sum(not alive(s) for s in h2)
        print(f"during ({args.duration}s + opening): {amf.between(t1, t2)}; worker RSS peak "
              f"{peak:.1f} MiB")
        print(f"  a new client during the flood: {newcomer}")
        print(f"  closed by the server: {slow_closed} slowloris connections (each reconnected),"
              f" {h2_closed}/{len(h2)} HTTP/2, {idle_closed:,}/{len(idle):,} idle")
        for sock in idle + slow + h2:
            sock.close()
        time.sleep(2)
        t3 = time.monotonic()
        time.sleep(3)
        amf.stopping.set()
        amf.join(timeout=15)
        print(f"after: {amf.between(t3, time.monotonic())}; RSS {eir.rss_mib():.1f} MiB; "
              f"new client: {new_client_first_answer(eir.url)}")
        errors = eir.errors()
        print(f"server log: {len(errors)} error line(s)" + (f": {errors[:3]}" if errors else ""))


if __name__ == "__main__":
    main()
