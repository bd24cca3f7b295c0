#!/usr/bin/env python3
"""Benchmark: applying the registry's feed at an operator (changes per second).

A registry database holds N changes (default 1,000,000: 90% inserts by two Danish operators,
10% removes); a real registry server serves it on loopback; operator B (a fresh SQLite store)
runs ``sync pull`` until it has everything. Then, to separate the apply from the transport, a
second fresh store applies the same pages fetched beforehand. The reference, in the same run,
is a bare ``executemany`` of the resulting open records and their change_log rows into an
identical, empty store (same page cache as the pull's connection): what the database alone
costs.

    .venv/bin/python scripts/bench/sync_feed_apply.py [--changes 1000000] [--page-size 5000]
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
from pathlib import Path

from sync_common import Lab, fill_registry, timed

from imeisync.services.sync import PullResult
from imeisync.services.sync.pull import _apply_page as apply_page


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=1_000_000)
    parser.add_argument("--page-size", type=int, default=5000)
    args = parser.parse_args()
    removes = args.changes // 10
    inserts = args.changes - removes
    with tempfile.TemporaryDirectory(prefix="bench-feed-") as folder:
        root = Path(folder)
        lab = Lab(root / "lab", [("op-a", "DK"), ("op-b", "SE"), ("op-c", "DK")])
        with timed() as t:
            fill_registry(lab.registry_db or "", inserts, removes)
        print(f"registry filled with {args.changes:,} changes in {t.seconds:.1f} s")
        lab.start()
        try:
            b = lab.operator("op-b")
            service = b.app.sync()
            with timed() as pull:
                result = service.pull(page_size=args.page_size)
            assert result.entries == args.changes, result
            rate = args.changes / pull.seconds
            print(f"pull over HTTP (verify + check + apply), page {args.page_size}: "
                  f"{args.changes:,} changes in {pull.seconds:.1f} s = {rate:,.0f} changes/s "
                  f"({result.opened:,} opened, {result.closed:,} closed)")

            # the same pages, fetched first: the apply alone
            b2 = lab.operator("op-c")  # another fresh store (its own changes are confirmations)
            client = b2.app.registry_client()
            pages, cursor = [], 0
            with timed() as fetch:
                while True:
                    page = client.feed_page(cursor, args.page_size)
                    pages.append(page)
                    cursor = page.next
                    if not page.more:
                        break
            other = lab.operator("op-b", f"sqlite:///{root / 'apply-only.db'}")
            svc2 = other.app.sync()
            total = PullResult()
            with timed() as apply:
                for page in pages:
                    with other.app.db.write() as session:
                        apply_page(svc2, session, page, total)
            print(f"fetch + verify + check only: {fetch.seconds:.1f} s "
                  f"({args.changes / fetch.seconds:,.0f} changes/s)")
            apply_rate = args.changes / apply.seconds
            print(f"apply only (one transaction per page): {apply.seconds:.1f} s = "
                  f"{apply_rate:,.0f} changes/s")
        finally:
            lab.close()

        # reference: the database alone, same rows, same schema
        reference = root / "reference.db"
        other_schema = root / "apply-only.db"
        ref = sqlite3.connect(reference, isolation_level=None)
        schema = sqlite3.connect(other_schema).execute(
            "SELECT sql FROM sqlite_master WHERE name IN ('records', 'change_log', "
            "'ix_records_key', 'uq_records_open_owner') AND sql IS NOT NULL").fetchall()
        ref.execute("PRAGMA journal_mode = WAL")
        ref.execute("PRAGMA synchronous = FULL")
        ref.execute("PRAGMA cache_size = -131072")  # as the pull's connection uses
        for (sql,) in schema:
            ref.execute(sql)
        rows = sqlite3.connect(other_schema).execute(
            "SELECT imei_key, owner_id, owner_country, kind, reason, source, opened_at, "
            "opened_by, registry_seq, closed_at, closed_by, close_reason FROM records").fetchall()
        logs = sqlite3.connect(other_schema).execute(
            "SELECT imei_key, subject, op, kind, at FROM change_log").fetchall()
        with timed() as bare:
            ref.execute("BEGIN IMMEDIATE")
            ref.executemany(
                "INSERT INTO records (imei_key, owner_id, owner_country, kind, reason, source, "
                "opened_at, opened_by, registry_seq, closed_at, closed_by, close_reason) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            ref.executemany("INSERT INTO change_log (imei_key, subject, op, kind, at) "
                            "VALUES (?,?,?,?,?)", logs)
            ref.execute("COMMIT")
        print(f"reference: bare executemany of the same {len(rows):,} records and "
              f"{len(logs):,} change_log rows in one transaction: {bare.seconds:.1f} s")
        print(f"ratio apply-only / bare database: {apply.seconds / bare.seconds:.1f}x; "
              f"full pull / bare database: {pull.seconds / bare.seconds:.1f}x")


if __name__ == "__main__":
    main()
