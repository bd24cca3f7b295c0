"""Shared by the flood benchmarks: a raw HTTP/1.1 keep-alive flooder (asyncio, one request
repeated on every connection, from another loopback address) run in its own process, counting
answers by status, and a percentile."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time

FLOOD_FROM = "127.0.0.2"  # the flood's source: not the address of those it should not hurt


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _flood(port: int, request: bytes, connections: int, seconds: float
                 ) -> dict[str, int]:
    counts: dict[str, int] = {}
    deadline = time.monotonic() + seconds

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(FLOOD_FROM, 0))
        try:
            while time.monotonic() < deadline:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = head[9:12].decode()
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                counts[status] = counts.get(status, 0) + 1
        except (ConnectionError, asyncio.IncompleteReadError):
            counts["reset"] = counts.get("reset", 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return counts


def _run(port: int, request: bytes, connections: int, seconds: float, nice: int,
         out: multiprocessing.Queue) -> None:
    os.nice(nice)
    out.put(asyncio.run(_flood(port, request, connections, seconds)))


class Flood:
    """``processes`` flooding processes sending ``request`` to 127.0.0.1:``port``."""

    def __init__(self, port: int, request: bytes, *, processes: int = 2, connections: int = 16,
                 seconds: float = 10.0, nice: int = 0):
        self.queue: multiprocessing.Queue = multiprocessing.Queue()
        self.seconds = seconds
        self.processes = [multiprocessing.Process(
            target=_run, args=(port, request, connections, seconds, nice, self.queue))
            for _ in range(processes)]

    def start(self) -> Flood:
        for process in self.processes:
            process.start()
        return self

    def join(self) -> dict[str, int]:
        """Waits for the flood to end: the answers by status, all processes together."""
        counts: dict[str, int] = {}
        for process in self.processes:
            for status, n in self.queue.get().items():
                counts[status] = counts.get(status, 0) + n
            process.join()
        return dict(sorted(counts.items()))
