"""Sightings written straight into the store, as the attach check's writer would (the design:
police and registry tests create their rows with the models; the IMSI encrypted with the data
key under the context ``sighting:<id>``)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta

from imeisync.bootstrap import App
from imeisync.services.orders import Actor
from imeisync.services.sightings import imsi_context
from imeisync.store import models


def track(app: App, token: str) -> int:
    """Accept a signed track order; its record's id."""
    return app.intake().submit_signed(token, Actor("seed")).record_id


def add_sighting(app: App, record_id: int, *, imsi: str | None = "240991234567890",
                 imsi_state: str | None = None, node: str = "10.0.0.7",
                 svn: str | None = "03", interface: str = "n5g-eir",
                 seen_at: datetime | None = None, alert: bool = False,
                 case_ref: str | None = None) -> str:
    """One sighting of record ``record_id`` (and its pending alert); its public id."""
    sighting_id = uuid.uuid4().hex
    state = imsi_state or ("present" if imsi else "absent")
    with app.db.write() as session:
        record = session.get(models.Record, record_id)
        assert record is not None
        session.add(models.Sighting(
            sighting_id=sighting_id, seen_at=seen_at or datetime.now(UTC),
            interface=interface, status="GREYLISTED" if record.kind == "track" else "BLACKLISTED",
            imei_key=record.imei_key, svn=svn, node=node, imsi_state=state,
            imsi_enc=app.cipher.encrypt(imsi, context=imsi_context(sighting_id))
            if imsi and state == "present" else None,
            imsi_digest=hashlib.sha256(b"test:" + imsi.encode()).hexdigest() if imsi else None,
            record_id=record_id, case_ref=case_ref or record.case_ref))
        if alert:
            now = datetime.now(UTC) - timedelta(seconds=1)
            session.add(models.SightingAlert(sighting_id=sighting_id, created_at=now,
                                             state="pending", attempts=0,
                                             next_attempt_at=now))
    return sighting_id


def add_received_notice(app: App, record_id: int, *, reporter: str = "op-se",
                        country: str = "SE") -> str:
    """Our tracked device seen on another operator's network (as the pull would write it)."""
    notice_id = f"{reporter}:{uuid.uuid4().hex}"
    with app.db.write() as session:
        record = session.get(models.Record, record_id)
        assert record is not None
        session.add(models.SightingNotice(
            notice_id=notice_id, direction="received", imei_key=record.imei_key,
            owner_id=app.operator_id, reporter_id=reporter, reporter_country=country,
            seen_at=datetime.now(UTC), state="received", attempts=0, record_id=record_id))
    return notice_id
