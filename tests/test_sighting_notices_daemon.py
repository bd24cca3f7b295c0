"""The daemon sends a sighting notice as fast as an order: ``imeisync run`` at B (push every
minute) sends a pending notice within about a second, and A's pull turns it into the case's
"seen on a network of op-se (SE)"."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from imeisync.domain.imei import luhn_check_digit
from imeisync.services.orders import Actor
from imeisync.store.db import Database
from imeisync.store.models import SightingNotice
from support.daemon_harness import Daemon, daemon_config, wait_for
from support.registry_lab import Lab


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab", [("op-dk", "DK"), ("op-se", "SE")])
    yield lab
    lab.close()


def test_the_daemon_sends_a_pending_sighting_notice_within_a_second(lab: Lab) -> None:
    lab.start()
    key = "35000000000077"
    phone = key + luhn_check_digit(key)
    dk = lab.operator("op-dk")
    dk.app.intake().submit_signed(lab.police_order("track", phone), Actor("alice"))
    assert dk.app.sync().push().accepted == 1

    config, eir, api = daemon_config(lab, "op-se", push="60s", pull="1s")
    daemon = Daemon(config, eir, api)
    try:
        daemon.start()
        se = lab.operators["op-se"]
        wait_for(lambda: daemon.check(phone) == "GREYLISTED", 10, what="A's track record pulled")
        db = Database(se.app.config.database_url)
        try:
            with db.write() as s:
                s.add(SightingNotice(notice_id=uuid.uuid4().hex, direction="sent",
                                     imei_key=key, owner_id="op-dk", reporter_id="op-se",
                                     reporter_country="SE",
                                     seen_at=datetime.now(UTC) - timedelta(seconds=5),
                                     state="pending", attempts=0))

            def accepted() -> bool:
                with db.read() as s:
                    return s.execute(select(SightingNotice.state)).scalar() == "accepted"

            took = wait_for(accepted, 10, interval=0.02, what="notice accepted")
        finally:
            db.dispose()
        assert took < 2.0, f"sent {took:.2f}s after it was written"
        assert daemon.stop() == 0
    finally:
        daemon.cleanup()
    dk.cli("sync", "pull")
    with dk.app.db.read() as s:
        got = s.execute(select(SightingNotice)).scalar_one()
    assert (got.direction, got.reporter_id, got.reporter_country) == ("received", "op-se", "SE")
    assert "1 received" in dk.cli("sync", "status").stdout
