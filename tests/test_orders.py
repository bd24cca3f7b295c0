"""Police orders through the intake service, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from imeisync.bootstrap import App
from imeisync.domain.errors import BadInput, Refused
from imeisync.domain.imei import parse_typed
from imeisync.domain.verdict import Status
from imeisync.services import audit
from imeisync.services.devices import device_view, status_from_store
from imeisync.services.orders import Actor
from imeisync.store import models
from support.fixtures_app import Police, count

IMEI = "352099001761481"
KEY = "35209900176148"
STAFF = Actor("officer-17")


def status(app: App, key: str = KEY, imsi: str | None = None) -> Status:
    with app.db.read() as session:
        return status_from_store(session, key, imsi)


def insert_foreign_record(app: App, key: str, owner: str = "op-se", country: str = "SE") -> None:
    now = datetime.now(UTC)
    with app.db.write() as session:
        session.add(models.Record(
            imei_key=key, owner_id=owner, owner_country=country, kind="block",
            reason="stolen", source="registry", opened_at=now, opened_by=f"{owner}:c1",
        ))
        session.add(models.ChangeLog(imei_key=key, subject="record", op="open", kind="block",
                                     at=now))


def test_signed_block_blacklists_the_device_and_writes_record_outbox_and_audit(
    app: App, police: Police
) -> None:
    outcome = app.intake().submit_signed(police.sign("block", IMEI), STAFF)

    assert outcome.outcome == "accepted"
    assert status(app) is Status.BLACKLISTED
    assert count(app, models.Record, models.Record.closed_at.is_(None)) == 1
    assert count(app, models.OutboxChange, models.OutboxChange.action == "insert") == 1
    assert count(app, models.ChangeLog) == 1
    with app.db.read() as session:
        order = session.execute(select(models.Order)).scalar_one()
        assert (order.outcome, order.signed_kid, order.submitted_by) == (
            "accepted", "cph-police", "officer-17")
        assert audit.verify(session).ok


def test_signed_lift_of_own_record_closes_it_and_queues_a_remove(app: App, police: Police) -> None:
    app.intake().submit_signed(police.sign("block", IMEI), STAFF)

    outcome = app.intake().submit_signed(police.sign("lift", IMEI), STAFF)

    assert outcome.outcome == "accepted"
    assert status(app) is Status.UNKNOWN
    with app.db.read() as session:
        record = session.execute(select(models.Record)).scalar_one()
        assert record.closed_at is not None and record.close_reason == "recovered"
        actions = session.execute(
            select(models.OutboxChange.action).order_by(models.OutboxChange.id)).scalars().all()
    assert actions == ["insert", "remove"]
    assert count(app, models.Record) == 1, "a lift closes the record; nothing is deleted"


def test_lift_of_a_record_owned_by_another_operator_is_refused_naming_it(
    app: App, police: Police
) -> None:
    insert_foreign_record(app, KEY, "op-se", "SE")

    with pytest.raises(Refused) as refused:
        app.intake().submit_signed(police.sign("lift", IMEI), STAFF)

    assert refused.value.code == "not_owner"
    assert "op-se (SE)" in refused.value.message
    assert "police must ask that operator" in (refused.value.hint or "")
    assert status(app) is Status.BLACKLISTED
    assert count(app, models.OutboxChange) == 0
    assert count(app, models.Order, models.Order.outcome == "refused") == 1


def test_lift_without_an_open_record_is_refused_as_nothing_to_lift(
    app: App, police: Police
) -> None:
    with pytest.raises(Refused) as refused:
        app.intake().submit_signed(police.sign("lift", IMEI), STAFF)
    assert refused.value.code == "no_record"
    assert count(app, models.Record) == 0


def test_lift_closes_only_our_record_and_a_foreign_block_keeps_the_device_blacklisted(
    app: App, police: Police
) -> None:
    insert_foreign_record(app, KEY)
    app.intake().submit_signed(police.sign("block", IMEI), STAFF)

    app.intake().submit_signed(police.sign("lift", IMEI), STAFF)

    assert status(app) is Status.BLACKLISTED
    assert count(app, models.Record, models.Record.closed_at.is_(None),
                 models.Record.owner_id == "op-se") == 1


def test_replayed_order_id_is_refused_and_changes_nothing(app: App, police: Police) -> None:
    token = police.sign("block", IMEI)
    app.intake().submit_signed(token, STAFF)

    with pytest.raises(Refused) as refused:
        app.intake().submit_signed(token, STAFF)

    assert refused.value.code == "replayed_order_id"
    assert count(app, models.OutboxChange) == 1
    assert count(app, models.Record) == 1


def test_block_of_a_device_we_already_block_is_linked_without_a_second_change(
    app: App, police: Police
) -> None:
    app.intake().submit_signed(police.sign("block", IMEI), STAFF)

    outcome = app.intake().submit_signed(police.sign("block", IMEI, case_ref="CPH-2026-200"),
                                         STAFF)

    assert outcome.outcome == "linked"
    assert "already blocked" in outcome.message and "CPH-2026-118" in outcome.message
    assert outcome.change_id is None
    assert count(app, models.OutboxChange) == 1
    assert count(app, models.Record) == 1
    with app.db.read() as session:
        linked = session.execute(
            select(models.Order).where(models.Order.outcome == "linked")).scalar_one()
        assert linked.case_ref == "CPH-2026-200" and linked.record_id is not None


def test_track_order_greylists_and_a_block_cannot_silently_replace_it(
    app: App, police: Police
) -> None:
    app.intake().submit_signed(police.sign("track", IMEI), STAFF)
    assert status(app) is Status.GREYLISTED

    with pytest.raises(Refused) as refused:
        app.intake().submit_signed(police.sign("block", IMEI), STAFF)
    assert refused.value.code == "kind_conflict"
    assert status(app) is Status.GREYLISTED


def test_unsigned_block_from_staff_is_accepted_when_policy_allows(app: App) -> None:
    outcome = app.intake().submit_unsigned(
        {"imei": "35-209900-176148-1", "case_ref": "C1", "police_unit": "U1", "reason": "lost"},
        STAFF,
    )
    assert outcome.outcome == "accepted"
    with app.db.read() as session:
        order = session.execute(select(models.Order)).scalar_one()
    assert order.signed_kid is None and order.submitted_by == "officer-17"


def test_unsigned_lift_is_refused_because_a_lift_needs_a_police_signature(app: App) -> None:
    with pytest.raises(Refused) as refused:
        app.intake().submit_unsigned(
            {"kind": "lift", "imei": IMEI, "case_ref": "C1", "police_unit": "U1",
             "reason": "recovered"}, STAFF)
    assert refused.value.code == "signature_required"


def test_unsigned_block_is_refused_when_policy_forbids_it(app: App) -> None:
    intake = app.intake()
    intake.allow_unsigned_blocks = False
    with pytest.raises(Refused, match="allow_unsigned_blocks"):
        intake.submit_unsigned(
            {"imei": IMEI, "case_ref": "C1", "police_unit": "U1", "reason": "stolen"}, STAFF)
    assert count(app, models.Record) == 0


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"issued_at": "2020-01-01T00:00:00Z"}, Refused),
        ({"issued_at": (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")},
         Refused),
        ({"issued_at": "yesterday"}, BadInput),
        ({"issued_at": "2026-11-21T10:00:00"}, BadInput),  # no time zone
        ({"issued_at": "9999-12-31T23:59:59-23:59"}, BadInput),  # past year 9999 in UTC
        ({"imei": "35209900176148"}, BadInput),
        ({"imei": "352099001761482"}, BadInput),
        ({"imei": 352099001761481}, BadInput),
        ({"reason": "recovered"}, BadInput),  # a lift reason on a block
        ({"kind": "delete"}, BadInput),
        ({"case_ref": "x" * 10_000}, BadInput),
        ({"surprise": 1}, BadInput),
    ],
)
def test_order_outside_the_schema_or_time_window_is_refused_and_no_record_is_written(
    app: App, police: Police, fields: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        app.intake().submit_signed(police.sign("block", IMEI, **fields), STAFF)
    assert count(app, models.Record) == 0
    assert count(app, models.OutboxChange) == 0


def test_order_signed_by_an_untrusted_authority_is_refused_and_logged(
    app: App, police: Police, tmp_path
) -> None:
    from imeisync.adapters.keys import generate_keypair
    from imeisync.adapters.police_jws import sign_order

    rogue, _ = generate_keypair("rogue", tmp_path / "rogue")
    token = sign_order(police.order("block", IMEI), rogue, "rogue")

    with pytest.raises(Refused) as refused:
        app.intake().submit_signed(token, STAFF)

    assert refused.value.code == "unknown_kid"
    assert count(app, models.Record) == 0
    with app.db.read() as session:
        event = session.execute(select(models.AuditEvent)).scalar_one()
    assert event.action == "order.refused" and json.loads(event.detail)["code"] == "unknown_kid"


def test_note_is_stored_encrypted_and_shown_to_the_owner(app: App, police: Police) -> None:
    app.intake().submit_signed(police.sign("block", IMEI, note="owner: Jens, +45 1234"), STAFF)

    with app.db.read() as session:
        stored = session.execute(select(models.Record.note_enc)).scalar_one()
        view = device_view(session, parse_typed(IMEI), "op-dk", cipher=lambda: app.cipher)
    assert stored is not None and "Jens" not in stored
    assert view.records[0].note == "owner: Jens, +45 1234"


def test_device_view_shows_foreign_records_without_case_details(
    app: App, police: Police
) -> None:
    insert_foreign_record(app, KEY)
    app.intake().submit_signed(police.sign("block", IMEI), STAFF)

    with app.db.read() as session:
        view = device_view(session, parse_typed(IMEI), "op-dk")

    foreign = next(r for r in view.records if not r.own)
    own = next(r for r in view.records if r.own)
    assert foreign.case_ref is None and foreign.orders == []
    assert own.case_ref == "CPH-2026-118" and own.orders[0]["signed_by"] == "cph-police"
    assert "op-se (SE)" in view.next_step


def test_audit_chain_verifies_and_names_an_edited_event(app: App, police: Police) -> None:
    for imei in (IMEI, "490154203237518", "354178036859789"):
        app.intake().submit_signed(police.sign("block", imei), STAFF)
    with app.db.read() as session:
        assert audit.verify(session).events == 3

    with app.db.write() as session:
        event = session.get(models.AuditEvent, 2)
        assert event is not None
        event.actor = "someone-else"

    with app.db.read() as session:
        result = audit.verify(session)
    assert not result.ok and result.broken_id == 2


def test_audit_chain_names_a_deleted_event_and_a_truncated_tail(app: App, police: Police) -> None:
    for imei in (IMEI, "490154203237518", "354178036859789"):
        app.intake().submit_signed(police.sign("block", imei), STAFF)

    with app.db.write() as session:
        session.delete(session.get(models.AuditEvent, 3))
    with app.db.read() as session:
        tail = audit.verify(session)
    assert not tail.ok and tail.broken_id == 3

    with app.db.write() as session:
        session.delete(session.get(models.AuditEvent, 1))
    with app.db.read() as session:
        middle = audit.verify(session)
    assert not middle.ok and middle.broken_id == 2
