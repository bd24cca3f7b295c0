"""Storage limitation for data received from competitors: other operators' records closed more
than ``[security] foreign_retention_days`` ago are deleted from the store by the retention job;
our own records never are; open records and the attach check are untouched; the purge is
audited with its counts. Foreign records arrive through a real registry (in-process, real
signatures) and a real pull, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from imeisync.adapters.attach_index.store_reader import build_from_store
from imeisync.config import load_config
from imeisync.domain.errors import BadInput
from imeisync.domain.imei import luhn_check_digit
from imeisync.services import audit
from imeisync.services.orders import Actor
from imeisync.services.retention import purge
from imeisync.store import models
from support.registry_lab import InProcessRegistry, Operator

STAFF = Actor("staff")


def imei(n: int) -> str:
    key = f"86{n:012d}"
    return key + luhn_check_digit(key)


def change(n: int, action: str) -> dict[str, str]:
    return {"change_id": f"op-b:{action}-{n}", "action": action, "imei": imei(n)[:14],
            "reason": "stolen" if action == "insert" else "recovered",
            "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


@pytest.fixture
def lab(tmp_path: Path, database_url: str) -> Iterator[tuple[InProcessRegistry, Operator]]:
    registry = InProcessRegistry(tmp_path / "lab", [("op-a", "DK"), ("op-b", "SE")],
                                 f"sqlite:///{tmp_path / 'registry.db'}")
    a = registry.operator("op-a", database_url)
    yield registry, a
    registry.close()


def records(a: Operator) -> dict[tuple[str, str], bool]:
    """(imei_key, owner) → open?"""
    with a.app.db.read() as s:
        return {(r.imei_key, r.owner_id): r.closed_at is None
                for r in s.execute(select(models.Record)).scalars()}


def test_closed_foreign_records_are_deleted_after_the_retention_own_and_open_ones_stay(lab):
    registry, a = lab
    b = registry.client("op-b")
    b.push([change(n, "insert") for n in (1, 2, 3, 4)])
    # our own record, blocked and lifted: closed just as long ago
    a.app.intake().submit_unsigned({"imei": imei(9), "case_ref": "C-9", "police_unit": "U",
                                    "reason": "stolen"}, STAFF)
    a.app.intake().submit_signed(registry.lab.police_order("lift", imei(9)), STAFF)
    a.app.sync().push()
    assert a.app.sync().pull().opened == 4
    b.push([change(n, "remove") for n in (1, 2, 3)])
    assert a.app.sync().pull().closed == 3
    # record 3 was closed by a lift notice still awaiting the registry's remove: kept
    with a.app.db.write() as s:
        record_3 = s.execute(select(models.Record.id).where(
            models.Record.imei_key == imei(3)[:14])).scalar_one()
        s.execute(insert(models.LiftNotice).values(
            notice_id="op-b:n3", issuer="op-b", order_id="O-3", imei_key=imei(3)[:14],
            issued_at=datetime.now(UTC), applied_at=datetime.now(UTC), applied_by="staff",
            record_id=record_3))
        log_rows = s.execute(select(func.count()).select_from(models.ChangeLog)).scalar_one()
    with a.app.db.read() as s:
        index_before, _ = build_from_store(s.connection())
    now = datetime.now(UTC)

    too_early = purge(a.app.db, 730, foreign_days=30, me="op-a", now=now + timedelta(days=29))
    assert too_early.foreign_records == 0
    result = purge(a.app.db, 730, foreign_days=30, me="op-a", now=now + timedelta(days=31),
                   batch=1)
    assert result.foreign_records == 2
    assert "deleted 2 foreign record(s)" in result.describe()

    left = records(a)
    assert (imei(1)[:14], "op-b") not in left and (imei(2)[:14], "op-b") not in left
    assert left[(imei(3)[:14], "op-b")] is False  # its notice still waits
    assert left[(imei(4)[:14], "op-b")] is True  # open: untouched
    assert left[(imei(9)[:14], "op-a")] is False  # ours: never purged
    with a.app.db.read() as s:
        index_after, _ = build_from_store(s.connection())
        assert s.execute(select(func.count()).select_from(
            models.ChangeLog)).scalar_one() == log_rows
        events = s.execute(select(models.AuditEvent).where(
            models.AuditEvent.action == "retention.purged")).scalars().all()
        assert audit.verify(s).ok
    verdicts = [[str(index.lookup(int(imei(n)[:14]))) for n in (1, 2, 3, 4, 9)]
                for index in (index_before, index_after)]
    assert verdicts[0] == verdicts[1] and verdicts[1][3] == "BLACKLISTED"
    assert verdicts[1].count("BLACKLISTED") == 1
    details = [json.loads(e.detail) for e in events]
    assert sum(d.get("foreign_records", 0) for d in details) == 2
    assert all(d["closed_before"] == result.foreign_cutoff for d in details
               if "foreign_records" in d)
    again = purge(a.app.db, 730, foreign_days=30, me="op-a", now=now + timedelta(days=31))
    assert again.foreign_records == 0


def test_the_daily_job_uses_foreign_retention_days_default_30(lab, monkeypatch):
    registry, a = lab
    assert a.app.config.security.foreign_retention_days == 30
    registry.client("op-b").push([change(5, "insert")])
    a.app.sync().pull()
    registry.client("op-b").push([change(5, "remove")])
    a.app.sync().pull()
    with a.app.db.write() as s:  # closed 31 days ago
        s.execute(models.Record.__table__.update().values(
            closed_at=datetime.now(UTC) - timedelta(days=31)))
    assert a.app.purge_retention().foreign_records == 1
    monkeypatch.setenv("IMEISYNC_SECURITY_FOREIGN_RETENTION_DAYS", "0")
    with pytest.raises(BadInput, match="foreign_retention_days"):
        load_config(a.config_path)
