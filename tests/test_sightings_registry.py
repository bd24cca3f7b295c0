"""Sightings between operators, end to end on loopback: the real registry server and three
members — A (Denmark) tracks a phone, B (Sweden) sees it, C (Norway) must never learn of it.

B's sent notice (a row as the sighting writer leaves it) goes out with B's push, carrying no
subscriber and no node; the registry puts a ``sighting`` entry in A's feed only; A's pull turns
it into a received notice naming B and Sweden, with an audit event in the case's history.
Notices the registry must refuse get a code each; entries A must refuse write nothing.
Operators A and B run on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from imeisync.adapters.police_jws import sign_order
from imeisync.domain.errors import BadInput, Refused, Unavailable
from imeisync.domain.imei import luhn_check_digit
from imeisync.services.orders import Actor
from imeisync.store import sync_state
from imeisync.store.models import AuditEvent, Record, Sighting, SightingNotice
from support.registry_lab import Lab, Operator

ALICE = Actor("alice")  # liaison staff at A
BOB = Actor("bob")  # liaison staff at B


def imei(n: int) -> str:
    key = f"86{n:012d}"
    return key + luhn_check_digit(key)


def at(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab", [("op-a", "DK"), ("op-b", "SE"), ("op-c", "NO")])
    lab.start()
    yield lab
    lab.close()


@pytest.fixture
def other_url(request: pytest.FixtureRequest, database_url: str, tmp_path: Path,
              ) -> Iterator[str]:
    """A second fresh database on the same backend as ``database_url``."""
    if not database_url.startswith("postgresql"):
        yield f"sqlite:///{tmp_path / 'second.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    name = f"t_second_{uuid.uuid4().hex[:12]}"
    yield server.create_database(name)
    server.drop_database(name)


@pytest.fixture
def a(lab: Lab, database_url: str) -> Operator:
    return lab.operator("op-a", database_url)


@pytest.fixture
def b(lab: Lab, other_url: str) -> Operator:
    return lab.operator("op-b", other_url)


@pytest.fixture
def c(lab: Lab) -> Operator:
    return lab.operator("op-c")


def track(lab: Lab, op: Operator, number: str) -> None:
    op.app.intake().submit_signed(lab.police_order("track", number, case_ref="CPH-2026-7"),
                                  ALICE)
    assert op.app.sync().push().accepted == 1


def sent_notice(op: Operator, number: str, owner: str, seen_at: datetime | None = None) -> str:
    """A ``sent`` notice row as the sighting writer leaves it (no IMSI, no node)."""
    notice_id = uuid.uuid4().hex
    with op.app.db.write() as s:
        s.add(SightingNotice(notice_id=notice_id, direction="sent", imei_key=number[:14],
                             owner_id=owner, reporter_id=op.id, reporter_country=op.country,
                             seen_at=seen_at or datetime.now(UTC) - timedelta(seconds=30),
                             state="pending", attempts=0))
    return notice_id


def notices(op: Operator, direction: str) -> list[Any]:
    with op.app.db.read() as s:
        return list(s.execute(select(SightingNotice).where(
            SightingNotice.direction == direction).order_by(SightingNotice.id)).scalars())


def registry_rows(lab: Lab, query: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{lab.root / 'registry.db'}?mode=ro", uri=True) as conn:
        return conn.execute(query).fetchall()


def feed_types(op: Operator) -> list[str]:
    client = op.app.registry_client()
    try:
        return [type(e).__name__ for e in client.feed_page(0, 1000).entries]
    finally:
        client.close()


def test_a_tracked_phone_seen_at_b_reaches_a_only_naming_b_and_its_country(lab, a, b, c):
    phone = imei(1)
    track(lab, a, phone)
    assert b.app.sync().pull().opened == 1  # B knows A tracks it
    seen = datetime.now(UTC) - timedelta(minutes=2)
    notice_id = sent_notice(b, phone, "op-a", seen)

    # B's push sends the notice: exactly id, key and time — no subscriber, no node
    service = b.app.sync()
    bodies: list[bytes] = []
    service.client.session.hooks["response"].append(
        lambda r, **_: bodies.append(r.request.body) if r.request.url.endswith(
            "/v1/sightings") else None)
    pushed = service.push()
    service.close()
    assert (pushed.sightings.accepted, pushed.sightings.rejected) == (1, 0)
    assert pushed.describe() == "push: nothing to send; sighting notices: 1 accepted, 0 rejected"
    assert len(bodies) == 1
    sent = json.loads(bodies[0])
    assert sent == {"sightings": [{"notice_id": notice_id, "imei": phone[:14],
                                   "seen_at": at(seen)}]}
    assert b"imsi" not in bodies[0].lower() and b"node" not in bodies[0].lower()
    assert [(n.state, n.attempts, n.last_error) for n in notices(b, "sent")] == [
        ("accepted", 1, None)]
    with b.app.db.read() as s:  # B stored no subscriber identity for it
        assert s.execute(select(func.count()).select_from(Sighting)).scalar_one() == 0

    # A's pull: a received notice naming B and Sweden, for A's open track record
    pulled = a.app.sync().pull()
    assert (pulled.sightings, pulled.sightings_refused) == (1, 0)
    [got] = notices(a, "received")
    with a.app.db.read() as s:
        record_id = s.execute(select(Record.id).where(Record.owner_id == "op-a")).scalar_one()
        traced = s.execute(select(AuditEvent.action, AuditEvent.detail).where(
            AuditEvent.action.like("sighting%") | AuditEvent.detail.contains("op-b"))).all()
    assert (got.imei_key, got.owner_id, got.reporter_id, got.reporter_country,
            got.state, got.record_id) == (phone[:14], "op-a", "op-b", "SE", "received",
                                          record_id)
    assert got.seen_at.replace(tzinfo=UTC) == seen
    assert traced == []  # the audit trail, kept for ever, keeps no trace of where it was seen

    # C (receives everything) and B never see the sighting; nor does anyone's snapshot
    assert c.app.sync().pull().sightings == 0
    assert "SightingEntry" not in feed_types(c)
    assert "SightingEntry" not in feed_types(b)
    assert "SightingEntry" in feed_types(a)
    assert c.app.sync().reconcile(force=True).records == 1  # the track record, nothing else
    assert notices(c, "received") == []

    # replays: B resends (answer lost), A pulls the same page again — nothing doubles
    with b.app.db.write() as s:
        s.execute(SightingNotice.__table__.update().values(state="sent"))
    assert b.app.sync().push().sightings.accepted == 1
    assert registry_rows(lab, "SELECT count(*) FROM registry_feed WHERE type = 'sighting'"
                         ) == [(1,)]
    with a.app.db.write() as s:
        sync_state.put(s, sync_state.CURSOR, "0", datetime.now(UTC))
    again = a.app.sync().pull()
    assert (again.sightings, again.sightings_refused) == (0, 0)
    assert len(notices(a, "received")) == 1


def test_a_device_inside_a_tracked_range_is_reported_to_the_range_owner(lab, a, b):
    first, last = imei(100), imei(199)
    a.app.intake().submit_signed(sign_order({
        "order_id": f"ORD-range-{uuid.uuid4().hex[:8]}", "kind": "track",
        "imei_range": {"first": first, "last": last}, "case_ref": "CPH-TRUCK-1",
        "police_unit": "Copenhagen Police", "reason": "stolen",
        "issued_at": at(datetime.now(UTC) - timedelta(minutes=1))},
        lab.root / "police" / "cph-police.key", "cph-police"), ALICE)
    assert a.app.sync().push().accepted == 1
    sent_notice(b, imei(150), "op-a")
    sent_notice(b, imei(200), "op-a")  # just past the range
    result = b.app.sync().push().sightings
    assert (result.accepted, result.rejected) == (1, 1)
    assert result.rejections[0]["error"].startswith("0003 ")
    assert a.app.sync().pull().sightings == 1
    [got] = notices(a, "received")
    with a.app.db.read() as s:
        record = s.execute(select(Record)).scalar_one()
    assert (got.imei_key, got.record_id, record.imei_key_last) == (
        imei(150)[:14], record.id, last[:14])


def test_the_registry_refuses_each_notice_it_cannot_deliver_with_a_code(lab, a, b):
    tracked, blocked, untracked, lifted, own = (imei(n) for n in range(10, 15))
    track(lab, a, tracked)
    track(lab, a, lifted)
    a.app.intake().submit_signed(lab.police_order("lift", lifted), ALICE)
    a.app.intake().submit_unsigned({"imei": blocked, "case_ref": "CPH-9",
                                    "police_unit": "Unit 7", "reason": "stolen"}, ALICE)
    assert a.app.sync().push().accepted == 2
    b.app.intake().submit_signed(lab.police_order("track", own), BOB)
    b.app.sync().push()
    now = datetime.now(UTC)

    def notice(number: str, **fields: Any) -> dict[str, Any]:
        return {"notice_id": uuid.uuid4().hex, "imei": number[:14],
                "seen_at": at(now - timedelta(minutes=1)), **fields}

    batch = [notice(tracked), notice(untracked), notice(lifted), notice(blocked), notice(own),
             notice(tracked, seen_at=at(now + timedelta(hours=1))),
             notice(tracked, seen_at=at(now - timedelta(days=30))),
             notice(tracked, seen_at="yesterday"),
             notice(tracked, seen_at="9999-12-31T23:59:59-23:59"),
             notice(tracked, imsi="238010000000001"),
             notice(tracked, node="amf-1.example"),
             notice("8600000000001")]
    client = b.app.registry_client()
    try:
        answers = client.push_sightings(batch)
        assert [(r["result"], r.get("code")) for r in answers] == [
            ("accepted", None), ("rejected", "0003"), ("rejected", "0003"),
            ("rejected", "0003"), ("rejected", "0013"), ("rejected", "0014"),
            ("rejected", "0014"), ("rejected", "0011"), ("rejected", "0011"), ("rejected", "0011"),
            ("rejected", "0011"), ("rejected", "0011")]
        assert all(r["message"] for r in answers[1:])
        # idempotent by notice id: the same notice again, the same answers; another content
        # under a used id is refused
        assert [r["result"] for r in client.push_sightings(batch[:2])] == [
            "duplicate", "rejected"]
        reused = client.push_sightings([{**batch[0], "seen_at": at(now)}])
        assert (reused[0]["result"], reused[0]["code"]) == ("rejected", "0011")
        # a malformed batch is refused whole
        for body in ([notice(tracked)] * 2, [notice(tracked) for _ in range(1001)],
                     [{"imei": tracked[:14]}]):
            with pytest.raises(BadInput):
                client.push_sightings(body)
    finally:
        client.close()
    assert registry_rows(lab, "SELECT owner_id, audience, reporter_id, reporter_country "
                              "FROM registry_feed WHERE type = 'sighting'") == [
        ("op-a", "op-a", "op-b", "SE")]
    # nothing of a refused notice (neither a subscriber nor a node) was kept
    assert "238010000000001" not in (lab.root / "registry.db").read_bytes().decode("latin-1")


def test_a_member_cannot_learn_of_a_track_record_outside_its_receive_profile(tmp_path):
    lab = Lab(tmp_path / "lab", [("op-a", "DK"), ("op-b", "SE"), ("op-n", "NO")],
              receives={"op-n": "country"})
    lab.start()
    try:
        a, n = lab.operator("op-a"), lab.operator("op-n")
        phone = imei(70)
        track(lab, a, phone)
        client = n.app.registry_client()
        try:
            [answer] = client.push_sightings([{"notice_id": "probe-1", "imei": phone[:14],
                                               "seen_at": at(datetime.now(UTC))}])
        finally:
            client.close()
        # the same answer as for a device nobody tracks
        assert (answer["result"], answer["code"]) == ("rejected", "0003")
        assert a.app.sync().pull().sightings == 0
    finally:
        lab.close()


def test_a_notice_signed_by_a_non_member_is_refused_and_nothing_is_kept(lab, a):
    phone = imei(20)
    track(lab, a, phone)
    stranger = Lab(lab.root / "stranger", [("op-b", "SE")])  # op-b's id, another key
    outsider = stranger.operator("op-b")
    outsider.config_path.write_text(outsider.config_path.read_text().replace(
        str(stranger.root / "keys" / "registry.pub"), str(lab.root / "keys" / "registry.pub"))
        .replace(stranger.url, lab.url))
    client = outsider.app.registry_client()
    try:
        with pytest.raises(Refused, match="signature"):
            client.push_sightings([{"notice_id": "n-1", "imei": phone[:14],
                                    "seen_at": at(datetime.now(UTC))}])
    finally:
        client.close()
        outsider.close()
    assert registry_rows(lab, "SELECT count(*) FROM registry_sightings") == [(0,)]


def test_pending_notices_wait_for_a_registry_that_is_down_and_are_sent_once_it_is_back(
        lab, a, b):
    phone = imei(30)
    track(lab, a, phone)
    notice_id = sent_notice(b, phone, "op-a")
    lab.stop()
    result = b.app.sync().push()
    assert result.sightings is None  # the notices' step failed; the push itself reported
    assert result.describe() == ("push: nothing to send; sighting notices not sent this time "
                                 "(`imeisync sync status` says why)")
    [row] = notices(b, "sent")
    assert (row.state, row.attempts) == ("sent", 1)
    assert "unreachable" in row.last_error or "did not answer" in row.last_error
    error = b.app.sync().status()["steps"]["sightings"]["last_error"]
    assert error["code"] in ("registry_unreachable", "registry_timeout")
    lab.start()
    assert b.app.sync().push().sightings.accepted == 1
    [row] = notices(b, "sent")
    assert (row.notice_id, row.state, row.attempts, row.last_error) == (
        notice_id, "accepted", 2, None)
    assert a.app.sync().pull().sightings == 1
    assert b.app.sync().status()["sighting_notices"] == {"sent_accepted": 1}
    assert "sighting notices: 1 received\n" in a.cli("sync", "status").stdout


def test_a_malformed_sent_row_is_rejected_here_and_holds_no_other_notice_back(lab, a, b):
    phone = imei(40)
    track(lab, a, phone)
    good = sent_notice(b, phone, "op-a")
    with b.app.db.write() as s:
        s.add(SightingNotice(notice_id="bad id with spaces", direction="sent",
                             imei_key=phone[:14], owner_id="op-a", reporter_id="op-b",
                             reporter_country="SE", seen_at=datetime.now(UTC),
                             state="pending", attempts=0))
    result = b.app.sync().push().sightings
    assert (result.accepted, result.rejected) == (1, 1)
    states = {n.notice_id: (n.state, (n.last_error or "")[:4]) for n in notices(b, "sent")}
    assert states == {good: ("accepted", ""), "bad id with spaces": ("rejected", "0011")}


def _registry_sighting(lab: Lab, seq_owner: str, key: str, reporter: str = "op-b",
                       country: str = "SE", notice: str | None = None) -> None:
    """A feed entry written straight into the registry's database: what a faulty or
    compromised registry could serve, signed by the real server."""
    now = at(datetime.now(UTC))
    with sqlite3.connect(lab.root / "registry.db") as conn:
        conn.execute(
            "INSERT INTO registry_feed (type, imei_key, owner_id, owner_country, at, "
            "received_at, audience, reporter_id, reporter_country, notice_id) "
            "VALUES ('sighting', ?, ?, 'DK', ?, ?, 'op-a', ?, ?, ?)",
            (key, seq_owner, now, now, reporter, country, notice or uuid.uuid4().hex))


def test_sighting_entries_not_for_our_open_track_records_are_refused_and_write_nothing(
        lab, a, b):
    tracked, blocked, closed = imei(50), imei(51), imei(52)
    track(lab, a, tracked)
    track(lab, a, closed)
    a.app.intake().submit_signed(lab.police_order("lift", closed), ALICE)
    a.app.intake().submit_unsigned({"imei": blocked, "case_ref": "CPH-9",
                                    "police_unit": "Unit 7", "reason": "stolen"}, ALICE)
    a.app.sync().push()
    a.app.sync().pull()
    _registry_sighting(lab, "op-c", tracked[:14])  # addressed to A, about another's record
    _registry_sighting(lab, "op-a", tracked[:14], reporter="op-a", country="DK")  # ourselves
    _registry_sighting(lab, "op-a", imei(53)[:14])  # a device A does not track
    _registry_sighting(lab, "op-a", blocked[:14])  # A blocks it, does not track it
    _registry_sighting(lab, "op-a", closed[:14])  # tracked once, closed since
    _registry_sighting(lab, "op-a", tracked[:14], country="Sweden")  # malformed
    _registry_sighting(lab, "op-a", tracked[:14], notice="ok-1")  # the one good entry
    with a.app.db.read() as s:
        events_before = s.execute(select(func.count()).select_from(AuditEvent)).scalar_one()
    pulled = a.app.sync().pull()
    assert (pulled.sightings, pulled.sightings_refused) == (1, 6)
    assert [(n.reporter_id, n.notice_id) for n in notices(a, "received")] == [
        ("op-b", "op-b:ok-1")]
    with a.app.db.read() as s:
        actions = s.execute(select(AuditEvent.action).where(
            AuditEvent.id > events_before)).scalars().all()
    assert sorted(actions) == ["sync.pull"]


def test_a_feed_page_not_signed_by_the_registry_writes_no_notice(lab, a, b):
    phone = imei(60)
    track(lab, a, phone)
    sent_notice(b, phone, "op-a")
    b.app.sync().push()
    # A is told to trust another key as the registry's: the real page no longer verifies
    a.config_path.write_text(a.config_path.read_text().replace(
        str(lab.root / "keys" / "registry.pub"), str(lab.root / "keys" / "op-c.pub")))
    a.close()
    with a.app.db.read() as s:
        cursor = sync_state.read(s, (sync_state.CURSOR,)).cursor
    with pytest.raises(Unavailable, match="signature"):
        a.app.sync().pull()
    assert notices(a, "received") == []
    with a.app.db.read() as s:
        assert sync_state.read(s, (sync_state.CURSOR,)).cursor == cursor


def test_the_registry_schema_from_its_migrations_matches_its_models(database_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from imeisync.registry.models import RegistryBase
    from imeisync.registry.schema import upgrade
    from imeisync.store.db import Database

    db = Database(database_url)
    try:
        upgrade(db)
        with db.engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn),
                                           RegistryBase.metadata)
    finally:
        db.dispose()
    assert [d for d in differences if not (d[0] == "remove_table"
                                           and d[1].name == "registry_alembic_version")] == []



def test_the_registry_on_its_own_database_backend_delivers_a_notice_to_the_owner_only(
        tmp_path, database_url):
    from support.registry_lab import InProcessRegistry

    registry = InProcessRegistry(tmp_path / "inproc", [("op-a", "DK"), ("op-b", "SE"),
                                                       ("op-c", "NO")], database_url)
    clients = {op: registry.client(op) for op in ("op-a", "op-b", "op-c")}
    try:
        now = datetime.now(UTC)
        key = imei(80)[:14]
        [opened] = clients["op-a"].push([{"change_id": "op-a:1", "action": "insert",
                                          "imei": key, "kind": "track", "reason": "stolen",
                                          "at": at(now)}])
        assert opened["result"] == "accepted"
        notice = {"notice_id": "n-80", "imei": key, "seen_at": at(now)}
        assert [r["result"] for r in clients["op-b"].push_sightings([notice])] == ["accepted"]
        assert [r["result"] for r in clients["op-b"].push_sightings([notice])] == ["duplicate"]
        pages = {op: c.feed_page(0, 100).entries for op, c in clients.items()}
        sightings = {op: [e for e in entries if type(e).__name__ == "SightingEntry"]
                     for op, entries in pages.items()}
        assert sightings["op-b"] == sightings["op-c"] == []
        [got] = sightings["op-a"]
        assert (got.imei_key, got.owner_id, got.reporter_id, got.reporter_country,
                got.notice_id) == (key, "op-a", "op-b", "SE", "n-80")
    finally:
        for client in clients.values():
            client.close()
        registry.close()
