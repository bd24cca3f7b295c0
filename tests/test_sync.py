"""The sync engine against the real registry code (in-process, real signatures): push results,
lost answers, pull under ownership rules, confirmations, track records, reconcile repairs, the
shrink guard, bootstrap, status. The operator store runs on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from imeisync.domain.errors import Refused, Unavailable
from imeisync.domain.imei import luhn_check_digit
from imeisync.services import sync as sync_service
from imeisync.services.devices import status_from_store
from imeisync.services.orders import Actor
from imeisync.services.sync import ShrinkRefused
from imeisync.store.models import AuditEvent, ChangeLog, OutboxChange, Record, SyncState
from support.registry_lab import InProcessRegistry, Operator

STAFF = Actor("liaison-1")


def imei(n: int) -> str:
    key = f"35209900{n:06d}"
    return key + luhn_check_digit(key)


def key(n: int) -> str:
    return imei(n)[:14]


@pytest.fixture
def world(tmp_path: Path, sqlite_url: str) -> Iterator[InProcessRegistry]:
    reg = InProcessRegistry(tmp_path / "lab", [("op-a", "DK"), ("op-b", "SE")],
                            f"sqlite:///{tmp_path / 'registry.db'}")
    yield reg
    reg.close()


@pytest.fixture
def a(world: InProcessRegistry, tmp_path: Path) -> Operator:
    return world.operator("op-a", f"sqlite:///{tmp_path / 'a.db'}")


@pytest.fixture
def b(world: InProcessRegistry, database_url: str) -> Operator:
    return world.operator("op-b", database_url)


def block(op: Operator, n: int, kind: str = "block") -> None:
    payload = {"imei": imei(n), "case_ref": f"CASE-{n}", "police_unit": "Unit 1",
               "reason": "stolen"}
    if kind == "block":
        op.app.intake().submit_unsigned(payload, STAFF)
    else:
        token = op_police(op, "track", imei(n))
        op.app.intake().submit_signed(token, STAFF)


def op_police(op: Operator, kind: str, number: str) -> str:
    from support.registry_lab import Lab

    lab: Lab = op._lab  # type: ignore[attr-defined]
    return lab.police_order(kind, number)


def lift(op: Operator, n: int) -> None:
    op.app.intake().submit_signed(op_police(op, "lift", imei(n)), STAFF)


def status(op: Operator, n: int) -> str:
    with op.app.db.read() as s:
        return str(status_from_store(s, key(n)))


@pytest.fixture(autouse=True)
def _police(world: InProcessRegistry, request: pytest.FixtureRequest) -> None:
    # operators created by the fixtures know the lab, for police orders
    for name in ("a", "b"):
        if name in request.fixturenames:
            request.getfixturevalue(name)._lab = world.lab


def outbox(op: Operator) -> list[tuple[str, str | None]]:
    with op.app.db.read() as s:
        return list(s.execute(select(OutboxChange.state, OutboxChange.result_code)
                              .order_by(OutboxChange.id)).all())


def test_push_marks_each_change_and_a_rejected_one_is_never_sent_again(a, b, world):
    block(a, 1)
    block(a, 2)
    block(b, 1)
    assert a.app.sync().push().accepted == 2
    assert b.app.sync().push().accepted == 1
    assert outbox(a) == [("accepted", None), ("accepted", None)]
    # B's store disagrees with the registry: it holds a remove of A's record
    with b.app.db.write() as s:
        s.execute(update(OutboxChange).values(
            state="pending", change_id="op-b:forged", action="remove", reason="recovered",
            imei_key=key(2)))
    result = b.app.sync().push()
    assert (result.sent, result.rejected) == (1, 1)
    assert outbox(b) == [("rejected", "0002")]
    before = len(world.adapter.requests)
    assert b.app.sync().push().sent == 0
    assert len(world.adapter.requests) == before  # nothing was sent again


def test_a_rejection_is_surfaced_in_status_log_audit_and_metric(a, world, caplog):
    block(a, 3)
    with a.app.db.write() as s:  # a remove of a record the registry never saw
        s.execute(update(OutboxChange).values(action="remove", reason="recovered"))
    metric = sync_service.REJECTED.labels("0003")
    before = metric._value.get()
    result = a.app.sync().push()
    assert result.rejected == 1 and result.rejections[0]["code"] == "0003"
    assert outbox(a) == [("rejected", "0003")]
    assert metric._value.get() == before + 1
    assert "local and central state disagree" in caplog.text
    st = a.app.sync().status()
    assert st["outbox"]["rejected"] == 1
    assert st["rejected"][0]["result_code"] == "0003"
    with a.app.db.read() as s:
        assert s.execute(select(func.count()).select_from(AuditEvent)
                         .where(AuditEvent.action == "sync.rejected")).scalar_one() == 1
    sent = len(world.adapter.requests)
    assert a.app.sync().push().sent == 0
    assert len(world.adapter.requests) == sent


def test_a_lost_answer_is_resent_and_the_registry_keeps_one_copy(a, b, world):
    for n in range(10, 15):
        block(a, n)
    world.adapter.drop_answers = 1
    with pytest.raises(Unavailable):
        a.app.sync().push()
    assert {state for state, _ in outbox(a)} == {"sent"}
    result = a.app.sync().push()
    assert (result.sent, result.duplicate) == (5, 5)
    pulled = b.app.sync().pull()
    assert pulled.opened == 5
    assert all(status(b, n) == "BLACKLISTED" for n in range(10, 15))


def test_pull_applies_blocks_and_a_remove_closes_only_that_owners_record(a, b):
    block(a, 20)
    block(b, 20)
    a.app.sync().push()
    b.app.sync().push()
    assert b.app.sync().pull().opened == 1  # A's; B's own comes back as a confirmation
    with b.app.db.read() as s:
        assert s.execute(select(func.count()).select_from(OutboxChange)
                         .where(OutboxChange.confirmed_at.is_not(None))).scalar_one() == 1
    lift(a, 20)
    a.app.sync().push()
    result = b.app.sync().pull()
    assert result.closed == 1
    assert status(b, 20) == "BLACKLISTED"  # B's own record stands
    with b.app.db.read() as s:
        open_owners = s.execute(select(Record.owner_id).where(
            Record.imei_key == key(20), Record.closed_at.is_(None))).scalars().all()
        logged = s.execute(select(ChangeLog.op).where(ChangeLog.imei_key == key(20))
                           .order_by(ChangeLog.seq)).scalars().all()
    assert open_owners == ["op-b"]
    assert logged == ["open", "open", "close"]  # B's order, A's record opened, then closed


def test_own_changes_coming_back_never_touch_our_records(a):
    block(a, 30)
    a.app.sync().push()
    result = a.app.sync().pull()
    assert (result.confirmed, result.opened) == (1, 0)
    with a.app.db.read() as s:
        assert s.execute(select(func.count()).select_from(Record)).scalar_one() == 1


def test_the_same_feed_applied_twice_changes_nothing_the_second_time(a, b):
    for n in (40, 41):
        block(a, n)
    a.app.sync().push()
    b.app.sync().pull()
    with b.app.db.write() as s:
        s.execute(update(SyncState).where(SyncState.name == "feed.cursor").values(value="0"))
    again = b.app.sync().pull()
    assert (again.opened, again.stale) == (0, 2)
    with b.app.db.read() as s:
        assert s.execute(select(func.count()).select_from(Record)).scalar_one() == 2


def test_a_track_order_greylists_the_device_on_other_networks(a, b):
    block(a, 50, kind="track")
    a.app.sync().push()
    b.app.sync().pull()
    assert status(b, 50) == "GREYLISTED"


def test_reconcile_repairs_missing_extra_and_drifted_foreign_records(a, b):
    for n in range(60, 66):
        block(a, n)
    a.app.sync().push()
    b.app.sync().pull()
    now = datetime.now(UTC)
    with b.app.db.write() as s:
        # missing: closed here by mistake; drifted: wrong reason; extra: never at the registry
        s.execute(update(Record).where(Record.imei_key == key(60)).values(closed_at=now))
        s.execute(update(Record).where(Record.imei_key == key(61)).values(reason="lost"))
        s.add(Record(imei_key=key(99), owner_id="op-a", owner_country="DK", kind="block",
                     reason="stolen", source="registry", opened_at=now, opened_by="x"))
    result = b.app.sync().reconcile()
    assert (result.opened, result.closed, result.replaced, result.unchanged) == (1, 1, 1, 4)
    assert result.mode == "short"
    assert status(b, 60) == "BLACKLISTED" and status(b, 99) == "UNKNOWN"
    with b.app.db.read() as s:
        assert s.execute(select(Record.reason).where(
            Record.imei_key == key(61), Record.closed_at.is_(None))).scalar_one() == "stolen"
    assert b.app.sync().reconcile().unchanged == 6  # nothing left to repair


def test_the_shrink_guard_refuses_alerts_and_changes_nothing_unless_forced(a, b):
    block(a, 70)
    a.app.sync().push()
    b.app.sync().pull()
    now = datetime.now(UTC)
    with b.app.db.write() as s:
        for n in range(71, 75):  # four records the registry does not have
            s.add(Record(imei_key=key(n), owner_id="op-a", owner_country="DK", kind="block",
                         reason="stolen", source="registry", opened_at=now, opened_by="x"))
    with pytest.raises(ShrinkRefused, match="80%"):
        b.app.sync().reconcile()
    assert all(status(b, n) == "BLACKLISTED" for n in range(70, 75))
    st = b.app.sync().status()
    assert st["reconcile_refused"]["closing"] == 4
    assert st["steps"]["reconcile"]["last_error"]["code"] == "shrink_guard"
    forced = b.app.sync().reconcile(force=True)
    assert forced.closed == 4 and forced.forced
    assert b.app.sync().status()["reconcile_refused"] is None


def test_a_snapshot_of_zero_records_is_refused_by_the_guard(a, b):
    block(a, 80)
    a.app.sync().push()
    b.app.sync().pull()
    lift(a, 80)
    a.app.sync().push()
    # B has not pulled the lift: the registry's (empty) snapshot would close its only record
    service = b.app.sync()
    service.pull = lambda **_: None  # type: ignore[method-assign]
    with pytest.raises(ShrinkRefused, match="100%"):
        service.reconcile()
    assert status(b, 80) == "BLACKLISTED"


def test_bootstrap_imports_the_snapshot_and_starts_the_feed_there(a, b):
    for n in range(90, 95):
        block(a, n)
    a.app.sync().push()
    result = b.app.sync().reconcile()
    assert (result.mode, result.opened) == ("bootstrap", 5)
    assert all(status(b, n) == "BLACKLISTED" for n in range(90, 95))
    assert b.app.sync().cursor() == result.seq
    assert b.app.sync().pull().entries == 0
    with b.app.db.read() as s:
        assert s.execute(select(func.count()).select_from(ChangeLog)).scalar_one() == 5


def test_status_shows_cursor_depth_and_the_age_of_each_step(a):
    block(a, 100)
    st = a.app.sync().status()
    assert st["outbox"]["pending"] == 1 and st["steps"]["push"]["last_success"] is None
    a.app.sync().push()
    a.app.sync().pull()
    st = a.app.sync().status()
    assert st["outbox"]["accepted"] == 1 and st["unconfirmed"] == 0
    assert st["cursor"] == 1 and st["registry_head"] == 1
    assert st["steps"]["push"]["age_seconds"] <= 5


def test_a_lift_of_a_foreign_record_is_refused_locally(a, b):
    block(a, 110)
    a.app.sync().push()
    b.app.sync().pull()
    with pytest.raises(Refused, match=r"op-a \(DK\)"):
        lift(b, 110)
