"""Ranges across the federation: the registry's rules for range changes, and a shipment blocked
at A refused at B (feed, snapshot, attach index), lifted only whole."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from imeisync.adapters.attach_index import IndexKeeper
from imeisync.adapters.police_jws import sign_order
from imeisync.domain.errors import Refused
from imeisync.domain.imei import Imei, key_to_int
from imeisync.domain.verdict import Status
from imeisync.services.orders import Actor
from support.registry_lab import InProcessRegistry, Lab, Operator
from test_registry import change
from test_sync_e2e import verdict

ALICE = Actor("alice")
TAC = "86000000"


def key(serial: int) -> str:
    return f"{TAC}{serial:06d}"


def full(serial: int) -> str:
    return Imei(key(serial)).full


def span(first: int, last: int) -> dict[str, str]:
    return {"imei_first": key(first), "imei_last": key(last)}


def ranged(action: str, first: int, last: int, **fields: Any) -> dict[str, Any]:
    """A registry change for the range ``first``..``last`` (serials of TAC)."""
    body = change(action, **span(first, last), **fields)
    del body["imei"]
    return body


@pytest.fixture
def registry(tmp_path: Path, database_url: str) -> Iterator[InProcessRegistry]:
    reg = InProcessRegistry(tmp_path / "lab", [("op-a", "DK"), ("op-b", "SE")], database_url)
    yield reg
    reg.close()


def codes(results: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(r["result"], r.get("code")) for r in results]


def test_registry_range_changes_follow_the_ownership_and_range_rules(registry) -> None:
    a, b = registry.client("op-a"), registry.client("op-b")
    assert codes(a.push([ranged("insert", 100, 199)])) == [("accepted", None)]
    two_tacs = ranged("insert", 0, 1)
    two_tacs["imei_last"] = "86000001999999"
    results = a.push([
        change("insert", key=key(500), **span(500, 600)),         # both forms
        ranged("insert", 150, 250),                              # overlaps own range
        change("insert", key=key(120)),                          # own range covers it
        change("remove", key=key(120)),                          # part of own range
        ranged("remove", 100, 150),                              # part of own range
        ranged("insert", 300, 200),                              # first after last
        two_tacs,                                                # two TACs
        ranged("insert", 0, 200_000),                            # too large
    ])
    assert codes(results) == [
        ("rejected", "0011"), ("rejected", "0012"), ("rejected", "0012"), ("rejected", "0003"),
        ("rejected", "0003"), ("rejected", "0011"), ("rejected", "0011"), ("rejected", "0011"),
    ]
    assert "too large" in results[7]["message"] or "larger" in results[7]["message"]
    # another owner: its overlapping range is fine; it cannot remove A's
    assert codes(b.push([ranged("insert", 150, 160),
                         ranged("remove", 100, 199)])) == [
        ("accepted", None), ("rejected", "0002")]
    feed = a.feed_page(0, 100).entries
    assert [(e.imei_key, e.imei_key_last, e.owner_id) for e in feed] == [
        (key(100), key(199), "op-a"), (key(150), key(160), "op-b")]
    assert codes(a.push([ranged("remove", 100, 199)])) == [("accepted", None)]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab", [("op-a", "DK"), ("op-b", "SE")])
    lab.start()
    yield lab
    lab.close()


def police_range(lab: Lab, kind: str, first: int, last: int) -> str:
    payload = {
        "order_id": f"ORD-{kind}-{first}-{last}-{datetime.now(UTC).timestamp()}",
        "kind": kind, "imei_range": {"first": full(first), "last": full(last)},
        "case_ref": "CPH-2026-900", "police_unit": "Copenhagen Police",
        "reason": "recovered" if kind == "lift" else "stolen",
        "issued_at": (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return sign_order(payload, lab.root / "police" / "cph-police.key", "cph-police")


def test_a_range_blocked_at_a_blocks_every_device_inside_at_b_and_lifts_only_whole(
    lab: Lab, tmp_path: Path
) -> None:
    a: Operator = lab.operator("op-a")
    b: Operator = lab.operator("op-b")
    a.app.intake().submit_unsigned({
        "imei_range": {"first": full(1000), "last": full(1999)}, "case_ref": "truck-7",
        "police_unit": "Unit 7", "reason": "stolen"}, ALICE)
    assert a.app.sync().push().accepted == 1
    assert b.app.sync().pull().opened == 1

    inside = [full(s) for s in (1000, 1500, 1999)]
    outside = [full(s) for s in (999, 2000)]
    assert [verdict(b, n) for n in inside] == ["BLACKLISTED"] * 3
    assert [verdict(b, n) for n in outside] == ["UNKNOWN"] * 2
    keeper = IndexKeeper(b.app.config.database_url, tmp_path / "b-index.bin").start(follow=False)
    try:
        assert keeper.index is not None
        look = keeper.index.lookup
        assert [look(key_to_int(n[:14])) for n in inside] == [Status.BLACKLISTED] * 3
        assert [look(key_to_int(n[:14])) for n in outside] == [Status.UNKNOWN] * 2
        # a snapshot reconcile keeps the range as it is
        result = b.app.sync().reconcile(force=True)
        assert (result.unchanged, result.closed, result.opened) == (1, 0, 0)

        with pytest.raises(Refused) as refused:
            a.app.intake().submit_signed(lab.police_order("lift", full(1500)), ALICE)
        assert refused.value.code == "inside_range"

        a.app.intake().submit_signed(police_range(lab, "lift", 1000, 1999), ALICE)
        assert a.app.sync().push().accepted == 1
        assert b.app.sync().pull().closed == 1
        assert [verdict(b, n) for n in inside] == ["UNKNOWN"] * 3
        keeper.poll()
        assert [look(key_to_int(n[:14])) for n in inside] == [Status.UNKNOWN] * 3
    finally:
        keeper.stop(persist=False)


def test_a_new_operator_loads_a_range_from_the_snapshot(lab: Lab) -> None:
    a: Operator = lab.operator("op-a")
    a.app.intake().submit_unsigned({
        "imei_range": {"first": full(5000), "last": full(5099)}, "case_ref": "truck-9",
        "police_unit": "Unit 7", "reason": "stolen"}, ALICE)
    assert a.app.sync().push().accepted == 1
    b: Operator = lab.operator("op-b")

    result = b.app.sync().reconcile(force=True)

    assert result.opened == 1
    assert [verdict(b, full(s)) for s in (4999, 5000, 5099, 5100)] == [
        "UNKNOWN", "BLACKLISTED", "BLACKLISTED", "UNKNOWN"]


def test_a_dispute_about_a_device_inside_a_range_reaches_the_owner_and_the_range_lift_answers_it(
    lab: Lab
) -> None:
    a: Operator = lab.operator("op-a")
    b: Operator = lab.operator("op-b")
    a.app.intake().submit_unsigned({
        "imei_range": {"first": full(7000), "last": full(7099)}, "case_ref": "truck-3",
        "police_unit": "Unit 7", "reason": "stolen"}, ALICE)
    a.app.sync().push()
    b.app.sync().pull()

    filed = b.app.disputes().file(full(7050), "SE-2026-77", "bought new in a shop", Actor("bob"))

    assert filed["owner"] == "op-a" and filed["imei_key"] == key(7000), "names the range"
    assert a.app.sync().pull().disputes == 1
    a.app.intake().submit_signed(police_range(lab, "lift", 7000, 7099), ALICE)
    a.app.sync().push()
    assert b.app.sync().pull().answers == 1
    assert b.app.disputes().list(direction="filed")[0]["state"] == "lifted"
    assert verdict(b, full(7050)) == "UNKNOWN"
