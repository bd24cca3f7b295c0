"""The violation counter: BLACKLISTED answers for a device whose every blocking record was
closed more than a minute earlier, found by the index's follower from the real store (SQLite
and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import update

from imeisync.adapters.attach_index import IndexKeeper
from imeisync.domain.imei import key_to_int
from imeisync.store.db import Database
from imeisync.store.models import ChangeLog, Record
from imeisync.store.schema import ensure_schema

KEY = "35209900176148"
OTHER = "49015420323751"


def _store(url: str) -> Database:
    db = Database(url)
    ensure_schema(db)
    now = datetime.now(UTC)
    with db.write() as s:
        for key in (KEY, OTHER):
            s.add(Record(imei_key=key, owner_id="op-b", owner_country="SE", kind="block",
                         reason="stolen", source="registry", opened_at=now - timedelta(hours=1),
                         opened_by=f"op-b:{key}"))
            s.add(ChangeLog(imei_key=key, subject="record", op="open", kind="block", at=now))
    return db


def _close(db: Database, key: str, ago: timedelta) -> None:
    with db.write() as s:  # closed in the store, but no change_log row: the index stays stale
        s.execute(update(Record).where(Record.imei_key == key).values(
            closed_at=datetime.now(UTC) - ago, closed_by="test", close_reason="recovered"))


def test_blacklisted_answers_for_devices_lifted_over_a_minute_ago_are_counted(
        database_url: str, tmp_path: Path) -> None:
    db = _store(database_url)
    keeper = IndexKeeper(database_url, None).start(follow=False)
    try:
        index = keeper.index
        assert index is not None
        assert str(index.lookup(key_to_int(KEY))) == "BLACKLISTED"
        keeper.poll()
        assert keeper.health()["violations"] == 0  # still open: a right answer
        _close(db, KEY, timedelta(minutes=2))
        _close(db, OTHER, timedelta(seconds=10))  # within the grace minute: not a violation
        for _ in range(3):
            index.lookup(key_to_int(KEY))
        index.lookup(key_to_int(OTHER))
        keeper.poll()
        assert keeper.health()["violations"] == 3
        keeper.poll()  # answers are audited once
        assert keeper.health()["violations"] == 3
    finally:
        keeper.stop(persist=False)
        db.dispose()
