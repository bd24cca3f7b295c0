"""The sighting writer: one thread per attach-check process, draining its ``SightingQueue``.

Every ``interval`` it takes up to ``BATCH`` observations and writes them through
``SightingRecorder`` in one transaction. When the store is unreachable (``Unavailable``) the
batch it holds is retried with back-off (up to ``MAX_BACKOFF``) while the attach check keeps
queueing; the queue stays bounded, so what does not fit is dropped and counted there. One
warning when writing starts failing, then at most one line per ``LOG_EVERY`` seconds, and one
when it works again. A batch that fails for any other reason (a bug) is dropped, counted and
logged with its traceback (rate-limited too), so it cannot block the queue for ever.

``stop()`` writes what is still queued (within most of ``timeout``) and joins the thread; the
thread is a daemon, so a hung database cannot keep a worker from exiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from imeisync.adapters.sighting_queue import (
    LOCAL_WINDOW,
    Observation,
    SightingFigures,
    SightingQueue,
)
from imeisync.domain.errors import ImeisyncError, Unavailable
from imeisync.services.sightings import SightingRecorder

log = logging.getLogger("imeisync.sightings")

BATCH = 200
# Seconds between batches. The writer shares the interpreter with the attach check: each batch
# holds the GIL for a few ms of SQL and crypto, so fewer, larger batches keep that out of the
# check's p99 (scripts/bench/sightings.py); a sighting still reaches the store within seconds.
INTERVAL = 1.0
MAX_BACKOFF = 5.0
LOG_EVERY = 60.0


class SightingWriter:
    def __init__(self, queue: SightingQueue, recorder: SightingRecorder,
                 figures: SightingFigures, *, interval: float = INTERVAL, batch: int = BATCH):
        self.queue = queue
        self.recorder = recorder
        self.figures = figures
        self.interval = interval
        self.batch = batch
        self._held: list[Observation] = []  # a batch waiting for the store to come back
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sighting-writer", daemon=True)
        self._failing_since: float | None = None
        self._last_log = 0.0
        self._backoff = interval
        self._drain_until = 0.0

    def start(self) -> SightingWriter:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._drain_until = time.monotonic() + timeout * 0.8
        self._stop.set()
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._held and not len(self.queue):
                self._stop.wait(self.interval)
                continue
            if not self.write_once():
                self._stop.wait(self._backoff)
            elif len(self.queue) < self.batch:
                # Paced: a batch a period unless a whole batch waits, so the writer takes the
                # store's one write lock a few times a second at most, not once per arrival.
                self._stop.wait(self.interval)
        # What the attach check queued before the stop, while the store answers and time is left.
        while (self._held or len(self.queue)) and time.monotonic() < self._drain_until:
            if not self.write_once():
                break

    def write_once(self) -> bool:
        """Write the held batch or the next one; False while the store is unavailable."""
        batch = self._held or self.queue.take(self.batch)
        if not batch:
            return True
        written = self.figures.written
        try:
            result = self.recorder.record(batch)
        except Unavailable as exc:
            self._held = batch
            self._backoff = min(MAX_BACKOFF, self._backoff * 2)
            self._unavailable(exc)
            return False
        except Exception as exc:  # a bug or a bad key file: drop, count, go on
            self._held = []
            written[4] += len(batch)
            self._failed(exc, len(batch))
            return True
        self._held = []
        self._backoff = self.interval
        written[0] += result.recorded
        written[1] += result.noticed
        written[2] += result.deduplicated
        written[3] += result.ignored
        written[5] += result.malformed
        if self._failing_since is not None:
            log.warning("sightings: writing works again after %.0fs; %d possible sighting(s) "
                        "were dropped meanwhile (imeisync_sightings_dropped)",
                        time.monotonic() - self._failing_since, self._dropped())
            self._failing_since = None
        return True

    def _dropped(self) -> int:
        snap = self.figures.snapshot()
        return int(snap["queue_full"] + snap["device_flood"] + snap["write_failed"])

    def _unavailable(self, exc: ImeisyncError) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            self._last_log = now
            log.warning("sightings: cannot write (%s); holding %d, queueing up to %d, dropping "
                        "and counting the rest until the store is back", exc.message,
                        len(self._held), self.queue.size)
        elif now - self._last_log >= LOG_EVERY:
            self._last_log = now
            log.warning("sightings: still cannot write after %.0fs (%s); %d queued, %d "
                        "dropped so far", now - self._failing_since, exc.message,
                        len(self.queue), self._dropped())

    def _failed(self, exc: Exception, count: int) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY or self._last_log == 0.0:
            self._last_log = now
            # The first line only: a database error's later lines carry the statement's
            # parameters (encrypted IMSIs, digests), which have no place in a log.
            first = (str(exc).splitlines() or [""])[0][:200]
            message = (exc.message if isinstance(exc, ImeisyncError)
                       else f"{type(exc).__name__}: {first}")
            log.error("sightings: a batch of %d could not be written and was dropped: %s",
                      count, message)
            log.debug("sightings: the dropped batch's error", exc_info=True)


def in_index_ranges(keeper: Any) -> Callable[[int], bool]:
    """Whether the process's attach index has ``key`` inside an open range record (True while
    no index is loaded): the writer then reads ranges from the store for that key only."""

    def in_range(key: int) -> bool:
        index = keeper.index
        return index is None or key in index.range_tracked or key in index.range_blocked

    return in_range


def capture(config: Any, interface: str, worker: str, *, db: Any = None, cipher: Any = None,
            in_range: Callable[[int], bool] | None = None) -> SightingWriter:
    """The started writer, with its queue (``.queue``) and figures (``.figures``), of one
    attach-check process (``config``'s ``[sightings]``, ``[operator]``, ``[database]`` and
    data key)."""
    from pathlib import Path

    from imeisync.adapters.data_crypto import DataCipher
    from imeisync.store.db import Database

    section = config.sightings
    # The in-memory window never outlasts [sightings] dedupe: a shorter dedupe asks for more.
    queue = SightingQueue(interface, blocked_attempts=section.blocked_attempts,
                          size=section.queue_size, window=min(LOCAL_WINDOW, section.dedupe))
    figures = SightingFigures(worker, interface, queue)
    database = db if db is not None else Database(config.database_url)
    loaded: list[DataCipher] = []

    def data_cipher() -> DataCipher:
        if cipher is not None:
            return cipher  # type: ignore[no-any-return]
        if not loaded:
            loaded.append(DataCipher.from_key_file(Path(config.security.data_key_file)))
        return loaded[0]

    recorder = SightingRecorder(
        database, data_cipher, operator_id=config.operator_id,
        operator_country=config.operator.country, dedupe=section.dedupe,
        blocked_attempts=section.blocked_attempts, alerts=bool(section.webhook_url),
        **({"in_range": in_range} if in_range is not None else {}))
    return SightingWriter(queue, recorder, figures).start()
