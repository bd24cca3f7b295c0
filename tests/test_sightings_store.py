"""The sighting rules and their retention, on SQLite and a real PostgreSQL.

``SightingRecorder`` is what every attach-check process's writer calls: two recorders stand for
two workers (the dedupe must hold across them). The retention job deletes old sightings with
their alerts, keeps disclosures, and audits the counts.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from imeisync.adapters.data_crypto import DataCipher
from imeisync.adapters.sighting_queue import Observation
from imeisync.bootstrap import App
from imeisync.services import audit
from imeisync.services.sightings import SightingRecorder
from imeisync.store import models
from support.fixtures_app import count
from support.sightings_lab import seed_record

TRACKED, FOREIGN, BLOCKED, BOTH = ("49015420323751", "35209900176148", "35417803685978",
                                   "35686800004141")
RANGE_FIRST, RANGE_LAST = "86000000000100", "86000000000199"
IMSI = "238010123456789"
DEDUPE = 900.0


def recorder(app: App, *, blocked_attempts: bool = False, alerts: bool = False,
             ) -> SightingRecorder:
    return SightingRecorder(app.db, lambda: app.cipher, operator_id="op-dk",
                            operator_country="DK", dedupe=DEDUPE,
                            blocked_attempts=blocked_attempts, alerts=alerts)


def seen(key: str, imsi: str | None = IMSI, *, at: float | None = None,
         status: str = "GREYLISTED", query: str | None = None) -> Observation:
    query = query if query is not None else f"pei=imeisv-{key}05"
    return (at if at is not None else time.time(), "n5g-eir", status, int(key), imsi, query,
            "10.1.2.3:41000")


def test_the_rules_decide_per_open_record_covering_the_device(app: App) -> None:
    track = seed_record(app.config.database_url, TRACKED, "track")
    seed_record(app.config.database_url, FOREIGN, "track", owner="op-se")
    seed_record(app.config.database_url, BLOCKED, "block")
    seed_record(app.config.database_url, BOTH, "block", owner="op-se")
    both_track = seed_record(app.config.database_url, BOTH, "track", case_ref="CASE-BOTH")
    ranged = seed_record(app.config.database_url, RANGE_FIRST, "track", last=RANGE_LAST)
    closed = seed_record(app.config.database_url, "86000000000500", "track")
    with app.db.write() as session:
        session.get(models.Record, closed).closed_at = datetime.now(UTC)

    result = recorder(app, alerts=True).record([
        seen(TRACKED), seen(FOREIGN), seen(BLOCKED, status="BLACKLISTED"),
        seen(BOTH, status="BLACKLISTED"), seen("86000000000150"), seen("86000000000200"),
        seen("86000000000500")])

    assert (result.recorded, result.noticed, result.ignored) == (3, 1, 3)
    with app.db.read() as session:
        found = {(s.imei_key, s.record_id, s.status, s.svn, s.node) for s in session.execute(
            select(models.Sighting)).scalars()}
        notices = [(n.imei_key, n.owner_id) for n in session.execute(
            select(models.SightingNotice)).scalars()]
    assert found == {(TRACKED, track, "GREYLISTED", "05", "10.1.2.3"),
                     (BOTH, both_track, "BLACKLISTED", "05", "10.1.2.3"),
                     ("86000000000150", ranged, "GREYLISTED", "05", "10.1.2.3")}
    assert notices == [(FOREIGN, "op-se")]
    assert count(app, models.SightingAlert) == 3


def test_blocked_attempts_records_only_our_blocked_devices(app: App) -> None:
    own = seed_record(app.config.database_url, BLOCKED, "block")
    seed_record(app.config.database_url, FOREIGN, "block", owner="op-se")

    result = recorder(app, blocked_attempts=True, alerts=True).record([
        seen(BLOCKED, status="BLACKLISTED"), seen(FOREIGN, status="BLACKLISTED")])

    assert (result.recorded, result.ignored) == (1, 1)
    with app.db.read() as session:
        [sighting] = session.execute(select(models.Sighting)).scalars()
    assert (sighting.record_id, sighting.status) == (own, "BLACKLISTED")
    assert count(app, models.SightingAlert) == 0  # alerts trace tracked devices only


def test_dedupe_holds_across_workers_and_ends_with_the_window(app: App) -> None:
    seed_record(app.config.database_url, TRACKED, "track")
    seed_record(app.config.database_url, FOREIGN, "track", owner="op-se")
    worker_a, worker_b = recorder(app), recorder(app)
    now = time.time()

    first = worker_a.record([seen(TRACKED, at=now), seen(FOREIGN, at=now)])
    again = worker_b.record([seen(TRACKED, at=now + 1), seen(FOREIGN, at=now + 2),
                             seen(TRACKED, at=now + 3)])
    other = worker_b.record([seen(TRACKED, "238010000000002", at=now + 4),
                             seen(TRACKED, None, at=now + 5)])
    later = worker_a.record([seen(TRACKED, at=now + DEDUPE + 1),
                             seen(FOREIGN, at=now + DEDUPE + 1)])

    assert (first.recorded, first.noticed) == (1, 1)
    assert (again.recorded, again.noticed, again.deduplicated) == (0, 0, 3)
    assert other.recorded == 2
    assert (later.recorded, later.noticed) == (1, 1)
    assert count(app, models.Sighting) == 4 and count(app, models.SightingNotice) == 2


def test_the_imsi_is_stored_only_encrypted_and_a_malformed_one_not_at_all(app: App) -> None:
    seed_record(app.config.database_url, TRACKED, "track")

    result = recorder(app).record([seen(TRACKED), seen(TRACKED, "12345")])

    assert (result.recorded, result.malformed) == (2, 1)
    with app.db.read() as session:
        by_state = {s.imsi_state: s for s in session.execute(select(models.Sighting)).scalars()}
    present, malformed = by_state["present"], by_state["malformed"]
    cipher: DataCipher = app.cipher
    assert cipher.decrypt(present.imsi_enc, context=f"sighting:{present.sighting_id}") == IMSI
    assert present.imsi_digest == cipher.digest(IMSI, purpose="sighting-imsi")
    assert IMSI not in json.dumps([present.imsi_enc, present.imsi_digest])
    assert (malformed.imsi_enc, malformed.imsi_digest) == (None, None)


def test_retention_deletes_old_sightings_and_their_alerts_keeps_disclosures_and_audits(
        app: App) -> None:
    from imeisync.entrypoints.jobs import Jobs

    seed_record(app.config.database_url, TRACKED, "track")
    days = app.config.sightings.retention_days
    old = time.time() - (days + 1) * 86400
    recorder(app, alerts=True).record([seen(TRACKED, at=old), seen(TRACKED, "238010000000002"),
                                       seen(TRACKED, "238010000000003", at=old + 1)])
    with app.db.write() as session:
        for sighting in session.execute(select(models.Sighting)).scalars():
            session.add(models.SightingDisclosure(
                sighting_id=sighting.sighting_id, imei_key=TRACKED, case_ref="CASE-7",
                court_order="K-1", court="Copenhagen City Court", disclosed_at=datetime.now(UTC),
                disclosed_by="alice"))

    jobs = Jobs(app, lambda: True)
    assert jobs.run_job("retention", jobs.retention) is True

    with app.db.read() as session:
        left = list(session.execute(select(models.Sighting)).scalars())
        alerts = list(session.execute(select(models.SightingAlert)).scalars())
        last = session.execute(select(models.AuditEvent).order_by(
            models.AuditEvent.id.desc())).scalars().first()
        assert audit.verify(session).ok
    assert len(left) == 1 and left[0].seen_at > datetime.now(UTC) - timedelta(days=1)
    assert [a.sighting_id for a in alerts] == [left[0].sighting_id]
    assert count(app, models.SightingDisclosure) == 3
    assert last.action == "retention.sightings_purged"
    assert json.loads(last.detail)["sightings"] == 2 and IMSI not in last.detail
    assert app.purge_sightings()[0] == 0  # nothing left: idempotent


def test_retention_deletes_old_notices_both_ways_and_old_alerts_too(app: App) -> None:
    days = app.config.sightings.retention_days
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=days + 1), now - timedelta(days=1)
    with app.db.write() as session:
        for n, (direction, at) in enumerate([("sent", old), ("received", old),
                                             ("received", recent)]):
            session.add(models.SightingNotice(
                notice_id=f"op-se:{n}", direction=direction, imei_key=TRACKED,
                owner_id="op-dk", reporter_id="op-se", reporter_country="SE", seen_at=at,
                state="received" if direction == "received" else "accepted", attempts=0))
            session.add(models.SightingAlert(sighting_id=f"op-se:{n}", created_at=at,
                                             state="delivered", attempts=1, next_attempt_at=at))
    app.purge_sightings()
    with app.db.read() as session:
        notices = session.execute(select(models.SightingNotice.notice_id)).scalars().all()
        alerts = session.execute(select(models.SightingAlert.sighting_id)).scalars().all()
        last = session.execute(select(models.AuditEvent).order_by(
            models.AuditEvent.id.desc())).scalars().first()
    assert notices == ["op-se:2"] and alerts == ["op-se:2"]
    assert last.action == "retention.sighting_notices_purged"
    assert json.loads(last.detail)["notices"] == 2 and TRACKED not in last.detail
