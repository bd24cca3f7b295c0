"""Trace alerts delivered to a real HTTP receiver on 127.0.0.1 that verifies each JWS with the
operator's public key: delivered once; a 500 retried after the back-off; a hanging endpoint cut
by the timeout; a redirect not followed and retried; a crash between the answer and the mark
sends it again with the same idempotency key; the daemon's other jobs run while it hangs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from imeisync.adapters.keys import generate_keypair, load_private_key, load_public_key
from imeisync.bootstrap import App
from imeisync.config import load_config
from imeisync.services import sighting_alerts
from imeisync.services.sighting_alerts import (
    MAX_DELAY,
    AlertSender,
    alert_status,
    backoff,
)
from imeisync.store import models
from support.alert_receiver import Receiver
from support.fixtures_api import imei
from support.fixtures_app import Police, write_config
from support.sighting_rows import add_sighting, track

IMSI = "240991234567890"


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair("op-dk", tmp_path / "alert-key")


@pytest.fixture
def receiver(keys: tuple[Path, Path]) -> Iterator[Receiver]:
    server = Receiver(load_public_key(keys[1])).start()
    yield server
    server.stop()


@pytest.fixture
def alert_app(tmp_path: Path, database_url: str, police: Police, keys: tuple[Path, Path],
              receiver: Receiver) -> Iterator[App]:
    config = write_config(tmp_path / "op", database_url, extra=(
        f'[sightings]\nwebhook_url = "{receiver.url}"\nwebhook_key = "{keys[0]}"\n'))
    (tmp_path / "op" / "police-keys" / "cph-police.pub").write_bytes(
        police.key.with_suffix(".pub").read_bytes())
    app = App(load_config(config))
    yield app
    app.close()


def _sender(app: App, clock: Clock, **options: Any) -> AlertSender:
    return AlertSender(app.db, app.config.sightings.webhook_url,
                       lambda: load_private_key(Path(app.config.sightings.webhook_key)),
                       kid=app.operator_id, clock=clock, **options)


def _alert(app: App, sighting_id: str) -> models.SightingAlert:
    with app.db.read() as session:
        row = session.execute(select(models.SightingAlert).where(
            models.SightingAlert.sighting_id == sighting_id)).scalar_one()
        session.expunge(row)
        return row


def _sighting(app: App, police: Police, n: int = 21) -> str:
    record = track(app, police.sign("track", imei(n), case_ref=f"CPH-T-{n}"))
    return add_sighting(app, record, imsi=IMSI, alert=True)


def test_an_alert_is_delivered_once_signed_with_an_idempotency_key_and_no_imsi(
        alert_app: App, police: Police, receiver: Receiver) -> None:
    sighting_id = _sighting(alert_app, police)
    sender = alert_app.alert_sender()
    assert sender is not None
    try:
        assert sender.run().delivered == 1
        assert sender.run().describe().startswith("alerts: nothing due")
    finally:
        sender.close()
    (got,) = receiver.received
    assert got["idempotency_key"] == sighting_id
    assert got["content_type"] == "application/jose"
    payload = got["payload"]
    assert (payload["sighting_id"], payload["case_ref"], payload["imei"], payload["node"],
            payload["svn"], payload["interface"], payload["operator"]) == (
        sighting_id, "CPH-T-21", imei(21), "10.0.0.7", "03", "n5g-eir", "op-dk")
    assert IMSI not in got["token"] and IMSI not in str(payload)
    row = _alert(alert_app, sighting_id)
    assert (row.state, row.attempts, row.last_error) == ("delivered", 1, None)
    assert row.delivered_at is not None
    from prometheus_client import REGISTRY, generate_latest

    figures = generate_latest(REGISTRY).decode()
    assert 'imeisync_sighting_alert_deliveries_total{result="delivered"}' in figures
    assert "imeisync_sighting_alerts_pending 0.0" in figures


def _failing_once(app: App, police: Police, receiver: Receiver, behaviour: str
                  ) -> tuple[str, Clock, AlertSender, Any]:
    """One alert, its first delivery answered with ``behaviour``; then the endpoint is fixed."""
    sighting_id = _sighting(app, police)
    clock = Clock()
    sender = _sender(app, clock)
    receiver.behaviour = behaviour
    result = sender.run()
    receiver.behaviour = "ok"
    return sighting_id, clock, sender, result


def test_a_500_is_retried_after_a_jittered_back_off_and_then_delivered(
        alert_app: App, police: Police, receiver: Receiver) -> None:
    sighting_id, clock, sender, failed = _failing_once(alert_app, police, receiver, "500")
    assert (failed.delivered, failed.failed) == (0, 1) and "HTTP 500" in failed.errors[0]
    row = _alert(alert_app, sighting_id)
    assert (row.state, row.attempts) == ("pending", 1) and "500" in (row.last_error or "")
    wait = (row.next_attempt_at - clock.now).total_seconds()
    assert sighting_alerts.BASE_DELAY * 0.5 <= wait <= sighting_alerts.BASE_DELAY
    assert sender.run().delivered == 0  # not due yet: nothing sent
    assert len(receiver.received) == 1
    clock.advance(wait + 0.001)
    assert sender.run().delivered == 1
    assert [r["idempotency_key"] for r in receiver.received] == [sighting_id] * 2
    assert _alert(alert_app, sighting_id).state == "delivered"
    assert alert_status(alert_app.db)["delivered"] == 1


def test_a_hanging_endpoint_is_cut_by_the_timeout_and_the_run_stops_there(
        alert_app: App, police: Police, receiver: Receiver) -> None:
    first, second = _sighting(alert_app, police, 22), _sighting(alert_app, police, 23)
    receiver.behaviour, receiver.hang = "hang", 3.0
    sender = _sender(alert_app, Clock(), timeout=(1.0, 0.5))
    started = time.monotonic()
    result = sender.run()
    assert time.monotonic() - started < 2.5
    assert result.failed == 1 and "timeout" in result.errors[0]
    assert len(receiver.received) == 1  # the second waits for the next run
    states = {s: _alert(alert_app, s) for s in (first, second)}
    assert sorted(r.attempts for r in states.values()) == [0, 1]
    status = alert_status(alert_app.db)
    assert status["pending"] == 2 and len(status["failing"]) == 1


def test_a_redirect_is_not_followed_counts_as_a_failure_and_is_retried(
        alert_app: App, police: Police, receiver: Receiver) -> None:
    sighting_id, clock, sender, result = _failing_once(alert_app, police, receiver,
                                                       "redirect")
    assert result.failed == 1 and "307" in result.errors[0] and "not followed" in result.errors[0]
    assert [r["path"] for r in receiver.received] == ["/alerts"]  # /elsewhere never asked
    clock.advance(MAX_DELAY)
    assert sender.run().delivered == 1
    assert [r["path"] for r in receiver.received] == ["/alerts", "/alerts"]
    assert _alert(alert_app, sighting_id).attempts == 2


def test_a_crash_between_the_answer_and_the_mark_delivers_again_with_the_same_key(
        alert_app: App, police: Police, receiver: Receiver) -> None:
    sighting_id = _sighting(alert_app, police)

    def crash(_: str) -> None:
        raise KeyboardInterrupt("the daemon died here")

    with pytest.raises(KeyboardInterrupt):
        _sender(alert_app, Clock(), after_send=crash).run()
    assert _alert(alert_app, sighting_id).state == "pending"
    assert _sender(alert_app, Clock()).run().delivered == 1  # the restarted daemon
    first, again = receiver.received
    assert first["idempotency_key"] == again["idempotency_key"] == sighting_id
    assert first["token"] == again["token"]  # byte for byte: the receiver can drop the copy
    assert _alert(alert_app, sighting_id).state == "delivered"


def test_an_alert_whose_sighting_was_purged_expires_unsent(
        alert_app: App, police: Police, receiver: Receiver) -> None:
    sighting_id = _sighting(alert_app, police)
    with alert_app.db.write() as session:
        session.query(models.Sighting).delete()
    assert _sender(alert_app, Clock()).run().expired == 1
    assert receiver.received == [] and _alert(alert_app, sighting_id).state == "expired"


def test_the_back_off_doubles_is_jittered_and_capped() -> None:
    assert backoff(1, lambda: 1.0) == sighting_alerts.BASE_DELAY
    assert backoff(1, lambda: 0.0) == sighting_alerts.BASE_DELAY / 2
    assert backoff(4, lambda: 1.0) == sighting_alerts.BASE_DELAY * 8
    assert backoff(40, lambda: 1.0) == MAX_DELAY
    assert backoff(10_000, lambda: 0.0) == MAX_DELAY / 2


def test_no_webhook_no_sender(app: App) -> None:
    assert app.alert_sender() is None


def test_the_daemons_other_jobs_run_while_the_alert_endpoint_hangs(
        alert_app: App, police: Police, receiver: Receiver) -> None:
    from imeisync.entrypoints.jobs import Jobs

    _sighting(alert_app, police)
    receiver.behaviour, receiver.hang = "hang", 4.0
    jobs = Jobs(alert_app, lambda: True)
    jobs.start()
    try:
        assert jobs.scheduler.get_job("alerts") is not None
        jobs.run_now("alerts")
        deadline = time.monotonic() + 5
        while not jobs.stats["alerts"]["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert jobs.stats["alerts"]["running"]
        jobs.run_now("audit")
        while jobs.stats["audit"]["ok"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert jobs.stats["audit"]["ok"] == 1
        assert jobs.stats["alerts"]["running"]  # still waiting on the endpoint
    finally:
        jobs.shutdown()
        until = time.monotonic() + receiver.hang + 5  # let the hung run end before teardown
        while jobs.running() and time.monotonic() < until:
            time.sleep(0.05)
        jobs.close()


def test_the_running_daemon_delivers_a_new_sightings_alert_within_seconds(
        tmp_path: Path, keys: tuple[Path, Path], receiver: Receiver) -> None:
    from support.daemon_harness import Daemon, daemon_config, metric, wait_for
    from support.registry_lab import Lab

    lab = Lab(tmp_path / "lab", [("op-dk", "DK")])
    daemon = None
    try:
        lab.start()
        config, eir, api = daemon_config(lab, "op-dk", push="30s", pull="5m", extra=(
            f'[sightings]\nwebhook_url = "{receiver.url}"\nwebhook_key = "{keys[0]}"\n'))
        daemon = Daemon(config, eir, api).start()
        app = lab.operators["op-dk"].app
        record = track(app, lab.police_order("track", imei(41), case_ref="CPH-D-41"))
        sighting_id = add_sighting(app, record, imsi=IMSI, alert=True)
        wait_for(lambda: receiver.received, 20, what="the alert delivered by the daemon")
        assert receiver.received[0]["idempotency_key"] == sighting_id
        assert receiver.received[0]["payload"]["case_ref"] == "CPH-D-41"
        wait_for(lambda: _alert(app, sighting_id).state == "delivered", 5, what="marked")
        wait_for(lambda: (metric(daemon.metrics(), "imeisync_sighting_alert_deliveries_total",
                                 result="delivered") or 0) >= 1, 10, what="counted")
        assert daemon.stop() == 0
    finally:
        if daemon is not None:
            daemon.cleanup()
        lab.close()
