#!/usr/bin/env python3
"""Benchmark: what acks and receipts cost the reference registry at 100 members × 1M changes.

A SQLite registry database filled directly with ``--changes`` feed entries (two owners), 100
members receiving everything, and an ack history of ``--steps`` moves per member. Measured
in-process (the registry's own code, no HTTP, so the figures are the database work):

- feed: a member reads pages of 5,000 from random positions — alone, and while every member
  acknowledges once per ``--pull-interval`` (100 members every 2 s: 50 acks/s, from another
  process, as another worker of the server). Rounds alternate between the two so machine
  noise hits both; the ratio of medians is printed (target: acks slow the feed by at most 5%);
- one ack (a write transaction), and one receipt of a random change (100 recipients).

    .venv/bin/python scripts/bench/receipts_registry.py [--changes 1000000] [--members 100]
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sync_common import fill_registry, timed

from imeisync.registry.config import Member, RegistryConfig
from imeisync.registry.receipts import Receipts
from imeisync.registry.service import Registry
from imeisync.store.db import Database

PAGE = 5000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=1_000_000)
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--steps", type=int, default=500, help="ack history per member")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pull-interval", type=float, default=2.0,
                        help="each member acks once per this many seconds")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-receipts-registry-"))
    try:
        url = f"sqlite:///{folder / 'registry.db'}"
        with timed() as t:
            head = fill_registry(url, args.changes)
        print(f"registry filled: {head} changes in {t.seconds:.1f} s")
        ids = ["op-a", "op-c"] + [f"op-{i:03d}" for i in range(args.members - 2)]
        members = {m: Member(m, "DK", "-", "all") for m in ids}
        config = RegistryConfig("127.0.0.1:1", url, "-", "registry", members,
                                signing_key=Ed25519PrivateKey.generate())
        db = Database(url)
        registry = Registry(db, config)
        receipts = Receipts(db, config, lambda: datetime.now(UTC))
        rng = random.Random(3)
        owned = _seed(folder / "registry.db", ids, head, args.steps, rng)
        reader = members[ids[2]]

        def feed_round() -> float:
            positions = [rng.randrange(0, head - PAGE) for _ in range(20)]
            started = time.perf_counter()
            for after in positions:
                registry.feed(reader, after, PAGE)
            return (time.perf_counter() - started) / len(positions)

        def ack_load(stop: Any) -> None:
            """Every member acks once per pull interval, from another process (as another
            worker of the registry server would)."""
            own = Database(url)
            load = Receipts(own, config, lambda: datetime.now(UTC))
            gap = args.pull_interval / len(ids)
            turn = 0
            while not stop.wait(gap):
                turn += 1
                load.acknowledge(members[ids[turn % len(ids)]],
                                 {"applied_through": 1 + turn % (head - 1)})
            own.dispose()

        feed_round()  # warm the cache
        alone, acked = [], []
        for _ in range(args.rounds):
            alone.append(feed_round())
            stop = multiprocessing.Event()
            loader = multiprocessing.Process(target=ack_load, args=(stop,), daemon=True)
            loader.start()
            acked.append(feed_round())
            stop.set()
            loader.join()
        ack_times = []
        for i in range(300):
            member = members[ids[i % len(ids)]]
            with timed() as t:
                receipts.acknowledge(member, {"applied_through": head})
            ack_times.append(t.seconds)
        receipt_times = []
        for change_id in rng.sample(owned, min(300, len(owned))):
            with timed() as t:
                answer = receipts.receipt(members["op-a"], change_id)
            receipt_times.append(t.seconds)
            assert answer["receipt"]["total"] == len(ids) - 1
        base, with_acks = statistics.median(alone), statistics.median(acked)
        print(f"{args.members} members, {head} changes, {args.steps} ack moves per member")
        rate = len(ids) / args.pull_interval
        print(f"feed page of {PAGE}: {base * 1000:.1f} ms alone, {with_acks * 1000:.1f} ms while "
              f"{rate:.0f} acks/s arrive (every member once per {args.pull_interval:g} s) -> "
              f"{(with_acks / base - 1) * 100:+.1f}% (target <= +5%)")
        print(f"one ack: median {statistics.median(ack_times) * 1000:.2f} ms")
        print(f"one receipt ({args.members - 1} recipients, signed): median "
              f"{statistics.median(receipt_times) * 1000:.2f} ms, max "
              f"{max(receipt_times) * 1000:.2f} ms")
        db.dispose()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _seed(path: Path, ids: list[str], head: int, steps: int, rng: random.Random) -> list[str]:
    """Ack history for every member (``steps`` moves up to a random position) and submission
    rows for 1,000 of op-a's changes (receipts are looked up by them)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    at = "2026-11-21T10:00:00.000000Z"
    for member in ids:
        top = rng.randrange(head // 2, head)
        marks = [*sorted(rng.sample(range(1, top), steps - 1)), top]
        conn.executemany("INSERT INTO registry_ack_steps VALUES (?,?,?)",
                         [(member, m, at) for m in marks])
        conn.execute("INSERT INTO registry_acks VALUES (?,?,?,?)", (member, top, at, at))
    rows = conn.execute("SELECT seq, change_id FROM registry_feed WHERE owner_id = 'op-a' "
                        "ORDER BY random() LIMIT 1000").fetchall()
    conn.executemany("INSERT INTO registry_submissions (operator_id, change_id, digest, result, "
                     "seq, received_at) VALUES ('op-a', ?, '-', 'accepted', ?, ?)",
                     [(change_id, seq, at) for seq, change_id in rows])
    conn.execute("COMMIT")
    conn.close()
    return [change_id for _seq, change_id in rows]


if __name__ == "__main__":
    main()
