"""The attach index in-process: built from the store, following change_log, persisted."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroaring import BitMap64
from sqlalchemy import update

from imeisync.adapters.attach_index import AttachIndex, IndexFileError, IndexKeeper
from imeisync.domain.imei import key_to_int
from imeisync.domain.verdict import Status, verdict
from imeisync.entrypoints.eir import EIC_PATH, KeeperLookup, create_app
from imeisync.services.devices import status_from_store
from imeisync.store import models
from imeisync.store.db import Database
from support.eir_harness import call_rsgi, seed

A, B, C, D = "35209900176148", "49015420323751", "35417803685978", "35686800004141"
IMSI = "238010000000001"


def keeper(url: str, tmp_path: Path, **kwargs: Any) -> IndexKeeper:
    return IndexKeeper(url, tmp_path / "attach-index.bin", **kwargs).start(follow=False)


def close_record(url: str, key: str, owner: str) -> None:
    db = Database(url)
    now = datetime.now(UTC)
    try:
        with db.write() as session:
            session.execute(update(models.Record).where(
                models.Record.imei_key == key, models.Record.owner_id == owner,
                models.Record.closed_at.is_(None)).values(closed_at=now, closed_by="t",
                                                          close_reason="recovered"))
            session.add(models.ChangeLog(imei_key=key, subject="record", op="close",
                                         kind="block", at=now))
    finally:
        db.dispose()


def store_status(url: str, key: str, imsi: str | None = None) -> Status:
    db = Database(url)
    try:
        with db.read() as session:
            return status_from_store(session, key, imsi)
    finally:
        db.dispose()


def test_index_built_from_the_store_answers_like_the_store(
    database_url: str, tmp_path: Path
) -> None:
    seed(database_url, [(A, "block", "op-se"), (B, "track", "op-se"), (C, "block", "op-se"),
                        (C, "track", "op-no"), (D, "block", "op-dk")], exceptions=[(D, IMSI)])
    close_record(database_url, A, "op-se")

    index = keeper(database_url, tmp_path)
    try:
        for key in (A, B, C, D, "01234567890123"):
            for imsi in (None, IMSI):
                assert index.index.lookup(key_to_int(key), imsi) is store_status(
                    database_url, key, imsi), (key, imsi)
        assert index.health()["entries"] == 3 and index.health()["seq"] == 7
    finally:
        index.stop()


def test_follower_applies_opens_closes_and_exceptions_from_change_log(
    database_url: str, tmp_path: Path
) -> None:
    seed(database_url, [(A, "block", "op-se")])
    index = keeper(database_url, tmp_path)
    try:
        seed(database_url, [(B, "track", "op-se"), (D, "block", "op-dk")],
             exceptions=[(D, IMSI)])
        close_record(database_url, A, "op-se")
        assert index.poll()

        lookup = index.index.lookup
        assert lookup(key_to_int(A)) is Status.UNKNOWN
        assert lookup(key_to_int(B)) is Status.GREYLISTED
        assert lookup(key_to_int(D)) is Status.BLACKLISTED
        assert lookup(key_to_int(D), IMSI) is Status.WHITELISTED
        assert index.health()["seq"] == 5
    finally:
        index.stop()


def test_follower_thread_sees_a_change_within_one_second(sqlite_url: str, tmp_path: Path) -> None:
    seed(sqlite_url, [])
    index = IndexKeeper(sqlite_url, tmp_path / "i.bin").start()
    try:
        seed(sqlite_url, [(A, "block", "op-se")])
        written = time.monotonic()
        while index.index.lookup(key_to_int(A)) is not Status.BLACKLISTED:
            assert time.monotonic() - written < 1.0
            time.sleep(0.01)
    finally:
        index.stop()


def test_a_change_never_shows_neither_state() -> None:
    index = AttachIndex(BitMap64([1]), BitMap64(), {})
    index.apply({1: {"track"}}, {}, [1])
    assert index.lookup(1) is Status.GREYLISTED
    index.apply({1: {"block"}}, {1: frozenset({IMSI})}, [1])
    assert index.lookup(1) is Status.BLACKLISTED and index.lookup(1, IMSI) is Status.WHITELISTED
    index.apply({}, {}, [1])
    assert index.lookup(1, IMSI) is Status.UNKNOWN and not index.exceptions


@settings(max_examples=200, deadline=None)
@given(blocked=st.booleans(), tracked=st.booleans(), excepted=st.booleans())
def test_lookup_is_the_domain_verdict(blocked: bool, tracked: bool, excepted: bool) -> None:
    key = 10**13 + 7
    index = AttachIndex(BitMap64([key] if blocked else []), BitMap64([key] if tracked else []),
                        {key: frozenset({IMSI})} if excepted else {})
    assert index.lookup(key, IMSI) is verdict(blocked=blocked, tracked=tracked,
                                              excepted=excepted)


def test_persisted_file_round_trips_and_catches_up_at_start(
    database_url: str, tmp_path: Path
) -> None:
    seed(database_url, [(A, "block", "op-se")], exceptions=[(A, IMSI)])
    keeper(database_url, tmp_path).stop()
    seed(database_url, [(B, "track", "op-se")])

    again = keeper(database_url, tmp_path)
    try:
        assert again.source == "file"
        assert again.index.lookup(key_to_int(A), IMSI) is Status.WHITELISTED
        assert again.index.lookup(key_to_int(B)) is Status.GREYLISTED
        assert again.index.seq == 3
    finally:
        again.stop()


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_damaged_file_is_detected_logged_and_rebuilt_from_the_store(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    seed(sqlite_url, [(A, "block", "op-se")])
    keeper(sqlite_url, tmp_path).stop()
    path = tmp_path / "attach-index.bin"
    data = path.read_bytes()
    path.write_bytes({
        "flip": data[:60] + bytes([data[60] ^ 1]) + data[61:],
        "truncate": data[:-5],
        "garbage": b"not an index at all" * 10,
        "empty": b"",
    }[damage])
    with pytest.raises(IndexFileError):
        AttachIndex.load(path)

    with caplog.at_level(logging.WARNING, logger="imeisync.adapters.attach_index"):
        rebuilt = keeper(sqlite_url, tmp_path)
    try:
        assert rebuilt.source == "store"
        assert rebuilt.index.lookup(key_to_int(A)) is Status.BLACKLISTED
        assert "rebuilding it from the store" in caplog.text
        AttachIndex.load(path)  # rewritten intact
    finally:
        rebuilt.stop()


def test_file_written_for_another_database_is_not_trusted(tmp_path: Path) -> None:
    first = f"sqlite:///{tmp_path / 'first.db'}"
    other = f"sqlite:///{tmp_path / 'other.db'}"
    seed(first, [(A, "block", "op-se"), (B, "block", "op-se")])
    seed(other, [(C, "block", "op-se")])
    keeper(first, tmp_path).stop()

    index = keeper(other, tmp_path)
    try:
        assert index.source == "store"
        assert index.index.lookup(key_to_int(A)) is Status.UNKNOWN
        assert index.index.lookup(key_to_int(C)) is Status.BLACKLISTED
    finally:
        index.stop()


def test_unreachable_store_at_start_serves_the_file_and_says_it_is_stale(tmp_path: Path) -> None:
    db_file = tmp_path / "imeisync.db"
    url = f"sqlite:///{db_file}"
    seed(url, [(A, "block", "op-se")])
    keeper(url, tmp_path).stop()
    for path in tmp_path.glob("imeisync.db*"):
        path.rename(path.with_name("moved-" + path.name))

    index = keeper(url, tmp_path)
    try:
        health = index.health()
        assert health["ready"] and health["source"] == "file"
        assert health["database_reachable"] is False and health["last_error"]
        assert index.index.lookup(key_to_int(A)) is Status.BLACKLISTED
        assert not db_file.exists(), "an unreachable SQLite file is never re-created empty"
    finally:
        index.stop(persist=False)


def test_no_file_and_no_store_is_not_ready_and_the_check_answers_503(tmp_path: Path) -> None:
    index = keeper(f"sqlite:///{tmp_path / 'missing.db'}", tmp_path)
    try:
        assert not index.ready and index.health()["ready"] is False
        status, body = _call(create_app(KeeperLookup(index)), "pei=35209900176148")
        assert status == 503 and b"NF_CONGESTION" in body
        status, _ = _call(create_app(KeeperLookup(index)), "", path="/healthz")
        assert status == 503
    finally:
        index.stop(persist=False)


class _Broken:
    ready = True

    def lookup(self, key: int, imsi: str | None) -> Status:
        raise RuntimeError("disk on fire\nTraceback (most recent call last): secret")

    def health(self) -> dict[str, Any]:
        return {"ready": True, "database_reachable": True}

    def stop(self) -> None:
        pass


def _call(app: Any, query: str, path: str = EIC_PATH, method: str = "GET") -> tuple[int, bytes]:
    return asyncio.run(call_rsgi(app, method, path, query))


def test_internal_fault_is_500_system_failure_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR):
        status, body = _call(create_app(_Broken()), "pei=imei-352099001761481")

    assert status == 500
    assert b'"cause": "SYSTEM_FAILURE"' in body
    assert b"Traceback" not in body and b"disk on fire" not in body
    assert "attach check failed" in caplog.text
