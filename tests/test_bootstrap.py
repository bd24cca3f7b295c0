"""The composition root: what a test may swap in ``App`` reaches every service it builds."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from imeisync.bootstrap import App
from imeisync.config import load_config
from imeisync.services.orders import Actor
from imeisync.store import models

IMEI, KEY = "352099001761481", "35209900176148"


def test_the_clock_given_to_the_app_dates_the_records_and_events_its_services_write(
        operator_config: Path) -> None:
    moment = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    app = App(load_config(operator_config), clock=lambda: moment)
    try:
        app.intake().submit_unsigned({"imei": IMEI, "case_ref": "CPH-1", "police_unit": "CPH",
                                      "reason": "stolen"}, Actor("officer-17"))
        with app.db.read() as session:
            opened = session.execute(select(models.Record.opened_at)
                                     .where(models.Record.imei_key == KEY)).scalar_one()
            events = session.execute(select(models.AuditEvent.at)).scalars().all()
        assert opened.replace(tzinfo=UTC) == moment
        assert events and all(at.replace(tzinfo=UTC) == moment for at in events)
    finally:
        app.close()


def test_a_registry_client_factory_replaces_the_configured_registry_for_sync_and_disputes(
        operator_config: Path) -> None:
    made: list[dict[str, Any]] = []

    def factory(**options: Any) -> Any:
        made.append(options)
        return f"client #{len(made)}"

    app = App(load_config(operator_config), registry_client_factory=factory)
    try:
        assert app.sync().client == "client #1"  # no [registry] keys needed: none are read
        assert app.sync(client_options={"retries": 0}).client == "client #2"
        assert app.registry_client(timeout=1.0) == "client #3"
        assert made == [{}, {"retries": 0}, {"timeout": 1.0}]
    finally:
        app.close()
