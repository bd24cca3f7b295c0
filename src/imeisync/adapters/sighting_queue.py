"""What the attach check hands over when it answers for a device that may be a sighting.

The hot path (``EirApp``'s handler, ``S13App.answer``) calls the hook of the answer's status:
an O(1) append of the raw facts to a bounded in-memory deque, taken by the sighting writer
thread of the same process (``sighting_writer``). Nothing is parsed, looked up or logged there:

* ``(device, subscriber)`` seen in the last ``LOCAL_WINDOW`` seconds → counted
  ``deduplicated`` and not queued (the writer would find the sighting in the store anyway);
* more than ``PER_DEVICE`` subscribers for one device within the window → counted ``dropped``
  (``device_flood``): a flood for one device cannot fill the queue and crowd out the others;
* the queue full (the writer behind, the database down) → counted ``dropped`` (``queue_full``).

The answer never waits: no lock is taken on the hot path (``deque.append``/``popleft`` are
atomic; the counters here are written only by the attach check's one thread, the writer's by
the writer). The local window is short on purpose: an observation lost on the way (queue full,
write failed) is offered again by the next check a minute later at most.

Figures: ``imeisync_sightings{outcome=recorded|noticed|deduplicated|ignored|dropped}``
(``noticed``: a sent notice for another operator's tracked device; ``ignored``: no open record
under the rules, e.g. a GREYLISTED answer by ``[eir] unknown_tac``), the drops by reason, the
malformed subscriber identities and the queue depth, labelled ``worker`` and ``interface``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

QUEUE_SIZE = 10_000  # observations waiting for the writer ([sightings] queue_size)
LOCAL_WINDOW = 60.0  # seconds a (device, subscriber) is not queued again by this process
PER_DEVICE = 16  # subscribers queued per device per window; more is a flood (or an attack)
DEVICES = 50_000  # devices remembered for the local dedupe; beyond, the memory starts afresh
# The raw query or ECR kept per observation: an AMF's query or an MME's ECR is a few hundred
# bytes; the cap keeps a full queue within ~20 MiB whatever a peer sends (a longer one loses
# what lies past it: its SVN or Origin-Host, never the sighting).
RAW_BYTES = 2048

# One observation: (wall time, interface, answer status, key, IMSI or None, raw, client).
# ``raw`` is the N5g-eir query string or the S13 ECR's bytes; ``client`` the AMF's address.
Observation = tuple[float, str, str, int, "str | None", "str | bytes", "str | None"]
Hook = Callable[[int, "str | None", "str | bytes", "str | None"], None]

OUTCOMES = ("recorded", "noticed", "deduplicated", "ignored", "dropped")
DROP_REASONS = ("queue_full", "device_flood", "write_failed")


class SightingQueue:
    """The bounded queue between one process's attach check and its sighting writer."""

    def __init__(self, interface: str, *, blocked_attempts: bool = False,
                 size: int = QUEUE_SIZE, window: float = LOCAL_WINDOW,
                 per_device: int = PER_DEVICE, devices: int = DEVICES):
        self.interface = interface
        self.blocked_attempts = blocked_attempts
        self.size = size
        self.window = window
        self.per_device = per_device
        self.devices = devices
        self.items: deque[Observation] = deque()
        # Written only by the attach check's thread: local dedupes, queue_full, device_flood.
        self.hot = [0, 0, 0]
        self._seen: dict[int, tuple[float, set[str | None]]] = {}

    def hook(self, status: str) -> Hook | None:
        """The hot path's call for answers of ``status``, or None where no sighting can be:
        GREYLISTED always, BLACKLISTED with ``[sightings] blocked_attempts``."""
        if status == "GREYLISTED" or (status == "BLACKLISTED" and self.blocked_attempts):
            return self._hook(status)
        return None

    def _hook(self, status: str) -> Hook:
        items, seen, hot, interface = self.items, self._seen, self.hot, self.interface
        size, window, per_device, devices = self.size, self.window, self.per_device, self.devices
        append, now = items.append, time.time

        def offer(key: int, imsi: str | None, raw: str | bytes, client: str | None) -> None:
            at = now()
            entry = seen.get(key)
            if entry is None or at - entry[0] >= window:
                if len(seen) >= devices:
                    seen.clear()
                entry = seen[key] = (at, set())
            subscribers = entry[1]
            if imsi in subscribers:
                hot[0] += 1
            elif len(subscribers) >= per_device:
                hot[2] += 1
            elif len(items) >= size:
                hot[1] += 1
            else:
                subscribers.add(imsi)
                # Slicing a str or bytes no longer than the cap returns the object itself.
                append((at, interface, status, key, imsi, raw[:RAW_BYTES], client))

        return offer

    def take(self, limit: int) -> list[Observation]:
        """Up to ``limit`` observations, oldest first (the writer's thread)."""
        items, out = self.items, []
        popleft = items.popleft
        for _ in range(min(limit, len(items))):
            try:
                out.append(popleft())
            except IndexError:  # pragma: no cover - only this thread takes
                break
        return out

    def __len__(self) -> int:
        return len(self.items)


