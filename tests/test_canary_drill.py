"""The canary leak drill, end to end on loopback: the real registry server (``imeisync
registry serve``) with ``[canary] tacs``, operator A's real daemon (``imeisync run``) syncing
on its own, other stores syncing through ``imeisync sync`` steps.

A's stored copy is exported (what a leak or a sale would carry); any canary in it names A;
B's copy holds other canaries and none of A's. A member that follows the feed and one that
loads a snapshot end with the same canaries, reconcile has nothing to repair, and the shrink
guard stays quiet.
"""

from __future__ import annotations

import csv
import random
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from imeisync.domain.imei import luhn_check_digit
from imeisync.services.orders import Actor
from support.daemon_harness import IMEISYNC, Daemon, daemon_config, wait_for
from support.registry_lab import Lab, Operator

TACS = ["01012300", "01024500", "01033300"]
MEMBERS = [("op-a", "DK"), ("op-b", "SE"), ("op-c", "DK")]


def imei(n: int) -> str:
    key = f"86{n:012d}"
    return key + luhn_check_digit(key)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab", MEMBERS, canary_tacs=TACS)
    lab.start()
    yield lab
    lab.close()


def export(database: Path, out: Path) -> list[dict[str, str]]:
    """A store's open records as a CSV file, full 15-digit IMEIs: the leaked copy."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT imei_key, owner_id, owner_country, reason, opened_at "
                            "FROM records WHERE closed_at IS NULL ORDER BY imei_key").fetchall()
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["imei", "owner", "country", "reason", "since"])
        for key, owner, country, reason, since in rows:
            writer.writerow([key + luhn_check_digit(key), owner, country, reason, since])
    with open(out, newline="") as handle:
        return list(csv.DictReader(handle))


def canaries_in(rows: list[dict[str, str]]) -> set[str]:
    return {r["imei"] for r in rows if r["imei"][:8] in TACS}


def identify(lab: Lab, number: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IMEISYNC, "registry", "canary", "identify", number, "--config",
                           str(lab.registry_config)], capture_output=True, text=True,
                          timeout=60)


def test_a_leaked_copy_names_the_member_it_came_from(lab, tmp_path):
    # real records of every member, so that canaries hide among them
    for n, (op_id, _) in enumerate(MEMBERS):
        op = lab.operator(op_id)
        for k in range(3):
            op.app.intake().submit_unsigned({"imei": imei(10 * n + k), "case_ref": "C-1",
                                             "police_unit": "Unit 7", "reason": "stolen"},
                                            Actor("staff"))
        op.app.sync().push()
        op.close()

    # A: its own daemon syncs; its attach check blocks A's canaries like any record
    config, eir, api = daemon_config(lab, "op-a", pull="1s")
    daemon = Daemon(config, eir, api).start()
    store_a = lab.root / "op-a" / "imeisync.db"
    try:
        wait_for(lambda: len(canaries_in(export(store_a, tmp_path / "poll.csv"))) == 5, 30,
                 what="A's daemon to receive its 5 canaries")
        leaked = export(store_a, tmp_path / "leaked-from-a.csv")
        some = sorted(canaries_in(leaked))
        assert all(daemon.check(number) == "BLACKLISTED" for number in some)
    finally:
        assert daemon.stop() == 0

    # B: a snapshot first (its bootstrap), then the feed
    b = lab.operator("op-b")
    b.app.sync().reconcile()
    b.app.sync().pull()
    copy_b = export(lab.root / "op-b" / "imeisync.db", tmp_path / "copy-b.csv")

    # the drill: any one canary of the leaked file names A
    picked = random.choice(some)
    named = identify(lab, picked)
    assert named.returncode == 0, named.stderr
    assert "planted for op-a" in named.stdout and "verified" in named.stdout
    # B's copy: canaries of its own, none of A's, each naming B
    assert len(canaries_in(copy_b)) == 5 and not canaries_in(copy_b) & set(some)
    assert "planted for op-b" in identify(lab, sorted(canaries_in(copy_b))[0]).stdout
    # a real record in the leaked copy names nobody
    real = next(r["imei"] for r in leaked if r["imei"][:8] not in TACS)
    assert identify(lab, real).returncode == 1
    # canaries claim only members A receives, never A itself, with real-looking reasons
    assert {r["owner"] for r in leaked if r["imei"] in some} <= {"op-b", "op-c"}
    assert {r["reason"] for r in leaked if r["imei"] in some} <= {"stolen", "lost", "fraud"}


def test_feed_and_snapshot_give_the_same_canaries_and_reconcile_leaves_them(lab):
    by_feed = lab.operator("op-c")
    pulled = by_feed.app.sync().pull()
    assert pulled.opened == 5
    # the same member loading a snapshot into an empty store
    text = by_feed.config_path.read_text().replace("imeisync.db", "snapshot.db")
    other = lab.root / "op-c" / "snapshot.toml"
    other.write_text(text)
    by_snapshot = Operator("op-c", "DK", other, lab.root / "op-c")
    loaded = by_snapshot.app.sync().reconcile()
    assert loaded.opened == 5
    stores = [export(lab.root / "op-c" / name, lab.root / f"{name}.csv")
              for name in ("imeisync.db", "snapshot.db")]
    assert canaries_in(stores[0]) == canaries_in(stores[1]) and len(canaries_in(stores[0])) == 5
    # the incremental store reconciled: nothing to open, close or replace; no refusal
    repaired = by_feed.app.sync().reconcile()
    assert (repaired.opened, repaired.closed, repaired.replaced) == (0, 0, 0)
    assert repaired.unchanged == 5
    # and the snapshot store pulling afterwards finds nothing new
    assert by_snapshot.app.sync().pull().opened == 0
    by_snapshot.close()
