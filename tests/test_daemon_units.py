"""The daemon's parts, in process: sd_notify, structured logs, leadership (SQLite lock file and
PostgreSQL advisory lock), the retention purge, the operations figures, the example config."""

from __future__ import annotations

import json
import logging
import os
import socket
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from imeisync.adapters.leader import PostgresLeadership, SqliteLeadership, who_leads
from imeisync.adapters.systemd import Notifier, watchdog_interval
from imeisync.bootstrap import App
from imeisync.config import SCHEMA, load_config
from imeisync.domain.errors import BadInput, Unavailable
from imeisync.entrypoints.logs import JsonFormatter, KeyValueFormatter, event
from imeisync.services import audit
from imeisync.services.operations import OpsReader
from imeisync.services.orders import Actor
from imeisync.services.retention import purge
from imeisync.store.models import AuditEvent, Record
from support.fixtures_app import Police

ROOT = Path(__file__).resolve().parent.parent
IMEI = "490154203237518"
OTHER = "354178036859789"


# -- sd_notify -------------------------------------------------------------------------------


def test_notifier_sends_datagrams_to_the_socket_named_by_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(2)
    try:
        notifier = Notifier(str(path))
        assert notifier.ready("serving 3 entries")
        assert server.recv(512).decode().splitlines()[:2] == ["READY=1", "STATUS=serving 3 entries"]
        assert notifier.watchdog()
        assert server.recv(512) == b"WATCHDOG=1"
        notifier.close()
    finally:
        server.close()
    assert Notifier(None, from_environment=False).notify(READY=1) is False


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"imeisync-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(2)
    try:
        assert Notifier("@" + name).notify(STOPPING=1)
        assert server.recv(64) == b"STOPPING=1"
    finally:
        server.close()


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None


# -- structured logs ---------------------------------------------------------------------------


def _record(level: int, message: str, name: str = "imeisync.sync", **fields: object
            ) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, message, None, None)
    record.event = "sync.pull"  # type: ignore[attr-defined]
    record.fields = fields  # type: ignore[attr-defined]
    return record


def test_key_value_logs_are_one_line_per_event_with_fields() -> None:
    line = KeyValueFormatter().format(_record(logging.INFO, "pull: 2 entries\nsecond line",
                                              pages=1, registry="http://r:8090/x y"))
    assert "\n" not in line
    assert " level=info " in line and " event=sync.pull " in line and " pages=1 " in line
    assert 'registry="http://r:8090/x y"' in line
    assert line.endswith('msg="pull: 2 entries\\nsecond line"')


def test_imeis_are_masked_below_warning_but_not_in_warnings() -> None:
    info = KeyValueFormatter().format(_record(logging.INFO, f"opened IMEI key {IMEI[:14]}"))
    assert IMEI[:14] not in info and "<imei>" in info
    warning = JsonFormatter().format(_record(logging.WARNING, f"rejected key {IMEI[:14]}"))
    assert json.loads(warning)["msg"] == f"rejected key {IMEI[:14]}"
    # Only our own loggers are masked (Granian's ids are not IMEIs).
    other = KeyValueFormatter().format(_record(logging.INFO, "worker 139984330799808",
                                               name="_granian"))
    assert "139984330799808" in other


def test_event_helper_carries_the_event_name(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("imeisync.test")
    with caplog.at_level(logging.INFO, logger="imeisync.test"):
        event(log, logging.INFO, "job.done", "push: nothing to send", job="push")
    record = caplog.records[-1]
    assert record.event == "job.done" and record.fields == {"job": "push"}


# -- leadership --------------------------------------------------------------------------------


def test_one_daemon_per_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'imeisync.db'}"
    first = SqliteLeadership(url)
    first.acquire()
    assert who_leads(url)["running"] is True
    second = SqliteLeadership(url)
    with pytest.raises(Unavailable, match=f"pid {os.getpid()}"):
        second.acquire()
    first.release()
    assert who_leads(url)["running"] is False
    second.acquire()
    second.release()
    with pytest.raises(BadInput):
        SqliteLeadership("sqlite:///:memory:")


def test_postgres_leadership_is_one_advisory_lock_per_database(
        postgres_url: str, postgres_server: object) -> None:
    first = PostgresLeadership(postgres_url, node="a:1")
    second = PostgresLeadership(postgres_url, node="b:2")
    other_url = postgres_server.create_database()  # type: ignore[attr-defined]
    other_db = PostgresLeadership(other_url, node="c:3")
    try:
        assert first.tick() is True
        assert second.tick() is False
        assert first.tick() is True  # keeps it
        assert other_db.tick() is True  # another database, another lock
        assert who_leads(postgres_url)["node"] == "a:1"
        first.release()
        assert second.tick() is True
        assert who_leads(postgres_url)["node"] == "b:2"
        # A leader whose connection dies steps down at its next tick.
        assert second.conn is not None
        second.conn.invalidate()
        assert second.tick() in (True, False)  # re-elected on a new connection, or not
    finally:
        for leadership in (first, second, other_db):
            leadership.release()
        postgres_server.drop_database(other_url.rsplit("/", 1)[1])  # type: ignore[attr-defined]


# -- retention ---------------------------------------------------------------------------------


