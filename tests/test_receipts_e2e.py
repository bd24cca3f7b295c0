"""End to end on loopback: the real registry server (``imeisync registry serve``) and three
operators — A (Denmark, SQLite), B (Sweden, PostgreSQL), C (Norway, SQLite).

Block at A → applied by B and C → receipt complete and verifiable offline; C stopped → "1 of
2, C behind since …" and the alert after the deadline; C back → complete. Lift during a registry
outage → a notice applied at B → B's attach index no longer blacklists the device within a
second → the registry back → nothing reopened, nothing duplicated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from imeisync.adapters.attach_index import IndexKeeper
from imeisync.domain.errors import Unavailable
from imeisync.domain.imei import key_to_int, luhn_check_digit
from imeisync.services.devices import status_from_store
from imeisync.services.orders import Actor
from imeisync.store.models import LiftNotice, Record
from support.registry_lab import Lab, Operator

ALICE = Actor("alice")


def imei(n: int) -> str:
    key = f"86{n:012d}"
    return key + luhn_check_digit(key)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab", [("op-a", "DK"), ("op-b", "SE"), ("op-c", "NO")])
    lab.start()
    yield lab
    lab.close()


@pytest.fixture
def ops(lab: Lab, postgres_url: str) -> dict[str, Operator]:
    return {"a": lab.operator("op-a"), "b": lab.operator("op-b", postgres_url),
            "c": lab.operator("op-c")}


def block(op: Operator, number: str) -> str:
    return op.app.intake().submit_unsigned({"imei": number, "case_ref": "CPH-1",
                                            "police_unit": "Unit 7", "reason": "stolen"},
                                           ALICE).order_id


def verdict(op: Operator, number: str) -> str:
    with op.app.db.read() as s:
        return str(status_from_store(s, number[:14]))


def test_receipts_follow_every_recipient_and_complete_when_the_last_catches_up(lab, ops,
                                                                             tmp_path):
    a, b, c = ops["a"], ops["b"], ops["c"]
    first = block(a, imei(1))
    a.app.sync().push()
    b.app.sync().pull()
    c.app.sync().pull()
    a.app.sync().receipts()
    status = json.loads(a.cli("--json", "order", "status", first).stdout)
    assert status["state"] == "applied_everywhere"
    out = tmp_path / "receipt.jws"
    a.cli("order", "receipt", first, "--out", str(out))
    assert "applied everywhere" in c.cli("receipt", "verify", str(out)).stdout
    # C stopped: it does not pull
    second = block(a, imei(2))
    a.app.sync().push()
    b.app.sync().pull()
    a.app.sync().receipts()
    shown = a.cli("order", "status", second).stdout
    assert "applied 1 of 2" in shown and "missing op-c (NO)" in shown and "behind since" in shown
    lifted = a.app.intake().submit_signed(lab.police_order("lift", imei(2)), ALICE).order_id
    a.app.sync().push()
    b.app.sync().pull()
    sync = a.app.sync()
    moment = datetime.now(UTC) + timedelta(hours=2, minutes=1)
    sync.clock = lambda: moment
    assert [o["order_id"] for o in sync.receipts().overdue] == [lifted]
    headline = a.cli("sync", "status").stdout.splitlines()[0]
    assert "ATTENTION" in headline and "receipt_deadline" in headline
    # C back
    c.app.sync().pull()
    assert sync.receipts().overdue == []
    for order_id in (second, lifted):
        assert json.loads(a.cli("--json", "order", "status", order_id).stdout)["state"] \
            == "applied_everywhere"


def test_a_lift_during_a_registry_outage_reaches_b_by_notice_and_nothing_reopens(
        lab, ops, tmp_path, monkeypatch):
    a, b = ops["a"], ops["b"]
    phone = imei(3)
    block(a, phone)
    a.app.sync().push()
    b.app.sync().pull()
    b.app.sync().members()
    keeper = IndexKeeper(b.app.config.database_url, None, poll_interval=0.05).start()
    try:
        assert str(keeper.index.lookup(key_to_int(phone[:14]))) == "BLACKLISTED"
        lab.stop()  # the registry is down (the DDoS seed)
        order_id = a.app.intake().submit_signed(lab.police_order("lift", phone),
                                                ALICE).order_id
        with pytest.raises(Unavailable):
            a.app.sync(client_options={"retries": 0, "timeout": (0.5, 0.5)}).push()
        monkeypatch.setenv("IMEISYNC_SYNC_OUTAGE_AFTER", "1s")
        time.sleep(1.1)
        notice = tmp_path / "notice.jws"
        a.cli("order", "notice", order_id, "--out", str(notice))
        applied_at = time.monotonic()
        b.cli("notice", "apply", str(notice))
        while str(keeper.index.lookup(key_to_int(phone[:14]))) == "BLACKLISTED":
            assert time.monotonic() - applied_at < 1.0, "B still blacklists after a second"
            time.sleep(0.02)
        replay = b.cli("notice", "apply", str(notice), check=False)
        assert replay.returncode == 1 and "already applied" in replay.stderr
        # the registry returns: the feed's remove confirms the notice; nothing reopens
        lab.start()
        a.app.sync().push()
        b.app.sync().pull()
        b.app.sync().reconcile()
        assert verdict(b, phone) == "UNKNOWN"
        time.sleep(0.2)
        assert str(keeper.index.lookup(key_to_int(phone[:14]))) != "BLACKLISTED"
        with b.app.db.read() as s:
            assert s.execute(select(func.count()).select_from(Record)).scalar_one() == 1
            assert s.execute(select(LiftNotice.confirmed_at)).scalar_one() is not None
        keeper.poll()
        assert keeper.health()["violations"] == 0
    finally:
        keeper.stop(persist=False)
