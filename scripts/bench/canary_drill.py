#!/usr/bin/env python3
"""Drill and benchmark: canary records per member, and a leak traced back to its source.

A registry holding ``--records`` real records (owners op-a and op-c) and ``[canary] tacs``
starts for real on loopback and plants ``--per-member`` canaries for each of four members.
Every member loads its snapshot into an empty store (``sync reconcile``), its store is exported
(the leaked copy: full IMEIs), one canary picked at random from the export and handed to
``imeisync registry canary identify``. Printed per member: records in its copy, canaries in it,
canaries of another member in it (must be 0), whom identify names and how long it took.

Then what the canaries cost the snapshot: the registry streams op-b's snapshot in-process,
with and without its canaries, ``--rounds`` times each, alternating; the ratio of medians.

    .venv/bin/python scripts/bench/canary_drill.py [--records 200000] [--per-member 5]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
from pathlib import Path

from sync_common import Lab, fill_registry, timed

from imeisync.domain.imei import luhn_check_digit
from imeisync.registry.config import load_registry_config
from imeisync.registry.service import Registry
from imeisync.store.db import Database

IMEISYNC = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "imeisync")
TACS = ["01012300", "01024500", "01033300", "01047700"]
MEMBERS = [("op-a", "DK"), ("op-b", "SE"), ("op-c", "DK"), ("op-d", "NO")]


def export(store: Path, out: Path) -> list[str]:
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as conn:
        keys = [k for (k,) in conn.execute(
            "SELECT imei_key FROM records WHERE closed_at IS NULL ORDER BY imei_key")]
    numbers = [k + luhn_check_digit(k) for k in keys]
    with open(out, "w", newline="") as handle:
        csv.writer(handle).writerows([n] for n in numbers)
    return numbers


def stream_seconds(registry: Registry, member_id: str) -> float:
    snapshot = registry.snapshot(registry.config.members[member_id])
    snapshot.open()
    with timed() as t:
        for _chunk in snapshot.lines(lambda digest, n, seq: ""):
            pass
    return t.seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--per-member", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random()
    logging.getLogger("imeisync").setLevel(logging.ERROR)  # reconcile's notes on own records
    with tempfile.TemporaryDirectory(prefix="imeisync-canary-") as tmp:
        lab = Lab(Path(tmp) / "lab", MEMBERS, canary_tacs=TACS,
                  canary_per_member=args.per_member,
                  receives={"op-c": "country", "op-d": ["op-a"]})
        fill_registry(str(lab.registry_db), args.records)
        lab.start()
        try:
            print(f"registry: {args.records:,} real records, {len(TACS)} canary TACs, "
                  f"per_member {args.per_member}")
            print(f"{'member':8} {'receives':10} {'copy':>9} {'canaries':>9} "
                  f"{'identify names':>15} {'seconds':>8}")
            copies: dict[str, set[str]] = {}
            for op_id, _country in MEMBERS:
                op = lab.operator(op_id)
                op.app.sync().reconcile()
                op.close()
                numbers = export(lab.root / op_id / "imeisync.db",
                                 lab.root / f"leaked-{op_id}.csv")
                copies[op_id] = {n for n in numbers if n[:8] in TACS}
                picked = rng.choice(sorted(copies[op_id]))
                with timed() as t:
                    named = subprocess.run(
                        [IMEISYNC, "--json", "registry", "canary", "identify", picked,
                         "--config", str(lab.registry_config)],
                        capture_output=True, text=True, timeout=60)
                who = (json.loads(named.stdout)["member"] if named.returncode == 0
                       else f"exit {named.returncode}")
                print(f"{op_id:8} {lab.receives.get(op_id, 'all')!s:10} {len(numbers):9,} "
                      f"{len(copies[op_id]):9} {who:>15} {t.seconds:8.2f}")
            for op_id, mine in copies.items():
                others = set().union(*(c for o, c in copies.items() if o != op_id))
                print(f"{op_id}: another member's canaries in its copy: {len(mine & others)}")
        finally:
            lab.close()

        # the same database without its canaries, for the reference stream
        bare = Path(tmp) / "bare.db"
        shutil.copy(str(lab.registry_db).removeprefix("sqlite:///"), bare)
        with sqlite3.connect(bare) as conn:
            conn.execute("DELETE FROM registry_canaries")
        config = load_registry_config(lab.registry_config)
        db, bare_db = Database(str(lab.registry_db)), Database(f"sqlite:///{bare}")
        with_canaries, without = Registry(db, config), Registry(bare_db, config)
        timings: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(args.rounds):
            timings["without"].append(stream_seconds(without, "op-b"))
            timings["with"].append(stream_seconds(with_canaries, "op-b"))
        db.dispose()
        bare_db.dispose()
        plain, planted = (statistics.median(timings[k]) for k in ("without", "with"))
        print(f"snapshot stream for op-b ({args.records:,} records), median of "
              f"{args.rounds}: {plain * 1000:.1f} ms without canaries, {planted * 1000:.1f} ms "
              f"with ({planted / plain:.3f}x)")


if __name__ == "__main__":
    main()
