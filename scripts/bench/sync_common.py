"""Shared set-up for the sync benchmarks: a registry database filled directly (fast, raw
sqlite3), the loopback lab from ``tests/support/registry_lab.py`` (real registry server,
operators with their own stores and keys), and synthetic IMEI keys sorted like real snapshots.
"""

from __future__ import annotations

import random
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from imeisync.registry.schema import ensure_schema  # noqa: E402
from imeisync.store.db import Database  # noqa: E402
from support.registry_lab import Lab  # noqa: E402

__all__ = ["Lab", "fill_registry", "keys", "timed"]

AT = "2026-11-21T10:00:00.000000Z"
OWNERS = (("op-a", "DK"), ("op-c", "DK"))


def keys(n: int, seed: int = 1) -> list[str]:
    """``n`` distinct 14-digit keys, TAC-clustered (3,000 models), sorted."""
    rng = random.Random(seed)
    tacs = sorted(rng.sample(range(10_000_000, 99_999_999), 3000))
    per_tac = n // len(tacs) + 1
    out: list[str] = []
    for tac in tacs:
        for serial in rng.sample(range(1_000_000), min(per_tac, n - len(out))):
            out.append(f"{tac:08d}{serial:06d}")
        if len(out) >= n:
            break
    out.sort()
    return out


def fill_registry(url: str, n_inserts: int, n_removes: int = 0, *, seed: int = 1) -> int:
    """Fill an empty SQLite registry database: ``n_inserts`` inserts (open records) by op-a and
    op-c in random order, then ``n_removes`` removes of some of them. Returns the head seq."""
    db = Database(url)
    ensure_schema(db)
    db.dispose()
    path = url.removeprefix("sqlite:///")
    rng = random.Random(seed)
    all_keys = keys(n_inserts, seed)
    order = list(range(n_inserts))
    rng.shuffle(order)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -524288")
    conn.execute("BEGIN")
    owner_of = [OWNERS[i % 2] for i in range(n_inserts)]

    def feed_rows() -> Iterator[tuple]:
        for seq, index in enumerate(order, start=1):
            owner, country = owner_of[index]
            yield (seq, "change", all_keys[index], owner, country, f"{owner}:i{index}", "insert",
                   "block", "stolen", AT, AT)

    conn.executemany(
        "INSERT INTO registry_feed (seq, type, imei_key, owner_id, owner_country, change_id, "
        "action, kind, reason, at, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)", feed_rows())
    removed = rng.sample(range(n_inserts), n_removes)
    head = n_inserts

    def remove_rows() -> Iterator[tuple]:
        for offset, index in enumerate(removed, start=1):
            owner, country = owner_of[index]
            yield (n_inserts + offset, "change", all_keys[index], owner, country,
                   f"{owner}:r{index}", "remove", "block", "recovered", AT, AT)

    conn.executemany(
        "INSERT INTO registry_feed (seq, type, imei_key, owner_id, owner_country, change_id, "
        "action, kind, reason, at, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)", remove_rows())
    head += n_removes
    seq_of = {index: seq for seq, index in enumerate(order, start=1)}
    closed = {index: n_inserts + offset for offset, index in enumerate(removed, start=1)}

    def record_rows() -> Iterator[tuple]:
        for index in range(n_inserts):
            owner, country = owner_of[index]
            yield (all_keys[index], owner, country, "block", "stolen", seq_of[index], AT,
                   f"{owner}:i{index}", closed.get(index), AT if index in closed else None)

    conn.executemany(
        "INSERT INTO registry_records (imei_key, owner_id, owner_country, kind, reason, "
        "opened_seq, opened_at, opened_change_id, closed_seq, closed_at) "
        "VALUES (?,?,?,?,?,?,?,?,?,?)", record_rows())
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return head


class timed:
    """``with timed() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> timed:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
