"""The queue between the attach check and the sighting writer, and the writer's life cycle.

The hook is what the hot path calls: it must dedupe in memory within its window, cap one
device's subscribers, drop (and count) when full, and forget devices when its memory is full.
The writer must stop within its bound even when the store's lock is held by someone else.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from imeisync.adapters.data_crypto import DataCipher
from imeisync.adapters.sighting_queue import SightingFigures, SightingQueue
from imeisync.services.sighting_writer import SightingWriter
from imeisync.services.sightings import SightingRecorder
from imeisync.store.db import Database
from imeisync.store.schema import ensure_schema

KEY = 49015420323751


def test_only_grey_answers_and_black_ones_with_blocked_attempts_get_a_hook() -> None:
    assert SightingQueue("n5g-eir").hook("WHITELISTED") is None
    assert SightingQueue("n5g-eir").hook("BLACKLISTED") is None
    assert SightingQueue("n5g-eir").hook("GREYLISTED") is not None
    assert SightingQueue("n5g-eir", blocked_attempts=True).hook("BLACKLISTED") is not None
    assert SightingQueue("n5g-eir", blocked_attempts=True).hook("NOT_FOUND") is None


def test_the_hook_dedupes_within_its_window_and_again_after_it() -> None:
    queue = SightingQueue("n5g-eir", window=0.2)
    offer = queue.hook("GREYLISTED")
    assert offer is not None
    for _ in range(5):
        offer(KEY, "238010000000001", "pei=imei-49015420323751", "10.0.0.1:1")
    offer(KEY, None, "pei=imei-49015420323751", "10.0.0.1:1")
    assert (len(queue), queue.hot[0]) == (2, 4)
    time.sleep(0.25)
    offer(KEY, "238010000000001", "pei=imei-49015420323751", "10.0.0.1:1")
    assert len(queue) == 3
    at, interface, status, key, imsi, _raw, client = queue.take(10)[0]
    assert (interface, status, key, imsi, client) == (
        "n5g-eir", "GREYLISTED", KEY, "238010000000001", "10.0.0.1:1")
    assert abs(at - time.time()) < 5


def test_one_device_queues_at_most_per_device_subscribers_and_a_full_queue_drops() -> None:
    queue = SightingQueue("s13", size=20, per_device=3)
    offer = queue.hook("GREYLISTED")
    assert offer is not None
    for n in range(10):
        offer(KEY, f"23801000000{n:04d}", b"ecr", None)
    assert (len(queue), queue.hot[2]) == (3, 7)
    for key in range(100):
        offer(key, "238010000000001", b"ecr", None)
    assert len(queue) == 20 and queue.hot[1] == 100 - 17
    snap = SightingFigures("1", "s13", queue).snapshot()
    assert (snap["queue_full"], snap["device_flood"], snap["queue_depth"]) == (83, 7, 20)


def test_the_hooks_memory_of_devices_is_bounded() -> None:
    queue = SightingQueue("n5g-eir", devices=10)
    offer = queue.hook("GREYLISTED")
    assert offer is not None
    for key in range(25):
        offer(key, None, "", None)
    assert len(queue._seen) <= 10
    offer(0, None, "", None)  # forgotten when the memory started afresh: queued again
    assert len(queue) == 26


def test_the_writer_stops_within_its_bound_while_the_store_is_locked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    db = Database(url)
    ensure_schema(db)
    queue = SightingQueue("n5g-eir")
    recorder = SightingRecorder(db, lambda: DataCipher([bytes(32)]), operator_id="op-dk",
                                operator_country="DK", dedupe=900, blocked_attempts=False,
                                alerts=False)
    writer = SightingWriter(queue, recorder, SightingFigures("1", "n5g-eir", queue),
                            interval=0.05).start()
    blocker = sqlite3.connect(tmp_path / "store.db", timeout=1, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        offer = queue.hook("GREYLISTED")
        assert offer is not None
        offer(KEY, None, "pei=imei-49015420323751", None)
        time.sleep(0.3)  # the writer took it and waits for the lock
        started = time.monotonic()
        writer.stop(timeout=1.0)
        assert time.monotonic() - started < 1.5
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        db.dispose()


class _Failing:
    """A recorder whose write fails as a database error does: parameters on later lines."""

    def record(self, batch: list[object]) -> object:
        raise RuntimeError("(IntegrityError) UNIQUE constraint failed: sightings.sighting_id\n"
                           "[parameters: ('v1.0000.secret-ciphertext', 'digest-beef')]")


def test_a_failed_batch_is_dropped_counted_and_logged_without_its_parameters(caplog) -> None:
    queue = SightingQueue("n5g-eir")
    figures = SightingFigures("1", "n5g-eir", queue)
    writer = SightingWriter(queue, _Failing(), figures, interval=0.05)  # type: ignore[arg-type]
    offer = queue.hook("GREYLISTED")
    assert offer is not None
    offer(35209900176148, "238010123456789", "pei=imei-352099001761481", "10.0.0.1")
    with caplog.at_level("DEBUG", logger="imeisync"):
        assert writer.write_once() is True
    assert figures.snapshot()["write_failed"] == 1 and len(queue) == 0
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["sightings: a batch of 1 could not be written and was dropped: "
                      "RuntimeError: (IntegrityError) UNIQUE constraint failed: "
                      "sightings.sighting_id"]
    assert all("secret" not in r.getMessage() and "238010123456789" not in r.getMessage()
               for r in caplog.records)
