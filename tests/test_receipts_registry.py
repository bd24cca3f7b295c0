"""The registry's receipts protocol through its HTTP interface (in-process, real signatures):
acks, receipts, the member directory, and their bad input — on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select

from imeisync.adapters.registry_receipts import acknowledge, fetch_members, fetch_receipt
from imeisync.adapters.signed_documents import RECEIPT_TYP, verify_document
from imeisync.domain.errors import BadInput, Refused, Unavailable
from imeisync.registry.models import AckStep, MemberAck
from support.registry_lab import InProcessRegistry

MEMBERS = [("op-a", "DK"), ("op-b", "SE"), ("op-c", "DK"), ("op-d", "NO")]
_n = count(1)


@pytest.fixture
def registry(tmp_path: Path, database_url: str) -> Iterator[InProcessRegistry]:
    # op-d receives only Norwegian records: it is not a recipient of op-a's changes
    reg = InProcessRegistry(tmp_path / "lab", MEMBERS, database_url,
                            receives={"op-c": "country", "op-d": "country"})
    yield reg
    reg.close()


def insert(reg: InProcessRegistry, op: str = "op-a") -> dict[str, Any]:
    n = next(_n)
    key = f"35209900{n:06d}"
    change = {"change_id": f"{op}:c-{n}", "action": "insert", "imei": key, "reason": "stolen",
              "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    result = reg.client(op).push([change])[0]
    assert result["result"] == "accepted"
    return {**change, "seq": result["seq"]}


def acks(reg: InProcessRegistry) -> dict[str, int]:
    with reg.app.db.read() as s:
        return dict(s.execute(select(MemberAck.member_id, MemberAck.applied_through)).all())


def test_receipt_lists_each_recipient_applied_or_behind_and_completes(registry):
    first = insert(registry)
    second = insert(registry)
    acknowledge(registry.client("op-b"), second["seq"])
    acknowledge(registry.client("op-c"), first["seq"])
    receipt = fetch_receipt(registry.client("op-a"), second["change_id"])
    by = {r["member"]: r for r in receipt.recipients}
    assert set(by) == {"op-b", "op-c"}  # op-d's profile does not include op-a's records
    assert by["op-b"]["applied"] and by["op-b"]["applied_at"]
    assert not by["op-c"]["applied"]
    assert (by["op-c"]["applied_through"], by["op-c"]["behind"]) == (first["seq"], 1)
    assert by["op-c"]["country"] == "DK" and by["op-c"]["behind_since"]
    assert (receipt.applied, receipt.total, receipt.complete) == (1, 2, False)
    acknowledge(registry.client("op-c"), second["seq"])
    done = fetch_receipt(registry.client("op-a"), second["change_id"])
    assert (done.applied, done.complete) == (2, True)
    # the JWS verifies offline with the registry's public key and says the same
    assert verify_document(done.jws, registry.registry_public, RECEIPT_TYP, "receipt") \
        == done.payload


def test_a_member_never_acked_is_behind_by_the_whole_feed(registry):
    change = insert(registry)
    receipt = fetch_receipt(registry.client("op-a"), change["change_id"])
    never = {r["member"]: r for r in receipt.recipients}["op-b"]
    assert never["applied_through"] is None and never["behind"] == change["seq"]
    assert never["last_ack_at"] is None


def test_an_ack_replayed_or_behind_changes_nothing_and_steps_are_kept_once(registry):
    first, second = insert(registry), insert(registry)
    b = registry.client("op-b")
    acknowledge(b, second["seq"])
    again = acknowledge(b, first["seq"])  # a late retry of an older ack
    assert again["applied_through"] == second["seq"]
    acknowledge(b, second["seq"])
    with registry.app.db.read() as s:
        steps = s.execute(select(func.count()).select_from(AckStep)).scalar_one()
    assert (acks(registry), steps) == ({"op-b": second["seq"]}, 1)


@pytest.mark.parametrize("body", [{"applied_through": -1}, {"applied_through": "3"},
                                  {"applied_through": True}, {}, [],
                                  {"applied_through": 1, "extra": 2}])
def test_a_malformed_ack_is_refused_and_nothing_is_written(registry, body):
    insert(registry)
    client = registry.client("op-b")
    with pytest.raises(BadInput):
        client._send("POST", "/v1/acks", body=body)
    assert acks(registry) == {}


def test_an_ack_ahead_of_the_head_is_refused(registry):
    change = insert(registry)
    with pytest.raises(Refused, match="ahead of the feed"):
        acknowledge(registry.client("op-b"), change["seq"] + 1)
    assert acks(registry) == {}


def test_unsigned_and_non_member_acks_get_401_and_change_nothing(registry):
    insert(registry)
    unsigned = requests.Session()
    unsigned.mount("http://", registry.adapter)
    answer = unsigned.post(f"{registry.url}/v1/acks", json={"applied_through": 1})
    assert answer.status_code == 401
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from imeisync.adapters.registry_client import RegistryClient

    stranger = RegistryClient(registry.url, signing_key=Ed25519PrivateKey.generate(),
                              kid="op-z", registry_key=registry.registry_public)
    stranger.session.mount("http://", registry.adapter)
    with pytest.raises(Refused, match="not a member"):
        acknowledge(stranger, 1)
    assert acks(registry) == {}


def test_a_receipt_for_another_operators_change_is_403_without_data(registry):
    change = insert(registry, "op-a")
    b = registry.client("op-b")
    answer = b.session.get(f"{registry.url}/v1/changes/{change['change_id']}/receipt",
                           auth=b.auth)
    assert answer.status_code == 403
    assert change["imei"] not in answer.text and "op-c" not in answer.text
    with pytest.raises(Refused, match="404"):
        fetch_receipt(b, "op-b:no-such-change")


def test_a_receipt_whose_signed_document_was_altered_is_rejected(registry, monkeypatch):
    change = insert(registry)
    real = registry.app.receipts.receipt

    def forged(member, change_id):
        answer = real(member, change_id)
        answer["receipt"]["complete"] = True  # the answer says more than the JWS
        return answer

    monkeypatch.setattr(registry.app.receipts, "receipt", forged)
    with pytest.raises(Unavailable, match="does not match"):
        fetch_receipt(registry.client("op-a"), change["change_id"])


def test_the_member_directory_is_signed_and_names_every_members_key(registry):
    members, token = fetch_members(registry.client("op-b"))
    assert [m.id for m in members] == ["op-a", "op-b", "op-c", "op-d"]
    a_key = registry.keys["op-a"].public_key().public_bytes_raw()
    assert members[0].public_key.public_bytes_raw() == a_key and token.count(".") == 2
