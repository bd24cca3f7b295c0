"""IMEI+IMSI exceptions: the service and ``imeisync exception add|remove|list``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from imeisync.bootstrap import App
from imeisync.domain.errors import BadInput, Refused
from imeisync.domain.verdict import Status
from imeisync.services import audit
from imeisync.services import exceptions as service
from imeisync.services.devices import status_from_store
from imeisync.services.orders import Actor
from imeisync.store import models
from support.eir_harness import imeisync
from support.fixtures_app import count

IMEI, KEY, IMSI = "352099001761481", "35209900176148", "238010000000001"
STAFF = Actor("officer-17")


def test_added_exception_whitelists_only_that_imsi_and_is_audited_and_logged(app: App) -> None:
    app.intake().submit_unsigned(
        {"imei": IMEI, "case_ref": "CPH-1", "police_unit": "CPH", "reason": "stolen"}, STAFF)

    view, blocked = service.add(app.db, imei="35-209900-176148-1", imsi=f"imsi-{IMSI}",
                                case_ref="CPH-9", actor=STAFF)

    assert blocked and (view.imei_key, view.imsi, view.case_ref) == (KEY, IMSI, "CPH-9")
    with app.db.read() as session:
        assert status_from_store(session, KEY, IMSI) is Status.WHITELISTED
        assert status_from_store(session, KEY, "238010000000002") is Status.BLACKLISTED
        changes = session.execute(select(models.ChangeLog.subject, models.ChangeLog.op)
                                  .order_by(models.ChangeLog.seq)).all()
        event = session.execute(select(models.AuditEvent)
                                .order_by(models.AuditEvent.id.desc())).scalars().first()
        assert audit.verify(session).ok
    assert [tuple(c) for c in changes] == [("record", "open"), ("exception", "open")]
    assert event.action == "exception.added" and event.case_ref == "CPH-9"
    assert IMSI not in event.detail, "the audit trail names the exception, not the IMSI"


def test_removed_exception_blocks_again_and_history_is_kept(app: App) -> None:
    service.add(app.db, imei=IMEI, imsi=IMSI, case_ref="CPH-9", actor=STAFF)

    service.remove(app.db, imei=IMEI, imsi=IMSI, actor=STAFF)

    assert service.list_(app.db) == []
    [old] = service.list_(app.db, include_removed=True)
    assert old.removed_by == "officer-17"
    assert count(app, models.ChangeLog, models.ChangeLog.subject == "exception") == 2


def test_second_add_of_the_same_pair_is_refused(app: App) -> None:
    service.add(app.db, imei=IMEI, imsi=IMSI, case_ref="CPH-9", actor=STAFF)

    with pytest.raises(Refused, match="already has an exception"):
        service.add(app.db, imei=IMEI, imsi=IMSI, case_ref="CPH-10", actor=STAFF)
    assert count(app, models.AttachException) == 1


def test_remove_of_a_missing_exception_is_refused_and_changes_nothing(app: App) -> None:
    with pytest.raises(Refused, match="no active exception") as refused:
        service.remove(app.db, imei=IMEI, imsi=IMSI, actor=STAFF)

    assert refused.value.code == "no_exception" and "exception list" in str(refused.value)
    assert count(app, models.ChangeLog) == 0 and count(app, models.AuditEvent) == 0


@pytest.mark.parametrize(("imei", "imsi"), [
    ("352099001761480", IMSI),  # wrong check digit: a person typed it
    ("35209900176148", IMSI),  # 14 digits
    (IMEI, "1234"),  # too short
    (IMEI, "1234567890123456"),  # too long
    (IMEI, "23801abc"),
])
def test_add_refuses_a_mistyped_imei_or_imsi(app: App, imei: str, imsi: str) -> None:
    with pytest.raises(BadInput):
        service.add(app.db, imei=imei, imsi=imsi, case_ref="CPH-9", actor=STAFF)
    assert count(app, models.AttachException) == 0


def test_cli_adds_lists_and_removes_with_the_contract_exit_codes(
    operator_config: Path, app: App
) -> None:
    added = imeisync(operator_config, "exception", "add", "--imei", IMEI, "--imsi", IMSI,
                     "--case", "CPH-9", "--as", "officer-3")
    assert "IMSI 238010000000001 may use IMEI 35-209900-176148-1" in added.stdout
    assert "not blocked now" in added.stdout

    listed = imeisync(operator_config, "--json", "exception", "list")
    assert [(e["imei_key"], e["imsi"], e["created_by"]) for e in json.loads(listed.stdout)] == [
        (KEY, IMSI, "officer-3")]

    assert imeisync(operator_config, "exception", "remove", "--imei", IMEI,
                    "--imsi", IMSI).returncode == 0
    again = imeisync(operator_config, "exception", "remove", "--imei", IMEI, "--imsi", IMSI,
                     check=False)
    assert again.returncode == 1 and "no active exception" in again.stderr
    bad = imeisync(operator_config, "exception", "add", "--imei", "352099001761480",
                   "--imsi", IMSI, "--case", "X", check=False)
    assert bad.returncode == 2 and "check digit" in bad.stderr
