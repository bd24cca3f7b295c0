"""End to end on loopback: the real registry server (``imeisync registry serve``, Granian) and
two operators, A (Denmark) and B (Sweden), each with its own database and keys.

A theft report at A blocks the phone at B; B cannot lift A's record, locally or by forging a
remove at the registry; B's dispute reaches A, A's police-ordered lift reaches B; a device both
block stays blocked until both lift; a registry killed in the middle of a push loses nothing and
duplicates nothing. In the first, operator B runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from imeisync.domain.errors import Refused, Unavailable
from imeisync.domain.imei import luhn_check_digit
from imeisync.domain.orders import parse_order
from imeisync.services.devices import status_from_store
from imeisync.services.orders import Actor
from support.registry_lab import Lab, Operator

ALICE = Actor("alice")  # liaison staff at A
BOB = Actor("bob")  # liaison staff at B


def imei(n: int) -> str:
    key = f"86{n:012d}"
    return key + luhn_check_digit(key)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab", [("op-a", "DK"), ("op-b", "SE")])
    lab.start()
    yield lab
    lab.close()


@pytest.fixture
def a(lab: Lab) -> Operator:
    return lab.operator("op-a")


@pytest.fixture
def b(lab: Lab, database_url: str) -> Operator:
    return lab.operator("op-b", database_url)


def verdict(op: Operator, number: str) -> str:
    with op.app.db.read() as s:
        return str(status_from_store(s, number[:14]))


def block(op: Operator, number: str, actor: Actor) -> None:
    op.app.intake().submit_unsigned({"imei": number, "case_ref": f"{op.id}-case",
                                     "police_unit": "Unit 7", "reason": "stolen"}, actor)


def police_lift(lab: Lab, op: Operator, number: str, actor: Actor) -> None:
    op.app.intake().submit_signed(lab.police_order("lift", number), actor)


def registry_rows(lab: Lab, query: str) -> list[tuple]:
    with sqlite3.connect(f"file:{lab.root / 'registry.db'}?mode=ro", uri=True) as conn:
        return conn.execute(query).fetchall()


def test_a_theft_report_at_a_travels_to_b_and_only_a_police_lift_at_a_undoes_it(lab, a, b):
    phone = imei(1)
    # A blocks → A pushes → B pulls → B's attach check says BLACKLISTED
    block(a, phone, ALICE)
    assert a.app.sync().push().accepted == 1
    assert b.app.sync().pull().opened == 1
    assert b.cli("check", phone).stdout.strip() == "BLACKLISTED"

    # B's lift of A's record is refused locally, naming the owner
    with pytest.raises(Refused, match=r"op-a \(DK\)") as refused:
        police_lift(lab, b, phone, BOB)
    assert refused.value.code == "not_owner"

    # a remove forged by B and sent straight to the registry gets 0002
    client = b.app.registry_client()
    forged = {"change_id": "op-b:forged-1", "action": "remove", "imei": phone[:14],
              "reason": "recovered", "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    result = client.push([forged])[0]
    client.close()
    assert (result["result"], result["code"]) == ("rejected", "0002")
    b.app.sync().pull()
    assert verdict(b, phone) == "BLACKLISTED"

    # B files a dispute → A sees it → A lifts with a police order → B whitelisted after a pull
    filed = b.app.disputes().file(phone, "SE-2026-0451", "bought second-hand with a receipt; "
                                  "the police confirm the phone is not the stolen one", BOB)
    assert filed["owner"] == "op-a"
    assert a.app.sync().pull().disputes == 1
    received = a.app.disputes().list(direction="received", state="open")
    assert [(d["dispute_id"], d["filer"], d["case_ref"]) for d in received] == [
        (filed["dispute_id"], "op-b", "SE-2026-0451")]
    police_lift(lab, a, phone, ALICE)
    assert a.app.sync().push().accepted == 1
    pulled = b.app.sync().pull()
    assert (pulled.closed, pulled.answers) == (1, 1)
    assert b.cli("check", phone).stdout.strip() == "WHITELISTED"
    assert b.app.disputes().list(direction="filed")[0]["state"] == "lifted"
    a.app.sync().pull()
    assert a.app.disputes().list(direction="received")[0]["state"] == "lifted"
    assert a.app.sync().status()["unconfirmed"] == 0  # both of A's changes came back


def test_a_device_both_block_stays_blocked_until_both_lift(lab, a):
    b = lab.operator("op-b")
    phone = imei(2)
    block(a, phone, ALICE)
    block(b, phone, BOB)
    for op in (a, b):
        op.app.sync().push()
    for op in (a, b):
        op.app.sync().pull()
    police_lift(lab, a, phone, ALICE)
    a.app.sync().push()
    b.app.sync().pull()
    assert verdict(b, phone) == "BLACKLISTED"  # B's own record stands
    assert verdict(a, phone) == "BLACKLISTED"  # and A knows B's
    police_lift(lab, b, phone, BOB)
    b.app.sync().push()
    a.app.sync().pull()
    b.app.sync().pull()
    assert verdict(a, phone) == verdict(b, phone) == "UNKNOWN"
    assert a.cli("check", phone).stdout.strip() == "WHITELISTED"


def test_a_registry_killed_mid_push_loses_nothing_and_duplicates_nothing(lab, a):
    b = lab.operator("op-b")
    count = 2000
    now = datetime.now(UTC)
    orders = [parse_order({
        "order_id": f"bulk-{i}", "kind": "block", "imei": imei(1000 + i),
        "case_ref": f"BULK-{i}", "police_unit": "Unit 7", "reason": "stolen",
        "issued_at": (now - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }, now=now, max_age=timedelta(days=1)) for i in range(count)]
    a.app.intake().apply(orders, ALICE)

    service = a.app.sync()
    real_push = service.client.push

    def slow_push(changes):  # room for the kill to land between and inside batches
        time.sleep(0.1)
        return real_push(changes)

    service.client.push = slow_push  # type: ignore[method-assign]
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(service.push(batch_size=400))
        except BaseException as exc:
            outcome.append(exc)

    pusher = threading.Thread(target=run)
    pusher.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = registry_rows(lab, "SELECT count(*) FROM registry_submissions")[0][0]
        if done >= 800:
            break
        time.sleep(0.01)
    lab.stop(signal.SIGKILL)  # no goodbye: mid-request or between batches
    pusher.join(timeout=60)
    assert isinstance(outcome[0], Unavailable), outcome
    service.close()

    lab.start()
    result = a.app.sync().push()
    assert result.rejected == 0
    with a.app.db.read() as s:
        from sqlalchemy import func, select

        from imeisync.store.models import OutboxChange

        states = dict(s.execute(select(OutboxChange.state, func.count())
                                .group_by(OutboxChange.state)).all())
    assert set(states) <= {"accepted", "duplicate"} and sum(states.values()) == count
    feed = registry_rows(lab, "SELECT count(*), count(DISTINCT change_id) FROM registry_feed "
                              "WHERE type = 'change' AND owner_id = 'op-a'")[0]
    assert feed == (count, count)
    assert registry_rows(lab, "SELECT count(*) FROM registry_records "
                              "WHERE closed_seq IS NULL")[0][0] == count
    pulled = b.app.sync().pull()
    assert pulled.opened == count
    assert verdict(b, imei(1000)) == verdict(b, imei(1000 + count - 1)) == "BLACKLISTED"
