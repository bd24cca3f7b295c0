"""Every order's journey on the operator's side, against the real registry code (in-process,
real signatures): acks after a committed pull, receipts polled and stored, order progress to
"applied everywhere", the overdue-lift alert, a lift that overtakes its unsent block. Three
operators; B's store runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from imeisync.domain.imei import luhn_check_digit
from imeisync.services.liaison import Caller
from imeisync.services.orders import Actor
from imeisync.store import sync_state
from imeisync.store.models import ChangeReceipt, OutboxChange
from support.registry_lab import InProcessRegistry, Operator

STAFF = Actor("liaison-1")
DESK = Caller("liaison-1", "liaison")


def imei(n: int) -> str:
    key = f"35209900{n:06d}"
    return key + luhn_check_digit(key)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[InProcessRegistry]:
    reg = InProcessRegistry(tmp_path / "lab", [("op-a", "DK"), ("op-b", "SE"), ("op-c", "NO")],
                            f"sqlite:///{tmp_path / 'registry.db'}")
    yield reg
    reg.close()


@pytest.fixture
def ops(world: InProcessRegistry, tmp_path: Path, database_url: str
        ) -> dict[str, Operator]:
    return {"a": world.operator("op-a", f"sqlite:///{tmp_path / 'a.db'}"),
            "b": world.operator("op-b", database_url),
            "c": world.operator("op-c", f"sqlite:///{tmp_path / 'c.db'}")}


def block(op: Operator, n: int) -> str:
    outcome = op.app.intake().submit_unsigned(
        {"imei": imei(n), "case_ref": f"CASE-{n}", "police_unit": "Unit 1", "reason": "stolen"},
        STAFF)
    return outcome.order_id


def lift(world: InProcessRegistry, op: Operator, n: int) -> str:
    token = world.lab.police_order("lift", imei(n))
    return op.app.intake().submit_signed(token, STAFF).order_id


def progress(op: Operator, order_id: str) -> dict:
    return op.app.desk().order(DESK, order_id)


def test_block_progresses_to_applied_by_n_of_m_then_everywhere(world, ops):
    a, b, c = ops["a"], ops["b"], ops["c"]
    order_id = block(a, 1)
    a.app.sync().push()
    a.app.sync().pull()
    assert progress(a, order_id)["state"] == "confirmed"
    b.app.sync().pull()  # applied and acknowledged by B only
    a.app.sync().receipts()
    view = progress(a, order_id)
    assert view["state"] == "applied"
    receipt = view["registry"]["receipt"]
    assert (receipt["applied"], receipt["of"]) == (1, 2)
    assert [m["member"] for m in receipt["applied_by"]] == ["op-b"]
    missing = receipt["missing"]
    assert [(m["member"], m["country"]) for m in missing] == [("op-c", "NO")]
    assert missing[0]["behind_since"] and "op-c (NO) behind since" in view["next_step"]
    c.app.sync().pull()
    result = a.app.sync().receipts()
    assert (result.fetched, result.completed) == (1, 1)
    view = progress(a, order_id)
    assert view["state"] == "applied_everywhere"
    assert [s["step"] for s in view["steps"]] == ["accepted", "sent", "confirmed", "applied",
                                                  "applied_everywhere"]
    assert all(s["done"] for s in view["steps"])
    # a complete receipt is not asked for again
    assert a.app.sync().receipts().fetched == 0


def test_pull_acknowledges_only_the_committed_position_and_only_when_it_moved(world, ops):
    a, b = ops["a"], ops["b"]
    block(a, 2)
    a.app.sync().push()
    first = b.app.sync().pull()
    with b.app.db.read() as s:
        state = sync_state.read(s)
    assert first.acked == state.cursor == state.number(sync_state.ACKED) == first.cursor
    assert b.app.sync().pull().acked is None  # nothing new: no request
    from imeisync.registry.models import MemberAck

    with world.app.db.read() as s:
        assert s.execute(select(MemberAck.applied_through).where(
            MemberAck.member_id == "op-b")).scalar_one() == first.cursor


def test_a_lift_not_applied_everywhere_by_the_deadline_is_an_alert(world, ops, caplog):
    a, b = ops["a"], ops["b"]
    block(a, 3)
    a.app.sync().push()
    b.app.sync().pull()
    ops["c"].app.sync().pull()
    order_id = lift(world, a, 3)
    a.app.sync().push()
    b.app.sync().pull()  # C stays behind
    later = datetime.now(UTC) + timedelta(hours=3)
    sync = a.app.sync()
    sync.clock = lambda: later
    result = sync.receipts()
    assert [o["order_id"] for o in result.overdue] == [order_id]
    assert [m["member"] for m in result.overdue[0]["missing"]] == ["op-c"]
    assert "receipt.overdue" in caplog.text and "op-c (NO)" in caplog.text
    status = a.app.sync().status()
    assert [o["order_id"] for o in status["overdue_lifts"]] == [order_id]
    ops["c"].app.sync().pull()
    assert sync.receipts().overdue == []
    assert progress(a, order_id)["state"] == "applied_everywhere"


def test_receipts_are_stored_verbatim_as_the_registry_signed_them(world, ops):
    a = ops["a"]
    block(a, 4)
    a.app.sync().push()
    a.app.sync().receipts()
    from imeisync.adapters.signed_documents import RECEIPT_TYP, verify_document

    with a.app.db.read() as s:
        row = s.execute(select(ChangeReceipt)).scalar_one()
    payload = verify_document(row.jws, world.registry_public, RECEIPT_TYP, "receipt")
    assert payload["recipients"] == json.loads(row.recipients)
    assert payload["owner"] == "op-a" and payload["complete"] is False


def test_a_lift_overtaking_its_unsent_block_withdraws_both_and_nothing_leaves(world, ops):
    a = ops["a"]
    block_id = block(a, 5)
    lift_id = lift(world, a, 5)
    assert a.app.sync().push().sent == 0
    with a.app.db.read() as s:
        states = s.execute(select(OutboxChange.state).order_by(OutboxChange.id)).scalars().all()
    assert states == ["cancelled", "cancelled"]
    for order_id in (block_id, lift_id):
        view = progress(a, order_id)
        assert view["state"] == "withdrawn"
        assert "withdrawn before it left this operator" in view["next_step"].lower()
    assert world.app.registry.feed(world.config.members["op-b"], 0, 10)["entries"] == []


def test_a_lift_racing_a_block_in_flight_is_sent_after_it(world, ops):
    a, b = ops["a"], ops["b"]
    block(a, 6)
    from imeisync.services.sync import push as push_module

    push_module._claim(a.app.sync(), 10)  # the block is claimed (sent), its answer not yet in
    lift(world, a, 6)
    with a.app.db.read() as s:
        states = s.execute(select(OutboxChange.action, OutboxChange.state)
                           .order_by(OutboxChange.id)).all()
    assert [tuple(r) for r in states] == [("insert", "sent"), ("remove", "pending")]
    result = a.app.sync().push()
    assert (result.accepted, result.rejected) == (2, 0)  # no 0003: the remove came second
    b.app.sync().pull()
    with b.app.db.read() as s:
        from imeisync.services.devices import status_from_store

        assert str(status_from_store(s, imei(6)[:14])) == "UNKNOWN"  # opened, then closed


def test_cli_status_receipt_download_and_offline_verification(world, ops, tmp_path):
    a, b, c = ops["a"], ops["b"], ops["c"]
    order_id = block(a, 7)
    a.app.sync().push()
    b.app.sync().pull()
    a.app.sync().receipts()
    out = tmp_path / "receipt.jws"
    shown = a.cli("order", "status", order_id)
    assert "applied 1 of 2" in shown.stdout and "missing op-c (NO)" in shown.stdout
    early = a.cli("order", "receipt", order_id, "--out", str(out), check=False)
    assert early.returncode == 1 and "1 of 2" in early.stderr and not out.exists()
    c.app.sync().pull()
    a.app.sync().receipts()
    a.cli("order", "receipt", order_id, "--out", str(out))
    data = json.loads(a.cli("--json", "order", "status", order_id).stdout)
    assert data["state"] == "applied_everywhere"
    shown = a.cli("show", imei(7)).stdout
    assert "progress: applied_everywhere, applied by 2 of 2" in shown
    # offline: only the registry's public key is needed, from any operator's config
    checked = b.cli("receipt", "verify", str(out))
    assert "valid" in checked.stdout and "applied everywhere" in checked.stdout
    token = out.read_text().strip()
    head, payload, signature = token.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    (tmp_path / "altered.jws").write_text(f"{head}.{payload}.{flipped}")
    (tmp_path / "cut.jws").write_text(token[: len(token) // 2])
    altered = b.cli("receipt", "verify", str(tmp_path / "altered.jws"), check=False)
    cut = b.cli("receipt", "verify", str(tmp_path / "cut.jws"), check=False)
    missing = b.cli("receipt", "verify", str(tmp_path / "nothing.jws"), check=False)
    assert (altered.returncode, cut.returncode, missing.returncode) == (1, 2, 2)
    assert "does not verify" in altered.stderr and "Traceback" not in altered.stderr + cut.stderr


def test_cli_notice_apply_refuses_bad_files_with_one_line(world, ops, tmp_path):
    b = ops["b"]
    (tmp_path / "junk.jws").write_text("not a notice")
    junk = b.cli("notice", "apply", str(tmp_path / "junk.jws"), check=False)
    assert junk.returncode == 2 and "Traceback" not in junk.stderr
    assert len(junk.stderr.strip().splitlines()) <= 2
    unknown = b.cli("order", "status", "NO-SUCH-ORDER", check=False)
    assert unknown.returncode == 1 and "no order" in unknown.stderr


def test_console_and_api_show_the_journey_offer_the_receipt_and_list_overdue_lifts(world, ops):
    from support.fixtures_api import make_api

    a, b, c = ops["a"], ops["b"], ops["c"]
    block(a, 8)
    a.app.sync().push()
    b.app.sync().pull()
    c.app.sync().pull()
    order_id = lift(world, a, 8)
    a.app.sync().push()
    b.app.sync().pull()
    sync = a.app.sync()
    moment = datetime.now(UTC) + timedelta(hours=3)
    sync.clock = lambda: moment
    sync.receipts()
    api = make_api(a.app)
    with api.client:
        view = api.client.get(f"/api/v1/orders/{order_id}", headers=api.headers("liaison"))
        assert view.json()["state"] == "applied"
        api.sign_in("liaison")
        home = api.client.get("/").text
        assert "not applied by every operator in time" in home and order_id in home
        page = api.client.get(f"/orders/{order_id}").text
        assert "Not yet applied by op-c (NO)" in page and "Download" not in page
        assert api.client.get(f"/receipts/{order_id}").status_code == 422
        c.app.sync().pull()
        sync.receipts()
        assert "not applied by every operator in time" not in api.client.get("/").text
        page = api.client.get(f"/orders/{order_id}").text
        assert "Applied everywhere" in page and f"/receipts/{order_id}" in page
        download = api.client.get(f"/receipts/{order_id}")
        assert download.status_code == 200
        assert download.headers["content-type"].startswith("application/jose")
        with a.app.db.read() as s:
            assert download.text.strip() == s.execute(select(ChangeReceipt.jws).join(
                OutboxChange, OutboxChange.change_id == ChangeReceipt.change_id).where(
                OutboxChange.order_id == order_id)).scalar_one()


def test_receipts_are_followed_for_thirty_days_then_the_last_one_stands(world, ops):
    a = ops["a"]
    block(a, 9)
    a.app.sync().push()
    sync = a.app.sync()
    moment = datetime.now(UTC) + timedelta(days=31)
    sync.clock = lambda: moment
    assert sync.receipts().fetched == 0
    assert a.app.sync().receipts().fetched == 1
