"""Lift notices during a registry outage, and no resurrection: the registry's code in-process
with real signatures; the outage is a real unreachable address. B's store runs on SQLite and
PostgreSQL."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from imeisync.adapters.keys import load_private_key
from imeisync.adapters.registry_client import RegistryClient
from imeisync.adapters.signed_documents import NOTICE_TYP, sign_document
from imeisync.domain.errors import BadInput, Conflict, Refused, Unavailable
from imeisync.domain.imei import luhn_check_digit
from imeisync.services.devices import status_from_store
from imeisync.services.orders import Actor
from imeisync.store import sync_state
from imeisync.store.models import LiftNotice, Record
from support.registry_lab import InProcessRegistry, Operator, free_port

STAFF = Actor("liaison-1")


def imei(n: int) -> str:
    key = f"35209900{n:06d}"
    return key + luhn_check_digit(key)


def key(n: int) -> str:
    return imei(n)[:14]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[InProcessRegistry]:
    reg = InProcessRegistry(tmp_path / "lab", [("op-a", "DK"), ("op-b", "SE"), ("op-c", "NO")],
                            f"sqlite:///{tmp_path / 'registry.db'}")
    yield reg
    reg.close()


@pytest.fixture
def a(world: InProcessRegistry, tmp_path: Path) -> Operator:
    return world.operator("op-a", f"sqlite:///{tmp_path / 'a.db'}")


@pytest.fixture
def b(world: InProcessRegistry, database_url: str) -> Operator:
    return world.operator("op-b", database_url)


@pytest.fixture
def c(world: InProcessRegistry, tmp_path: Path) -> Operator:
    return world.operator("op-c", f"sqlite:///{tmp_path / 'c.db'}")


def block(op: Operator, n: int) -> None:
    op.app.intake().submit_unsigned({"imei": imei(n), "case_ref": f"CASE-{n}",
                                     "police_unit": "Unit 1", "reason": "stolen"}, STAFF)


def lift(world: InProcessRegistry, op: Operator, n: int) -> str:
    return op.app.intake().submit_signed(world.lab.police_order("lift", imei(n)),
                                         STAFF).order_id


def status(op: Operator, n: int) -> str:
    with op.app.db.read() as s:
        return str(status_from_store(s, key(n)))


def notices(op: Operator) -> int:
    with op.app.db.read() as s:
        return s.execute(select(func.count()).select_from(LiftNotice)).scalar_one()


def registry_down(world: InProcessRegistry, op: Operator) -> None:
    """Point ``op`` at an address nobody listens on, and let it fail to push."""
    dead = f"http://127.0.0.1:{free_port()}"
    op.app.registry_client = lambda **_: RegistryClient(  # type: ignore[method-assign]
        dead, signing_key=world.keys[op.id], kid=op.id, registry_key=world.registry_public,
        retries=0, timeout=(0.5, 0.5))
    with pytest.raises(Unavailable):
        op.app.sync().push()


def registry_back(world: InProcessRegistry, op: Operator) -> None:
    op.app.registry_client = lambda **_: world.client(op.id)  # type: ignore[method-assign]


def later(op: Operator, delta: timedelta) -> None:
    moment = datetime.now(UTC) + delta
    op.app.clock = lambda: moment


@pytest.fixture
def outage(world, a, b, c) -> str:
    """A's record of device 1 is everywhere; the registry goes down; A lifts it and, after
    outage_after, issues a notice. Returns the notice (a compact JWS)."""
    block(a, 1)
    a.app.sync().push()
    for op in (b, c):
        op.app.sync().pull()
        op.app.sync().members()
    order_id = lift(world, a, 1)
    registry_down(world, a)
    with pytest.raises(Refused, match="outage_after"):  # too early: the lift goes the usual way
        a.app.notices().issue(order_id, "liaison-1")
    for op in (a, b, c):  # eleven minutes later, everywhere
        later(op, timedelta(minutes=11))
    return a.app.notices().issue(order_id, "liaison-1")


def test_a_notice_lifts_at_b_at_once_and_the_registry_later_reopens_nothing(world, a, b,
                                                                          outage):
    assert status(b, 1) == "BLACKLISTED"
    done = b.app.notices().apply(outage, "liaison-b")
    assert done["state"] == "lifted by notice, awaiting the registry"
    assert status(b, 1) == "UNKNOWN"  # no open record: the attach check lets it on
    with b.app.db.read() as s:
        record = s.execute(select(Record).where(Record.imei_key == key(1))).scalar_one()
    assert (record.close_reason, record.closed_by) == ("notice", f"notice:{done['notice_id']}")
    # a reconcile while the registry still holds the record open does not reopen it
    b.app.sync().reconcile(force=True)
    assert status(b, 1) == "UNKNOWN"
    # the registry comes back: A's remove arrives through the feed and confirms the notice
    registry_back(world, a)
    a.app.sync().push()
    b.app.sync().pull()
    with b.app.db.read() as s:
        records = s.execute(select(func.count()).select_from(Record)).scalar_one()
        confirmed = s.execute(select(LiftNotice.confirmed_at)).scalar_one()
    assert (status(b, 1), records) == ("UNKNOWN", 1) and confirmed is not None
    b.app.sync().reconcile()
    assert status(b, 1) == "UNKNOWN"


def test_a_replayed_notice_is_refused_and_changes_nothing(b, outage):
    b.app.notices().apply(outage, "liaison-b")
    with pytest.raises(Conflict, match="already applied"):
        b.app.notices().apply(outage, "liaison-b")
    assert notices(b) == 1


def _tampered(token: str, **changes: object) -> str:
    header, payload, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body.update(changes)
    raw = base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")
    return f"{header}.{raw}.{signature}"


@pytest.mark.parametrize("bad", ["forged", "truncated", "not_a_jws", "other_type"])
def test_forged_or_truncated_notices_are_refused_and_nothing_is_written(b, outage, bad):
    token = {"forged": _tampered(outage, imei=key(2)),
             "truncated": outage[: len(outage) // 2],
             "not_a_jws": "hello",
             "other_type": _tampered(outage).replace(outage.split(".")[0], base64.urlsafe_b64encode(
                 b'{"alg":"Ed25519","kid":"op-a","typ":"JWT"}').decode().rstrip("="))}[bad]
    with pytest.raises((Refused, BadInput)):
        b.app.notices().apply(token, "liaison-b")
    assert (notices(b), status(b, 1)) == (0, "BLACKLISTED")


def test_an_expired_notice_is_refused(b, outage):
    later(b, timedelta(days=4))
    with pytest.raises(Refused, match="expired"):
        b.app.notices().apply(outage, "liaison-b")
    assert (notices(b), status(b, 1)) == (0, "BLACKLISTED")


def test_a_notice_for_a_record_its_signer_does_not_own_is_refused(world, b, outage):
    # C signs a notice for A's record with its own (real, member) key
    now = datetime.now(UTC)
    payload = {"notice_id": "op-c:notice:x", "issuer": "op-c", "issuer_country": "NO",
               "order_id": "ORD-C", "imei": key(1), "lifted_at": now.isoformat(),
               "issued_at": now.isoformat(), "expires_at": (now + timedelta(days=1)).isoformat()}
    token = sign_document(payload, load_private_key(world.lab.root / "keys" / "op-c.key"),
                          "op-c", NOTICE_TYP)
    with pytest.raises(Refused, match="not by the notice's signer op-c"):
        b.app.notices().apply(token, "liaison-b")
    # and A's key cannot sign in C's name
    forged = sign_document({**payload, "issuer": "op-c"},
                           load_private_key(world.lab.root / "keys" / "op-a.key"), "op-c",
                           NOTICE_TYP)
    with pytest.raises(Refused, match="signature does not verify"):
        b.app.notices().apply(forged, "liaison-b")
    assert (notices(b), status(b, 1)) == (0, "BLACKLISTED")


def test_a_member_directory_with_a_bad_signature_is_not_used(b, outage):
    with b.app.db.write() as s:
        token = sync_state.read(s, (sync_state.MEMBERS,)).text(sync_state.MEMBERS)
        assert token is not None
        sync_state.put(s, sync_state.MEMBERS, _tampered(token, registry="evil"),
                       datetime.now(UTC))
    with pytest.raises(Refused, match="does not verify"):
        b.app.notices().apply(outage, "liaison-b")
    assert (notices(b), status(b, 1)) == (0, "BLACKLISTED")


def test_a_notice_is_not_needed_once_the_registry_has_the_lift(world, a):
    block(a, 3)
    a.app.sync().push()
    order_id = lift(world, a, 3)
    a.app.sync().push()
    with pytest.raises(Refused, match="already has this lift"):
        a.app.notices().issue(order_id, "liaison-1")


def test_a_snapshot_taken_before_a_lift_never_reopens_the_record(world, a, b, tmp_path):
    block(a, 4)
    a.app.sync().push()
    b.app.sync().pull()
    old = b.app.sync().client.snapshot(tmp_path / "old-snapshot.csv")  # record still open
    lift(world, a, 4)
    a.app.sync().push()
    b.app.sync().pull()
    assert status(b, 4) == "UNKNOWN"
    sync = b.app.sync()
    sync.client.snapshot = lambda _spool: old  # type: ignore[method-assign]
    with pytest.raises(Unavailable, match="moved past the snapshot"):
        sync.reconcile(force=True)
    assert status(b, 4) == "UNKNOWN"
    with b.app.db.read() as s:
        assert s.execute(select(func.count()).select_from(Record)).scalar_one() == 1


def test_the_console_applies_a_notice_and_refuses_a_forged_one_in_plain_words(b, outage):
    from support.fixtures_api import csrf_of, make_api

    api = make_api(b.app)
    with api.client:
        api.sign_in("liaison")
        page = api.client.get("/notices")
        assert page.status_code == 200 and "Apply a lift notice" in page.text
        forged = api.client.post("/notices", data={
            "csrf": csrf_of(page.text), "notice_text": _tampered(outage, imei=key(2))})
        assert forged.status_code == 422 and "signature does not verify" in forged.text
        assert (notices(b), status(b, 1)) == (0, "BLACKLISTED")
        done = api.client.post("/notices", files={"notice_file": ("n.jws", outage.encode())},
                               data={"csrf": csrf_of(page.text)})
        assert done.status_code == 200 and "lifted by notice, awaiting the registry" in done.text
        assert (notices(b), status(b, 1)) == (1, "UNKNOWN")


def test_a_refusal_by_the_registry_is_not_an_outage(world, a, b):
    block(a, 5)
    a.app.sync().push()
    order_id = lift(world, a, 5)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    # a wrong signing key: the registry answers 401 — reachable, so no notice
    a.app.registry_client = lambda **_: _mounted(RegistryClient(  # type: ignore[method-assign]
        world.url, signing_key=Ed25519PrivateKey.generate(), kid="op-a",
        registry_key=world.registry_public), world)
    with pytest.raises(Refused):
        a.app.sync().push()
    later(a, timedelta(hours=1))
    with pytest.raises(Refused, match="outage_after"):
        a.app.notices().issue(order_id, "liaison-1")


def _mounted(client: RegistryClient, world: InProcessRegistry) -> RegistryClient:
    client.session.mount("http://", world.adapter)
    return client
