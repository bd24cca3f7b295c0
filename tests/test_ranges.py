"""Range orders (a stolen shipment in one order): intake rules, the store's verdict, the index."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from imeisync.adapters.attach_index import IndexKeeper
from imeisync.bootstrap import App
from imeisync.domain.errors import BadInput, Refused
from imeisync.domain.imei import Imei, key_to_int, parse_typed
from imeisync.domain.verdict import Status
from imeisync.services.devices import device_view
from imeisync.services.orders import Actor
from imeisync.store import models
from support.fixtures_app import Police, count
from test_orders import insert_foreign_record, status

STAFF = Actor("officer-17")
TAC = "35209900"


def imei(serial: int, tac: str = TAC) -> str:
    """The 15-digit IMEI of ``tac`` + ``serial``, with its check digit."""
    return Imei(f"{tac}{serial:06d}").full


def key(serial: int, tac: str = TAC) -> str:
    return f"{tac}{serial:06d}"


def test_range_block_blacklists_every_device_inside_and_none_outside(
    app: App, police: Police
) -> None:
    outcome = app.intake().submit_signed(police.sign_range("block", imei(100), imei(199)), STAFF)

    assert outcome.outcome == "accepted" and outcome.imei_last == imei(199)
    assert "100 devices" in outcome.message
    assert [status(app, key(s)) for s in (100, 150, 199)] == [Status.BLACKLISTED] * 3
    assert [status(app, key(s)) for s in (99, 200)] == [Status.UNKNOWN] * 2
    assert count(app, models.Record) == 1, "a range is one record, not one per device"
    with app.db.read() as session:
        change = session.execute(select(models.OutboxChange)).scalar_one()
        assert (change.imei_key, change.imei_key_last) == (key(100), key(199))


def test_single_lift_inside_own_range_is_refused_naming_the_range_and_its_order(
    app: App, police: Police
) -> None:
    token = police.sign_range("block", imei(100), imei(199))
    block = app.intake().submit_signed(token, STAFF)

    with pytest.raises(Refused) as refused:
        app.intake().submit_signed(police.sign("lift", imei(150)), STAFF)

    assert refused.value.code == "inside_range"
    assert block.order_id in refused.value.message
    assert "35-209900-000100" in refused.value.message
    assert status(app, key(150)) is Status.BLACKLISTED
    assert count(app, models.Record, models.Record.closed_at.is_not(None)) == 0


def test_range_lift_clears_every_device_and_queues_one_remove(app: App, police: Police) -> None:
    app.intake().submit_signed(police.sign_range("block", imei(100), imei(199)), STAFF)

    outcome = app.intake().submit_signed(police.sign_range("lift", imei(100), imei(199)), STAFF)

    assert outcome.outcome == "accepted"
    assert [status(app, key(s)) for s in (100, 150, 199)] == [Status.UNKNOWN] * 3
    with app.db.read() as session:
        outbox = models.OutboxChange
        actions = session.execute(select(outbox.action, outbox.imei_key_last)
                                  .order_by(outbox.id)).all()
    assert [tuple(a) for a in actions] == [("insert", key(199)), ("remove", key(199))]


def test_lift_of_part_of_a_range_is_refused_and_nothing_changes(app: App, police: Police) -> None:
    app.intake().submit_signed(police.sign_range("block", imei(100), imei(199)), STAFF)

    with pytest.raises(Refused) as refused:
        app.intake().submit_signed(police.sign_range("lift", imei(100), imei(150)), STAFF)

    assert refused.value.code == "inside_range"
    assert status(app, key(120)) is Status.BLACKLISTED
    assert count(app, models.OutboxChange) == 1


def test_overlapping_own_range_is_refused_naming_the_open_one(app: App, police: Police) -> None:
    first = app.intake().submit_signed(police.sign_range("block", imei(100), imei(199)), STAFF)

    with pytest.raises(Refused) as refused:
        app.intake().submit_signed(police.sign_range("block", imei(150), imei(250)), STAFF)

    assert refused.value.code == "range_overlap" and first.order_id in refused.value.message
    assert count(app, models.Record) == 1


def test_range_over_own_single_record_is_refused(app: App, police: Police) -> None:
    app.intake().submit_signed(police.sign("block", imei(150)), STAFF)

    with pytest.raises(Refused) as refused:
        app.intake().submit_signed(police.sign_range("block", imei(100), imei(199)), STAFF)

    assert refused.value.code == "range_overlap"
    assert count(app, models.Record) == 1


def test_overlapping_range_of_another_owner_is_fine_and_either_blocks(
    app: App, police: Police
) -> None:
    insert_foreign_record(app, key(150), "op-se", "SE")

    app.intake().submit_signed(police.sign_range("block", imei(100), imei(199)), STAFF)
    with pytest.raises(Refused) as refused:
        app.intake().submit_signed(police.sign("lift", imei(150)), STAFF)
    app.intake().submit_signed(police.sign_range("lift", imei(100), imei(199)), STAFF)

    assert refused.value.code == "inside_range"
    assert status(app, key(150)) is Status.BLACKLISTED, "op-se's record still stands"
    assert status(app, key(151)) is Status.UNKNOWN


def test_single_block_inside_own_range_links_to_the_range(app: App, police: Police) -> None:
    block = app.intake().submit_signed(police.sign_range("block", imei(100), imei(199)), STAFF)

    outcome = app.intake().submit_signed(police.sign("block", imei(150)), STAFF)

    assert outcome.outcome == "linked" and outcome.record_id == block.record_id
    assert block.order_id in outcome.message
    assert count(app, models.Record) == 1


def test_device_view_shows_the_range_over_the_device(app: App, police: Police) -> None:
    app.intake().submit_signed(police.sign_range("track", imei(100), imei(199)), STAFF)

    with app.db.read() as session:
        view = device_view(session, parse_typed(imei(150)), "op-dk")

    assert view.status is Status.GREYLISTED
    assert [(r.imei_first, r.imei_last) for r in view.records] == [
        ("35-209900-000100-" + imei(100)[-1], "35-209900-000199-" + imei(199)[-1])]


@pytest.mark.parametrize(("first", "last", "code", "words"), [
    (imei(200), imei(100), "malformed_range", "comes after"),
    (imei(100), imei(100, "35417803"), "malformed_range", "different TACs"),
    (imei(100)[:-1] + str((int(imei(100)[-1]) + 1) % 10), imei(199), "malformed_range",
     "check digit"),
    (imei(0), Imei("35209910000000").full, "malformed_range", "different TACs"),
])
def test_malformed_range_is_bad_input_and_writes_nothing(
    app: App, police: Police, first: str, last: str, code: str, words: str
) -> None:
    with pytest.raises(BadInput) as bad:
        app.intake().submit_signed(police.sign_range("block", first, last), STAFF)

    assert bad.value.code == code and words in bad.value.message
    assert count(app, models.Record) == count(app, models.Order) == 0


def test_range_larger_than_max_range_is_refused(app: App, police: Police) -> None:
    with pytest.raises(BadInput) as bad:  # 10^6 devices: a whole TAC, over the 100,000 default
        app.intake().submit_signed(police.sign_range("block", imei(0), imei(999_999)), STAFF)

    assert bad.value.code == "range_too_large" and "100000" in bad.value.message
    assert count(app, models.Record) == 0


def test_order_with_both_imei_and_range_is_malformed(app: App, police: Police) -> None:
    from imeisync.adapters.police_jws import sign_order

    payload = police.order("block", imei(100), imei_range={"first": imei(100), "last": imei(101)})
    with pytest.raises(BadInput) as bad:
        app.intake().submit_signed(sign_order(payload, police.key, police.kid), STAFF)

    assert "exactly one of" in bad.value.message


def test_index_follows_range_opens_and_closes_next_to_singles(
    app: App, police: Police, tmp_path: Path
) -> None:
    insert_foreign_record(app, key(150), "op-se", "SE")
    keeper = IndexKeeper(app.config.database_url, tmp_path / "idx.bin").start(follow=False)
    try:
        index = keeper.index
        assert index is not None
        app.intake().submit_signed(police.sign_range("block", imei(100), imei(199)), STAFF)
        app.intake().submit_signed(police.sign_range("track", imei(300), imei(310)), STAFF)
        keeper.poll()
        assert index.lookup(key_to_int(key(100))) is Status.BLACKLISTED
        assert index.lookup(key_to_int(key(199))) is Status.BLACKLISTED
        assert index.lookup(key_to_int(key(305))) is Status.GREYLISTED
        assert index.lookup(key_to_int(key(200))) is Status.UNKNOWN

        app.intake().submit_signed(police.sign_range("lift", imei(100), imei(199)), STAFF)
        keeper.poll()
        assert index.lookup(key_to_int(key(150))) is Status.BLACKLISTED, "op-se's single stays"
        assert index.lookup(key_to_int(key(151))) is Status.UNKNOWN
        assert index.lookup(key_to_int(key(305))) is Status.GREYLISTED
    finally:
        keeper.stop(persist=True)
    rebuilt = IndexKeeper(app.config.database_url, None).start(follow=False)
    try:
        assert rebuilt.index is not None
        got = [rebuilt.index.lookup(key_to_int(key(s))) for s in (150, 151, 300, 310, 311)]
        assert got == [Status.BLACKLISTED, Status.UNKNOWN, Status.GREYLISTED,
                       Status.GREYLISTED, Status.UNKNOWN]
    finally:
        rebuilt.stop(persist=False)


def test_closing_a_single_under_an_open_range_keeps_the_device_blocked_in_the_index(
    app: App, police: Police, tmp_path: Path
) -> None:
    app.intake().submit_signed(police.sign("block", imei(150)), STAFF)
    insert_foreign_record(app, key(100), "op-se", "SE")
    keeper = IndexKeeper(app.config.database_url, None).start(follow=False)
    try:
        # op-se's shipment over our single
        from datetime import UTC, datetime
        now = datetime.now(UTC)
        with app.db.write() as session:
            session.add(models.Record(
                imei_key=key(140), imei_key_last=key(160), owner_id="op-no", owner_country="NO",
                kind="block", reason="stolen", source="registry", opened_at=now,
                opened_by="op-no:r1"))
            session.add(models.ChangeLog(imei_key=key(140), imei_key_last=key(160),
                                         subject="record", op="open", kind="block", at=now))
        app.intake().submit_signed(police.sign("lift", imei(150)), STAFF)
        keeper.poll()
        assert keeper.index is not None
        assert keeper.index.lookup(key_to_int(key(150))) is Status.BLACKLISTED
        assert keeper.index.lookup(key_to_int(key(161))) is Status.UNKNOWN
    finally:
        keeper.stop(persist=False)


def test_the_console_blocks_a_shipment_with_one_form_and_names_a_bad_last_imei(app: App) -> None:
    from support.fixtures_api import make_api

    api = make_api(app)
    with api.client:
        csrf = api.sign_in("liaison")
        form = {"csrf": csrf, "imei": imei(100), "imei_last": imei(199), "case_ref": "truck-7",
                "police_unit": "U", "reason": "stolen", "note": ""}
        done = api.client.post("/block", data=form, follow_redirects=False)
        assert done.status_code == 303, done.text
        assert [status(app, key(s)) for s in (100, 199, 200)] == [
            Status.BLACKLISTED, Status.BLACKLISTED, Status.UNKNOWN]
        page = api.client.post("/block", data={**form, "imei": imei(300),
                                               "imei_last": imei(200)})
        assert page.status_code == 400 and "comes after" in page.text
        assert 'id="imei_last-error"' in page.text
    assert count(app, models.Record) == 1
