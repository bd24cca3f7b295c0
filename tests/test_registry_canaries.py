"""Canary records (registry/canaries.py): every member's own synthetic records, in its feed and
snapshot only, shaped like real ones, immune to every member's changes, and traceable back to
the member by `imeisync registry canary identify` — in-process registry with real signatures,
on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from imeisync.adapters.registry_client import Change
from imeisync.domain.errors import BadInput, NotAllowed, NotFound, Refused
from imeisync.domain.imei import is_valid_typed, parse_network
from imeisync.entrypoints.cli import cli
from imeisync.registry import canaries
from imeisync.registry.app import RegistryApp
from imeisync.registry.config import load_registry_config
from imeisync.registry.models import FeedEntry, RegistryCanary
from imeisync.services.sync.snapshot import snapshot_rows
from support.registry_lab import InProcessRegistry, Lab

MEMBERS = [("op-a", "DK"), ("op-b", "SE"), ("op-c", "DK")]
TACS = ["01012300", "01024500"]
RECEIVES = {"op-c": "country", "op-b": ["op-a"]}


@pytest.fixture
def registry(tmp_path: Path, database_url: str) -> Iterator[InProcessRegistry]:
    reg = InProcessRegistry(tmp_path / "lab", MEMBERS, database_url, receives=RECEIVES,
                            canary_tacs=TACS)
    yield reg
    reg.close()


def feed_changes(reg: InProcessRegistry, op: str) -> list[Change]:
    return [e for e in reg.client(op).feed_page(0, 10000).entries if isinstance(e, Change)]


def snapshot(reg: InProcessRegistry, op: str, tmp_path: Path) -> list[Any]:
    spool = reg.client(op).snapshot(tmp_path / f"{op}.csv")
    return list(snapshot_rows(spool.path))


def planted(reg: InProcessRegistry, op: str | None = None) -> list[Any]:
    with reg.app.db.read() as s:
        query = select(RegistryCanary)
        if op is not None:
            query = query.where(RegistryCanary.recipient_id == op)
        return list(s.execute(query).scalars())


def test_each_member_gets_its_own_canaries_in_feed_and_snapshot_and_nobody_elses(
        registry, tmp_path):
    # a real record in the feed, so that canaries sit among real ones
    registry.client("op-a").push([{"change_id": "op-a:r1", "action": "insert",
                                   "imei": "35209900176148", "reason": "stolen",
                                   "at": "2026-11-30T10:00:00Z"}])
    keys = {}
    for op, _ in MEMBERS:
        mine = {c.imei_key for c in planted(registry, op)}
        assert len(mine) == 5
        in_feed = {c.imei_key for c in feed_changes(registry, op) if c.imei_key[:8] in TACS}
        in_snapshot = {r.imei_key for r in snapshot(registry, op, tmp_path)
                       if r.imei_key[:8] in TACS}
        assert in_feed == in_snapshot == mine
        keys[op] = mine
    assert not keys["op-a"] & keys["op-b"] and not keys["op-b"] & keys["op-c"]
    assert not keys["op-a"] & keys["op-c"]


def test_canaries_look_like_records_of_the_members_the_recipient_receives(registry):
    now = datetime.now(UTC)
    owners: dict[str, set[str]] = {}
    for op, _ in MEMBERS:
        for c in feed_changes(registry, op):
            if c.imei_key[:8] not in TACS:
                continue
            full = parse_network(c.imei_key).full
            assert is_valid_typed(full)
            assert (c.action, c.kind) == ("insert", "block")
            assert c.reason in ("stolen", "lost", "fraud")
            assert re.fullmatch(rf"{re.escape(c.owner_id)}:[0-9a-f]{{12}}4[0-9a-f]{{3}}"
                                r"[89ab][0-9a-f]{15}", c.change_id)
            when = datetime.fromisoformat(c.at.replace("Z", "+00:00"))
            assert now - timedelta(days=6 * 366) < when < now - timedelta(days=364)
            owners.setdefault(op, set()).add(c.owner_id)
    # op-a receives all (so op-b and op-c), op-b only op-a, op-c its country (op-a): never self
    assert owners["op-a"] <= {"op-b", "op-c"} and owners["op-b"] == {"op-a"}
    assert owners["op-c"] == {"op-a"}


def test_planting_again_adds_nothing_and_a_new_member_gets_its_own(registry, tmp_path):
    with registry.app.db.read() as s:
        head = s.execute(select(func.max(FeedEntry.seq))).scalar_one()
    assert canaries.plant(registry.app.db, registry.config, datetime.now(UTC)) == {}
    again = RegistryApp(registry.config, registry.app.db)  # a second worker starting
    assert again is not None
    with registry.app.db.read() as s:
        assert s.execute(select(func.max(FeedEntry.seq))).scalar_one() == head
    assert len(planted(registry)) == 15


def test_the_claimed_owner_can_neither_lift_nor_stumble_on_a_canary(registry, tmp_path):
    canary = planted(registry, "op-b")[0]
    owner = registry.client(canary.owner_id)
    removed = owner.push([{"change_id": "x:1", "action": "remove", "imei": canary.imei_key,
                           "reason": "recovered", "at": "2026-11-30T10:00:00Z"}])[0]
    assert (removed["result"], removed["code"]) == ("rejected", "0003")
    # the claimed owner blocking that very device is an ordinary insert; the recipient's
    # snapshot then carries the real record once, not twice
    opened = owner.push([{"change_id": "x:2", "action": "insert", "imei": canary.imei_key,
                          "reason": "stolen", "at": "2026-11-30T10:00:00Z"}])[0]
    assert opened["result"] == "accepted"
    rows = [r for r in snapshot(registry, "op-b", tmp_path) if r.imei_key == canary.imei_key]
    assert len(rows) == 1
    assert not any(c.imei_key == canary.imei_key and c.change_id == canary.change_id
                   for c in feed_changes(registry, canary.owner_id))


def test_a_dispute_about_a_canary_is_accepted_but_never_delivered(registry, caplog):
    canary = planted(registry, "op-b")[0]
    filed = registry.client("op-b").file_dispute({
        "dispute_id": "op-b:d1", "imei": canary.imei_key, "owner": canary.owner_id,
        "case_ref": "SE-1", "reason": "customer shows a receipt"})
    assert filed["state"] == "open"
    delivered = [e for e in registry.client(canary.owner_id).feed_page(0, 10000).entries
                 if type(e).__name__ == "DisputeEntry"]
    assert delivered == []
    assert any("canary" in r.getMessage() and "op-b" in r.getMessage() for r in caplog.records)


def test_a_canarys_receipt_is_refused_like_any_other_members_change(registry):
    registry.client("op-a").push([{"change_id": "op-a:r1", "action": "insert",
                                   "imei": "35209900176148", "reason": "stolen",
                                   "at": "2026-11-30T10:00:00Z"}])
    member = registry.config.members["op-b"]
    with pytest.raises(NotAllowed):
        registry.app.receipts.receipt(member, "op-a:r1")
    with pytest.raises(NotAllowed):
        registry.app.receipts.receipt(member, planted(registry, "op-b")[0].change_id)


def test_identify_names_the_recipient_and_verifies_the_draw(registry):
    for op, _ in MEMBERS:
        for canary in planted(registry, op):
            found = canaries.identify(registry.app.db, registry.config,
                                      parse_network(canary.imei_key).full)
            assert (found["member"], found["verified"]) == (op, True)
    with pytest.raises(NotFound):
        canaries.identify(registry.app.db, registry.config, "352099001761481")
    with pytest.raises(BadInput):
        canaries.identify(registry.app.db, registry.config, "352099001761480")  # check digit


def test_identify_command_exit_codes(registry):
    config = str(registry.lab.registry_config)
    canary = planted(registry, "op-c")[0]
    full = parse_network(canary.imei_key).full
    found = CliRunner().invoke(cli, ["registry", "canary", "identify", full, "--config", config])
    assert found.exit_code == 0, found.output
    assert "planted for op-c" in found.output and "verified" in found.output
    as_json = CliRunner().invoke(cli, ["--json", "registry", "canary", "identify",
                                       f"{full[:2]}-{full[2:8]}-{full[8:14]}-{full[14]}",
                                       "--config", config])
    assert as_json.exit_code == 0 and '"member": "op-c"' in as_json.output
    other = CliRunner().invoke(cli, ["registry", "canary", "identify", "352099001761481",
                                     "--config", config])
    assert other.exit_code == 1 and "not a canary" in other.output
    bad = CliRunner().invoke(cli, ["registry", "canary", "identify", "35209900-17614x",
                                   "--config", config])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_canary_section_is_validated(tmp_path):
    base = tmp_path / "lab"
    InProcessRegistry(base, MEMBERS, f"sqlite:///{tmp_path / 'r.db'}",
                      canary_tacs=TACS).close()
    config = base / "registry.toml"
    text = config.read_text()
    for bad, expected in ((re.sub(r"tacs = .*", 'tacs = ["0101230"]', text), "tacs"),
                          (re.sub(r"tacs = .*", "tacs = []", text), "tacs"),
                          (re.sub(r"per_member = .*", "per_member = 0", text), "per_member"),
                          (text.replace("per_member", "per_membr"), "unknown key"),
                          (re.sub(r"secret_file = .*", 'secret_file = "nope"', text),
                           "does not exist")):
        config.write_text(bad)
        with pytest.raises(BadInput, match=expected):
            load_registry_config(config)
    config.write_text(text)
    secret = base / "keys" / "canary.secret"
    secret.chmod(0o644)
    with pytest.raises(Refused, match="chmod 600"):
        load_registry_config(config)
    secret.chmod(0o600)
    secret.write_text("short\n")
    with pytest.raises(BadInput, match="64 hex digits"):
        load_registry_config(config)


def test_without_a_canary_section_nothing_is_planted(tmp_path):
    reg = InProcessRegistry(tmp_path / "lab", MEMBERS, f"sqlite:///{tmp_path / 'r.db'}")
    try:
        assert planted(reg) == [] and feed_changes(reg, "op-a") == []
    finally:
        reg.close()


def test_a_registry_database_of_the_previous_revision_upgrades_and_then_plants(
        tmp_path, database_url):
    from imeisync.registry.schema import REGISTRY, current_revision, head_revision
    from imeisync.store.db import Database

    db = Database(database_url)
    try:
        REGISTRY.upgrade(db, "r0003_ranges")
        assert current_revision(db) == "r0003_ranges"
        files = Lab(tmp_path / "files", MEMBERS, registry_db=database_url, port=1,
                    canary_tacs=TACS)
        upgraded = CliRunner().invoke(cli, ["registry", "upgrade", "--config",
                                            str(files.registry_config)])
        assert upgraded.exit_code == 0, upgraded.output
        assert current_revision(db) == head_revision()  # through r0004_canaries and on
    finally:
        db.dispose()
    reg = InProcessRegistry(tmp_path / "lab", MEMBERS, database_url, canary_tacs=TACS)
    try:
        assert len(planted(reg)) == 15
    finally:
        reg.close()


def test_canary_secret_command_writes_a_private_secret_once(tmp_path):
    out = tmp_path / "canary.secret"
    made = CliRunner().invoke(cli, ["registry", "canary", "secret", "--out", str(out)])
    assert made.exit_code == 0, made.output
    assert out.stat().st_mode & 0o777 == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}\n", out.read_text())
    first = out.read_text()
    again = CliRunner().invoke(cli, ["registry", "canary", "secret", "--out", str(out)])
    assert again.exit_code == 1 and "never overwritten" in again.output
    assert out.read_text() == first
