"""The reference registry: change results and codes, ownership, history, feed, snapshot,
disputes — through its HTTP interface (in-process, real signatures), on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from imeisync.domain.errors import BadInput, Refused
from imeisync.registry import service as registry_service
from imeisync.registry.models import FeedEntry, RegistryRecord
from support.registry_lab import InProcessRegistry

MEMBERS = [("op-a", "DK"), ("op-b", "SE"), ("op-c", "DK")]
KEY = "35209900176148"
KEY2 = "49015420323751"
_n = iter(range(1, 10**6))


@pytest.fixture
def registry(tmp_path: Path, database_url: str) -> Iterator[InProcessRegistry]:
    reg = InProcessRegistry(tmp_path / "lab", MEMBERS, database_url,
                            receives={"op-c": "country", "op-b": ["op-a"]})
    yield reg
    reg.close()


@pytest.fixture
def sqlite_registry(tmp_path: Path) -> Iterator[InProcessRegistry]:
    """For what does not depend on the registry's database (signatures)."""
    reg = InProcessRegistry(tmp_path / "lab", MEMBERS, f"sqlite:///{tmp_path / 'reg.db'}")
    yield reg
    reg.close()


def change(action: str, key: str = KEY, **fields: Any) -> dict[str, Any]:
    body = {"change_id": f"c-{next(_n)}", "action": action, "imei": key,
            "reason": "stolen" if action == "insert" else "recovered",
            "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    body.update(fields)
    return body


def test_insert_is_accepted_and_resending_it_is_a_harmless_duplicate(registry):
    a = registry.client("op-a")
    first = change("insert")
    assert a.push([first])[0]["result"] == "accepted"
    again = a.push([first])[0]
    assert again["result"] == "duplicate"
    with registry.app.db.read() as s:
        assert s.execute(select(func.count()).select_from(FeedEntry)).scalar_one() == 1
        assert s.execute(select(func.count()).select_from(RegistryRecord)).scalar_one() == 1


def test_reusing_a_change_id_for_other_content_is_rejected_0011(registry):
    a = registry.client("op-a")
    first = change("insert")
    a.push([first])
    other = {**first, "imei": KEY2}
    result = a.push([other])[0]
    assert (result["result"], result["code"]) == ("rejected", "0011")


def test_remove_of_another_operators_record_is_0002_and_uses_the_one_ownership_rule(
        registry, monkeypatch):
    calls = []
    real = registry_service.decide_removal

    def spy(records, requester):
        calls.append(requester)
        return real(records, requester)

    monkeypatch.setattr(registry_service, "decide_removal", spy)
    registry.client("op-a").push([change("insert")])
    result = registry.client("op-b").push([change("remove")])[0]
    assert (result["result"], result["code"]) == ("rejected", "0002")
    assert "op-a (DK)" in result["message"]
    assert calls == ["op-b"]
    with registry.app.db.read() as s:
        assert s.execute(select(RegistryRecord.closed_seq)).scalar_one() is None


def test_codes_for_missing_record_unknown_reason_malformed_field_and_existing_record(registry):
    a = registry.client("op-a")
    results = a.push([
        change("remove"),                                   # nothing to remove
        change("insert", reason="borrowed"),                # unknown reason
        change("insert", key="3520990017614"),              # 13 digits
        change("insert", at="yesterday"),                   # not RFC 3339
        change("insert", kind="grey"),                      # unknown kind
        change("insert", colour="red"),                     # unknown field
        change("insert"),                                   # fine
        change("insert"),                                   # already open
    ])
    assert [(r["result"], r.get("code")) for r in results] == [
        ("rejected", "0003"), ("rejected", "0010"), ("rejected", "0011"), ("rejected", "0011"),
        ("rejected", "0011"), ("rejected", "0011"), ("accepted", None), ("rejected", "0012"),
    ]


@pytest.mark.parametrize("body", [
    [{"change_id": "x"}] * 2,                      # change_id twice in a batch
    [{"action": "insert"}],                        # no change_id
    ["not an object"],
    [{"change_id": "x"}] * 1001,                   # too many
])
def test_a_malformed_batch_is_refused_whole_and_nothing_changes(registry, body):
    a = registry.client("op-a")
    with pytest.raises(BadInput, match="malformed"):
        a.push(body)  # the client passes it on; the registry refuses it
    with registry.app.db.read() as s:
        assert s.execute(select(func.count()).select_from(FeedEntry)).scalar_one() == 0


def test_both_operators_hold_records_and_each_removes_only_its_own(registry):
    a, b = registry.client("op-a"), registry.client("op-b")
    a.push([change("insert")])
    b.push([change("insert")])
    assert a.push([change("remove")])[0]["result"] == "accepted"
    with registry.app.db.read() as s:
        rows = s.execute(select(RegistryRecord.owner_id, RegistryRecord.closed_seq)
                         .order_by(RegistryRecord.owner_id)).all()
    assert [(o, c is None) for o, c in rows] == [("op-a", False), ("op-b", True)]
    # history: the closed record is kept; inserting again opens a new one
    assert a.push([change("insert")])[0]["result"] == "accepted"
    with registry.app.db.read() as s:
        assert s.execute(select(func.count()).select_from(RegistryRecord)).scalar_one() == 3


def test_a_batch_may_insert_and_remove_the_same_record(registry):
    a = registry.client("op-a")
    results = a.push([change("insert"), change("remove"), change("insert", reason="lost")])
    assert [r["result"] for r in results] == ["accepted"] * 3
    snapshot = registry.client("op-a").feed_page(0, 100)
    assert [e.action for e in snapshot.entries] == ["insert", "remove", "insert"]


def test_the_feed_follows_each_members_profile_and_paginates(registry):
    a, b, c = (registry.client(o) for o in ("op-a", "op-b", "op-c"))
    a.push([change("insert", key=f"1000000000000{i}") for i in range(3)])
    b.push([change("insert", key="20000000000000")])
    c.push([change("insert", key="30000000000000")])
    # op-b receives op-a's records (a list) and its own; op-c its country (DK: a, c)
    assert [e.owner_id for e in b.feed_page(0, 100).entries] == ["op-a"] * 3 + ["op-b"]
    assert {e.owner_id for e in c.feed_page(0, 100).entries} == {"op-a", "op-c"}
    everything = a.feed_page(0, 100)
    assert [e.seq for e in everything.entries] == [1, 2, 3, 4, 5]
    first = a.feed_page(0, 2)
    assert (first.next, first.more, [e.seq for e in first.entries]) == (2, True, [1, 2])
    last = a.feed_page(4, 2)
    assert (last.next, last.more, last.head) == (5, False, 5)
    # a restrictive profile still moves forward when nothing it may see is left
    tail = c.feed_page(3, 100)
    assert tail.next == 5 and [e.owner_id for e in tail.entries] == ["op-c"]


def test_the_snapshot_lists_open_records_in_order_with_its_position(registry, tmp_path):
    a, b = registry.client("op-a"), registry.client("op-b")
    a.push([change("insert", key=KEY2), change("insert", key=KEY)])
    b.push([change("insert", key=KEY)])
    a.push([change("remove", key=KEY2)])
    snap = registry.client("op-c").snapshot(tmp_path / "s.csv")  # DK only
    assert snap.records == 1 and snap.seq == 4
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "imei,owner,country,kind,reason,seq,at,imei_last"
    assert [line.split(",")[:5] for line in lines[1:]] == [
        [KEY, "op-a", "DK", "block", "stolen"]]
    snap = registry.client("op-a").snapshot(tmp_path / "a.csv")
    rows = [line.split(",")[:2] for line in (tmp_path / "a.csv").read_text().splitlines()[1:]]
    assert rows == [[KEY, "op-a"], [KEY, "op-b"]]


def test_disputes_reach_the_owner_and_the_lift_answers_them(registry):
    a, b = registry.client("op-a"), registry.client("op-b")
    a.push([change("insert")])
    filed = b.file_dispute({"dispute_id": "op-b:d1", "imei": KEY, "owner": "op-a",
                            "case_ref": "SE-77", "reason": "sold legally; receipt shown"})
    assert filed["state"] == "open"
    # filing again is harmless; another dispute with the same id is refused
    assert b.file_dispute({"dispute_id": "op-b:d1", "imei": KEY, "owner": "op-a",
                           "case_ref": "SE-77", "reason": "sold legally; receipt shown"}
                          )["dispute_id"] == "op-b:d1"
    with pytest.raises(Refused, match="409"):
        b.file_dispute({"dispute_id": "op-b:d1", "imei": KEY, "owner": "op-a",
                        "case_ref": "SE-78", "reason": "other"})
    disputes = [e for e in a.feed_page(0, 100).entries if type(e).__name__ == "DisputeEntry"]
    assert [(d.dispute_id, d.filer_id, d.case_ref) for d in disputes] == [
        ("op-b:d1", "op-b", "SE-77")]
    assert not [e for e in registry.client("op-c").feed_page(0, 100).entries
                if type(e).__name__ != "Change"]
    with pytest.raises(Refused, match="403"):
        b.answer_dispute("op-b:d1", "upheld", "not yours to answer")
    a.push([change("remove")])
    answers = [e for e in b.feed_page(0, 100).entries
               if type(e).__name__ == "DisputeAnswerEntry"]
    assert [(x.dispute_id, x.answer) for x in answers] == [("op-b:d1", "lifted")]


def test_a_dispute_needs_an_open_record_of_another_member(registry):
    b = registry.client("op-b")
    with pytest.raises(Refused, match="0003"):
        b.file_dispute({"dispute_id": "op-b:d2", "imei": KEY, "owner": "op-a",
                        "case_ref": "SE-1", "reason": "x"})
    with pytest.raises(Refused, match="not a member"):
        b.file_dispute({"dispute_id": "op-b:d3", "imei": KEY, "owner": "op-z",
                        "case_ref": "SE-1", "reason": "x"})
    with pytest.raises(BadInput):
        b.file_dispute({"dispute_id": "op-b:d4", "imei": KEY, "owner": "op-a"})


def test_an_upheld_answer_travels_back_to_the_filer(registry):
    a, b = registry.client("op-a"), registry.client("op-b")
    a.push([change("insert")])
    b.file_dispute({"dispute_id": "op-b:d9", "imei": KEY, "owner": "op-a",
                    "case_ref": "SE-9", "reason": "wrong phone"})
    with pytest.raises(Refused, match="still open"):
        a.answer_dispute("op-b:d9", "lifted", "done")
    assert a.answer_dispute("op-b:d9", "upheld", "police confirm theft")["state"] == "upheld"
    answers = [e for e in b.feed_page(0, 100).entries
               if type(e).__name__ == "DisputeAnswerEntry"]
    assert [(x.answer, x.reason) for x in answers] == [("upheld", "police confirm theft")]


# -- who may speak --------------------------------------------------------------------------


def _send(registry: InProcessRegistry, request: Any) -> Any:
    import requests

    session = requests.Session()
    session.mount("http://", registry.adapter)
    if isinstance(request, requests.Request):
        request = request.prepare()
    return session.send(request)


def _signed_request(registry: InProcessRegistry, kid: str, key: Any, *,
                    created_offset: float = 0, tamper: bool = False) -> Any:
    import datetime as dt
    import json

    import requests

    from imeisync.adapters.http_signatures import OperatorAuth

    class Auth(OperatorAuth):
        def get_created(self, request):  # type: ignore[no-untyped-def]
            created = super().get_created(request)
            return created + dt.timedelta(seconds=created_offset)

    body = json.dumps({"changes": [change("insert")]}).encode()
    prepared = requests.Request("POST", f"{registry.url}/v1/changes", data=body,
                                headers={"Content-Type": "application/json"}).prepare()
    Auth(key, kid)(prepared)
    if tamper:
        prepared.body = body.replace(b"stolen", b"lost")
        prepared.headers["Content-Length"] = str(len(prepared.body))
    return prepared


@pytest.mark.parametrize(("kid", "signer", "options", "detail"), [
    ("op-z", "op-a", {}, "not a member"),
    ("op-a", "op-b", {}, "not valid"),                       # signed with another key
    ("op-a", "op-a", {"created_offset": -600}, "not valid"),  # ten minutes old
    ("op-a", "op-a", {"created_offset": 600}, "not valid"),   # from the future
    ("op-a", "op-a", {"tamper": True}, "not valid"),          # body changed after signing
])
def test_unknown_members_and_bad_or_stale_signatures_get_401_and_change_nothing(
        sqlite_registry, kid, signer, options, detail):
    registry = sqlite_registry
    request = _signed_request(registry, kid, registry.keys[signer], **options)
    response = _send(registry, request)
    assert response.status_code == 401
    assert detail in response.json()["detail"]
    with registry.app.db.read() as s:
        assert s.execute(select(func.count()).select_from(FeedEntry)).scalar_one() == 0


def test_an_unsigned_request_gets_401(sqlite_registry):
    registry = sqlite_registry
    import requests

    response = _send(registry, requests.Request("GET", f"{registry.url}/v1/changes"))
    assert response.status_code == 401
    assert response.headers["Signature"]  # even refusals are signed by the registry