def test_retention_purges_notes_of_cases_closed_long_ago_and_audits_it(
        app: App, police: Police) -> None:
    intake = app.intake()
    alice = Actor("alice")
    for imei in (IMEI, OTHER):
        intake.submit_unsigned({"imei": imei, "case_ref": "CPH-1", "police_unit": "CPH",
                                "reason": "stolen", "note": "owner Jens, tel 12345678"}, alice)
    intake.submit_signed(police.sign("lift", IMEI), alice)
    long_ago = datetime.now(UTC) - timedelta(days=800)
    with app.db.write() as session:
        session.execute(update(Record).where(Record.imei_key == IMEI[:14])
                        .values(closed_at=long_ago))
    result = purge(app.db, 730)
    assert (result.notes, result.dispute_texts) == (1, 0)
    with app.db.read() as session:
        notes = dict(session.execute(select(Record.imei_key, Record.note_enc)).all())
        assert notes[IMEI[:14]] is None  # closed 800 days ago: purged
        assert notes[OTHER[:14]] is not None  # still open: kept
        last = session.execute(select(AuditEvent).order_by(AuditEvent.id.desc())).scalars().first()
        assert last.action == "retention.purged" and json.loads(last.detail)["notes"] == 1
        assert audit.verify(session).ok
    assert purge(app.db, 730).notes == 0  # nothing left: idempotent


# -- operations figures ------------------------------------------------------------------------


def test_ops_figures_count_orders_incrementally_and_the_outbox_by_state(app: App) -> None:
    reader = OpsReader(app.db)
    assert reader.read().orders == {}
    intake = app.intake()
    intake.submit_unsigned({"imei": IMEI, "case_ref": "C-1", "police_unit": "CPH",
                            "reason": "stolen"}, Actor("alice"))
    figures = reader.read()
    assert figures.orders == {("block", "accepted"): 1}
    assert figures.outbox == {"pending": 1, "sent": 0, "rejected": 0}
    assert figures.oldest_unsent_age is not None and figures.oldest_unsent_age < 60
    assert figures.registry_reachable() is None  # never tried
    intake.submit_unsigned({"imei": OTHER, "case_ref": "C-2", "police_unit": "CPH",
                            "reason": "lost"}, Actor("alice"))
    assert reader.read().orders == {("block", "accepted"): 2}


# -- configuration -------------------------------------------------------------------------------


def test_the_example_config_documents_every_key_and_loads(tmp_path: Path) -> None:
    text = (ROOT / "config" / "imeisync.example.toml").read_text()
    raw = tomllib.loads(text)
    for section, keys in SCHEMA.items():
        assert set(raw.get(section, {})) == set(keys), section
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "imeisync.toml").write_text(text)
    config = load_config(folder / "imeisync.toml", environ={})
    assert config.get("sync", "push_interval") == 30.0


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("IMEISYNC_SYNC_PUSH_INTERVAL", "0s", "at least 1s"),
    ("IMEISYNC_SYNC_PULL_INTERVAL", "soon", "duration"),
    ("IMEISYNC_SECURITY_RETENTION_DAYS", "0", "at least 1"),
    ("IMEISYNC_EIR_WORKERS", "-1", "0 for one per core"),
    ("IMEISYNC_LOG_LEVEL", "chatty", "DEBUG"),
])
def test_daemon_settings_are_validated(variable: str, value: str, expected: str) -> None:
    with pytest.raises(BadInput, match=expected) as caught:
        load_config(environ={variable: value})
    assert variable in str(caught.value)


# -- jobs --------------------------------------------------------------------------------------


def test_a_broken_audit_chain_is_an_alert_and_a_metric_not_a_crash(
        app: App, caplog: pytest.LogCaptureFixture) -> None:
    from imeisync.entrypoints.jobs import Jobs
    from imeisync.entrypoints.telemetry import ops_families, render

    app.intake().submit_unsigned({"imei": IMEI, "case_ref": "C-1", "police_unit": "CPH",
                                  "reason": "stolen"}, Actor("alice"))
    with app.db.write() as session:  # someone edits history behind imeisync's back
        session.execute(update(AuditEvent).where(AuditEvent.id == 1).values(actor="mallory"))
    jobs = Jobs(app, lambda: True)
    with caplog.at_level(logging.INFO, logger="imeisync.daemon.jobs"):
        assert jobs.run_job("audit", jobs.audit) is True  # the verification itself ran
    alert = [r for r in caplog.records if getattr(r, "event", None) == "audit.broken"]
    assert alert and alert[0].levelno == logging.ERROR and "event 1" in alert[0].getMessage()
    figures = OpsReader(app.db).read()
    assert figures.audit["ok"] is False and figures.audit["broken_event"] == 1
    text = render(ops_families(figures, jobs.stats, {"this_node": True}, [], 1)).decode()
    assert "imeisync_audit_chain_intact 0.0" in text


def test_a_failing_job_is_logged_with_its_cause_and_never_raises(
        app: App, caplog: pytest.LogCaptureFixture) -> None:
    from imeisync.entrypoints.jobs import Jobs

    jobs = Jobs(app, lambda: True)

    def down() -> str:
        raise Unavailable("registry http://r unreachable: refused", "try later")

    def bug() -> str:
        raise KeyError("surprise")

    with caplog.at_level(logging.INFO, logger="imeisync.daemon.jobs"):
        assert jobs.run_job("push", down) is False
        assert jobs.run_job("push", down) is False
        assert jobs.run_job("pull", bug) is False
        assert jobs.run_job("push", lambda: "push: 1 change(s) in 1 batch(es)") is True
    failed = [r for r in caplog.records if getattr(r, "event", None) == "job.failed"]
    assert "unreachable" in failed[0].getMessage() and failed[1].fields["failures_in_a_row"] == 2
    assert any(r.exc_info for r in failed if r.fields["job"] == "pull")  # a bug: traceback
    assert [r for r in caplog.records if getattr(r, "event", None) == "job.recovered"]
    assert jobs.stats["push"]["failed"] == 2 and jobs.stats["push"]["ok"] == 1
    not_leader = Jobs(app, lambda: False)
    assert not_leader.run_job("push", down) is False
    assert not_leader.stats["push"]["skipped"] == 1 and not_leader.stats["push"]["failed"] == 0
