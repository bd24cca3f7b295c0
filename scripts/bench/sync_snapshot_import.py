#!/usr/bin/env python3
"""Benchmark: importing the registry's snapshot (default 10,000,000 records) at an operator,
against SQLite's own ``.import`` of the same rows.

A registry database holds N open records; the real registry server streams its snapshot on
loopback; operator B, with an empty SQLite store, does what ``sync reconcile`` does for a
bootstrap, timed in its two steps: download and verify to a spool file, then import (check every
line, insert into ``records`` with ``change_log`` rows, one transaction). The reference runs the
``sqlite3`` command-line shell's ``.import`` on the very CSV rows B received (a) into a bare
table, defaults, (b) into a table with the same indexes as ``records`` (key index, partial unique
(imei, owner) index), WAL and ``synchronous=FULL`` as B's store uses, and (c) the same with the
256 MiB page cache our import uses.

    .venv/bin/python scripts/bench/sync_snapshot_import.py [--records 10000000]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path

from sync_common import Lab, fill_registry, timed

from imeisync.services.sync.reconcile import _reconcile as reconcile_snapshot

SQLITE3 = shutil.which("sqlite3")


def sqlite_import(db: Path, csv: Path, schema: str, pragmas: str = "") -> float:
    db.unlink(missing_ok=True)
    script = f"{pragmas}\n{schema}\n.import --csv --skip 1 {csv} snap\n"
    with timed() as t:
        subprocess.run([SQLITE3, str(db)], input=script, text=True, check=True,
                       capture_output=True)
    return t.seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--keep", metavar="DIR", default=None,
                        help="work in DIR and keep it (default: a temporary folder)")
    args = parser.parse_args()
    if SQLITE3 is None:
        raise SystemExit("the sqlite3 command-line shell is needed: apt-get install sqlite3")
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-snap-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        lab = Lab(folder / "lab", [("op-a", "DK"), ("op-b", "SE"), ("op-c", "DK")])
        with timed() as t:
            fill_registry(lab.registry_db or "", args.records)
        print(f"registry filled with {args.records:,} open records in {t.seconds:.0f} s")
        lab.start()
        try:
            b = lab.operator("op-b")
            client = b.app.registry_client()
            spool = folder / "downloaded.csv"
            with timed() as download:
                snap = client.snapshot(spool)
            assert snap.records == args.records
            print(f"download + verify to spool: {download.seconds:.1f} s "
                  f"({args.records / download.seconds:,.0f} records/s, "
                  f"{spool.stat().st_size / 1e6:,.0f} MB)")
            service = b.app.sync()
            with timed() as imported:  # what `sync reconcile` does after the download
                result = reconcile_snapshot(service, snap, False, True)
            assert result.opened == args.records and result.mode == "bootstrap", result
            total = download.seconds + imported.seconds
            print(f"import from the verified spool (check every line, insert records with "
                  f"their indexes, change_log rows, one transaction): {imported.seconds:.1f} s "
                  f"= {args.records / imported.seconds:,.0f} records/s")
            print(f"end to end (download + import): {total:.1f} s")
        finally:
            lab.close()

        with sqlite3.connect(folder / "lab" / "op-b" / "imeisync.db") as conn:
            opened = conn.execute("SELECT count(*) FROM records WHERE closed_at IS NULL"
                                  ).fetchone()[0]
            logged = conn.execute("SELECT count(*) FROM change_log").fetchone()[0]
        print(f"B's store: {opened:,} open records, {logged:,} change_log rows")

        bare = sqlite_import(
            folder / "ref-bare.db", spool,
            "CREATE TABLE snap (imei_key TEXT, owner_id TEXT, owner_country TEXT, kind TEXT, "
            "reason TEXT, registry_seq INTEGER, opened_at TEXT);")
        index_schema = (
            "CREATE TABLE snap (imei_key VARCHAR(14) NOT NULL, owner_id VARCHAR(64) NOT NULL, "
            "owner_country VARCHAR(2) NOT NULL, kind VARCHAR(8) NOT NULL, reason VARCHAR(32) "
            "NOT NULL, registry_seq BIGINT, opened_at DATETIME NOT NULL, closed_at DATETIME);\n"
            "CREATE INDEX ix_snap_key ON snap (imei_key);\n"
            "CREATE UNIQUE INDEX uq_snap_open ON snap (imei_key, owner_id) "
            "WHERE closed_at IS NULL;")
        store_pragmas = "PRAGMA journal_mode = WAL;\nPRAGMA synchronous = FULL;"
        indexed = sqlite_import(folder / "ref-indexed.db", spool, index_schema, store_pragmas)
        cached = sqlite_import(folder / "ref-cached.db", spool, index_schema,
                               store_pragmas + "\nPRAGMA cache_size = -262144;")
        print(f"reference sqlite3 .import, bare table, defaults: {bare:.1f} s "
              f"({args.records / bare:,.0f} rows/s)")
        print(f"reference sqlite3 .import, records' indexes, WAL, synchronous=FULL: "
              f"{indexed:.1f} s ({args.records / indexed:,.0f} rows/s)")
        print(f"reference sqlite3 .import, the same with our 256 MiB page cache: "
              f"{cached:.1f} s ({args.records / cached:,.0f} rows/s)")
        for name, seconds in (("import", imported.seconds), ("end to end", total)):
            print(f"ratio {name} / .import: {seconds / bare:.2f}x the bare table, "
                  f"{seconds / indexed:.2f}x the indexed table, "
                  f"{seconds / cached:.2f}x the indexed table with our cache")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