class SightingFigures(Collector):
    """The sighting counters of one process: the queue's (hot path) and the writer's.

    ``snapshot()`` is what a worker writes to the daemon's board; ``from_snapshot`` turns it
    back into a collector with the same families (as ``eir_metrics.Metrics`` does).
    """

    def __init__(self, worker: str, interface: str, queue: SightingQueue | None = None):
        self.worker = worker
        self.interface = interface
        self.queue = queue
        # Written only by the writer: recorded, noticed, deduplicated, ignored, write_failed,
        # malformed IMSIs.
        self.written = [0, 0, 0, 0, 0, 0]
        self._frozen: dict[str, Any] | None = None

    def snapshot(self) -> dict[str, Any]:
        if self._frozen is not None:
            return dict(self._frozen)
        queue = self.queue
        hot = list(queue.hot) if queue is not None else [0, 0, 0]
        w = list(self.written)
        return {"recorded": w[0], "noticed": w[1], "deduplicated": w[2] + hot[0],
                "ignored": w[3], "queue_full": hot[1], "device_flood": hot[2],
                "write_failed": w[4], "malformed_imsi": w[5],
                "queue_depth": len(queue) if queue is not None else 0}

    @classmethod
    def from_snapshot(cls, worker: str, interface: str, snap: dict[str, Any]) -> SightingFigures:
        figures = cls(worker, interface)
        figures._frozen = {name: int(snap.get(name) or 0) for name in (
            "recorded", "noticed", "deduplicated", "ignored", "queue_full", "device_flood",
            "write_failed", "malformed_imsi", "queue_depth")}
        return figures

    def collect(self) -> Iterator[Any]:
        snap = self.snapshot()
        labels = [self.worker, self.interface]
        drops = {reason: snap[reason] for reason in DROP_REASONS}
        counted = {**snap, "dropped": sum(drops.values())}
        total = CounterMetricFamily(
            "imeisync_sightings", "Attach checks that may be sightings, by what became of them",
            labels=["worker", "interface", "outcome"])
        for outcome in OUTCOMES:
            total.add_metric([*labels, outcome], counted[outcome])
        yield total
        dropped = CounterMetricFamily(
            "imeisync_sightings_dropped", "Possible sightings not recorded, by reason",
            labels=["worker", "interface", "reason"])
        for reason, value in drops.items():
            dropped.add_metric([*labels, reason], value)
        yield dropped
        malformed = CounterMetricFamily(
            "imeisync_sightings_malformed_imsi",
            "Sightings recorded without the subscriber identity sent, which was not an IMSI",
            labels=["worker", "interface"])
        malformed.add_metric(labels, snap["malformed_imsi"])
        yield malformed
        depth = GaugeMetricFamily("imeisync_sightings_queue_depth",
                                  "Possible sightings waiting for the writer",
                                  labels=["worker", "interface"])
        depth.add_metric(labels, snap["queue_depth"])
        yield depth
