"""Admission control for the attach check: bounded work in flight, a fair share per client.

Both attach-check servers answer synchronously on one event-loop thread per worker: an RSGI
request (Granian) or an ECR (``s13_server``) is handled in one step that never awaits. What is
"in flight" is therefore what waits in the loop's ready queue. The loop runs its ready queue in
batches: each iteration runs the callbacks that were queued when it began, and anything queued
meanwhile (``call_soon``) runs in the next. So ``Admission`` counts the checks admitted since
the current batch began, and schedules its reset with ``call_soon`` when the first one comes:
the count is the depth of the queue the worker is working through, and a deep batch means
every check in it waited for all those before it.

* ``max_inflight`` checks are admitted per batch; beyond, the rest of the batch is refused at
  once (N5g-eir 503 ``NF_CONGESTION`` + ``Retry-After``, S13 3004 DIAMETER_TOO_BUSY), so a
  check is never answered after the AMF/MME has given up on it, and a refusal costs a
  prebuilt answer.
* one client (the AMF's address, the Diameter peer's Origin-Host) gets at most ``share`` of
  those (``max_inflight × per_client_share``): one flooding AMF is refused while the others
  are still served.

Hot path: below half its share a check costs one list-slot read, an add and two comparisons
(``gate`` is a one-slot list the callers read in their closures). Only a batch deeper than
``share // 2`` pays for a per-client count (``admit_deep``): the first ``share // 2`` checks
of a batch are admitted without asking who sent them, so each client is held to the rest of its
share, ``share - share // 2``, from there on — at most ``share`` per batch in all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any

MAX_INFLIGHT = 128  # default [eir] max_inflight (scripts/bench/attach_overload.py measures it)
PER_CLIENT_SHARE = 0.5  # default [eir] per_client_share
RETRY_AFTER = 1  # seconds, the Retry-After of an N5g-eir refusal


class Admission:
    """One worker's admission state (one per event loop: a Granian worker, the S13 child).

    The caller's fast path::

        n = gate[0]
        if n < fast:
            if n == 0: admission.start_batch()
            gate[0] = n + 1          # admitted
        elif not admission.admit_deep(client): refuse
    """

    def __init__(self, max_inflight: int = MAX_INFLIGHT,
                 per_client_share: float = PER_CLIENT_SHARE):
        if max_inflight < 1 or not 0 < per_client_share <= 1:
            raise ValueError("max_inflight ≥ 1 and 0 < per_client_share ≤ 1")
        share = max(1, int(max_inflight * per_client_share))
        self.gate = [0]  # checks admitted in this batch
        self.fast = share // 2  # admitted without a per-client count
        self.rest = share - self.fast  # what each client may still take beyond ``fast``
        self.max_inflight = max_inflight
        self.by_client: dict[Hashable, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reset = self._end_batch  # bound once: start_batch schedules it per batch

    def start_batch(self) -> None:
        """The first check of a batch: end the batch after everything queued now has run."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        loop.call_soon(self._reset)

    def _end_batch(self) -> None:
        self.gate[0] = 0
        if self.by_client:
            self.by_client.clear()

    def admit(self, client: Hashable) -> bool:
        """The whole check in one call (the hot paths inline its fast part)."""
        n = self.gate[0]
        if n < self.fast:
            if not n:
                self.start_batch()
            self.gate[0] = n + 1
            return True
        return self.admit_deep(client)

    def admit_deep(self, client: Hashable) -> bool:
        """A check beyond the fast part of the batch: admitted if the worker and ``client``
        still have room in this batch (the caller counts a refusal)."""
        n = self.gate[0]
        if n == 0:  # fast == 0 (a share of 1): this check opens the batch
            self.start_batch()
        if n < self.max_inflight:
            taken = self.by_client.get(client, 0)
            if taken < self.rest:
                self.by_client[client] = taken + 1
                self.gate[0] = n + 1
                return True
        return False


def client_host(client: str) -> str:
    """The host part of RSGI's ``scope.client`` (``"IP:PORT"``, ``"[v6]:PORT"``): the AMF,
    whichever of its connections the check came on."""
    host, _, _ = client.rpartition(":")
    return host or client


# -- what Granian bounds before the app sees a request -----------------------------------------

# Per worker process. An attach check is one small GET with no body: every buffer below is sized
# for that, so what a client can make a worker hold is bounded by these products, whatever it
# sends or fails to read (scripts/bench/attach_abuse.py measures it).
CONNECTIONS_PER_WORKER = 1024  # Granian's backpressure: connections served at once; further
#                                ones wait in the listen backlog, then are refused by the kernel
STREAMS_PER_CONNECTION = 32  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS
HEADER_BYTES = 16 * 1024  # HTTP/1.1 read buffer and HTTP/2 header list: a check is < 1 KiB
WINDOW_BYTES = 16 * 1024  # HTTP/2 flow-control windows: request bodies nobody reads
SEND_BUFFER_BYTES = 64 * 1024  # HTTP/2 answers queued per stream for a client not reading
HEADER_READ_TIMEOUT_MS = 5_000  # HTTP/1.1: a request's headers within this (slowloris)
PING_INTERVAL_MS = 10_000  # HTTP/2 keep-alive PING; no answer within PING_TIMEOUT: closed
PING_TIMEOUT_S = 5


def granian_limits() -> dict[str, Any]:
    """Granian options bounding one attach-check worker's connections, streams and buffers."""
    from granian.http import HTTP1Settings, HTTP2Settings

    return {
        "backpressure": CONNECTIONS_PER_WORKER,
        "http1_settings": HTTP1Settings(header_read_timeout=HEADER_READ_TIMEOUT_MS,
                                        max_buffer_size=HEADER_BYTES),
        "http2_settings": HTTP2Settings(
            initial_connection_window_size=WINDOW_BYTES, initial_stream_window_size=WINDOW_BYTES,
            keep_alive_interval=PING_INTERVAL_MS, keep_alive_timeout=PING_TIMEOUT_S,
            max_concurrent_streams=STREAMS_PER_CONNECTION, max_headers_size=HEADER_BYTES,
            max_send_buffer_size=SEND_BUFFER_BYTES),
    }
