"""Synthetic, TAC-clustered blocklists for the attach-check benchmarks.

Real IMEIs cluster by TAC (the 8-digit device model): stolen phones are a few thousand popular
models, each with many serials. ``clustered_index(n)`` makes ``n`` keys spread over ``tacs``
TACs (default 3,000, sizes skewed like a popularity curve), 5% of them tracked rather than
blocked, and returns the bitmaps plus probe keys (present and absent ones) for lookups.
``fill_sqlite`` writes the same keys as open records into an imeisync SQLite store.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pyroaring import BitMap64

SERIALS = 1_000_000  # 6-digit SNR


@dataclass
class Synthetic:
    blocked: BitMap64
    tracked: BitMap64
    present: list[int]  # probe keys in the index
    absent: list[int]  # probe keys of the same TACs, not in the index
    tacs: list[int]
    seconds: float


def tac_sizes(n: int, tacs: int, rng: random.Random) -> list[int]:
    """Skewed sizes (Zipf-like, s=0.8) summing to n, each at most 80% of the serial space."""
    weights = [1 / (rank ** 0.8) for rank in range(1, tacs + 1)]
    total = sum(weights)
    sizes = [min(int(n * w / total), int(SERIALS * 0.8)) for w in weights]
    short = n - sum(sizes)
    i = 0
    while short > 0:  # top up the smallest ones
        room = int(SERIALS * 0.8) - sizes[-1 - i % tacs]
        add = min(short, room, max(1, n // tacs))
        sizes[-1 - i % tacs] += add
        short -= add
        i += 1
    return sizes


def clustered_index(n: int, *, tacs: int = 3000, tracked_share: float = 0.05,
                    probes: int = 200_000, seed: int = 1) -> Synthetic:
    rng = random.Random(seed)
    started = time.perf_counter()
    tac_list = sorted(rng.sample(range(10_000_000, 99_999_999), tacs))
    sizes = tac_sizes(n, tacs, rng)
    rng.shuffle(sizes)
    blocked, tracked = BitMap64(), BitMap64()
    present: list[int] = []
    absent: list[int] = []
    per_tac = max(1, probes // tacs)
    for tac, size in zip(tac_list, sizes, strict=True):
        if size == 0:
            continue
        base = tac * SERIALS
        serials = rng.sample(range(SERIALS), size)
        cut = int(size * tracked_share)
        tracked.update(sorted(base + s for s in serials[:cut]))
        keys = sorted(base + s for s in serials[cut:])
        blocked.update(keys)
        present.extend(base + s for s in rng.sample(serials, min(per_tac, size)))
        taken = set(serials)
        misses = 0
        while misses < per_tac:
            s = rng.randrange(SERIALS)
            if s not in taken:
                absent.append(base + s)
                misses += 1
    for bm in (blocked, tracked):
        bm.run_optimize()
        bm.shrink_to_fit()
    rng.shuffle(present)
    rng.shuffle(absent)
    return Synthetic(blocked, tracked, present[:probes], absent[:probes], tac_list,
                     time.perf_counter() - started)


def iter_keys(blocked: BitMap64, tracked: BitMap64) -> Iterator[tuple[str, str]]:
    for kind, bm in (("block", blocked), ("track", tracked)):
        for key in bm:
            yield f"{key:014d}", kind


def fill_sqlite(path: Path, data: Synthetic, *, owner: str = "op-se") -> float:
    """Write every key as an open record (schema by imeisync's migrations); returns seconds."""
    from imeisync.store.db import Database
    from imeisync.store.schema import ensure_schema

    db = Database(f"sqlite:///{path}")
    ensure_schema(db)
    db.dispose()
    started = time.perf_counter()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -1000000")
    opened = "2026-01-01 00:00:00.000000"
    rows = (
        (key, owner, "SE", kind, "stolen", "registry", opened, f"{owner}:{key}")
        for key, kind in iter_keys(data.blocked, data.tracked)
    )
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO records (imei_key, owner_id, owner_country, kind, reason, source, "
        "opened_at, opened_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.execute(
        "INSERT INTO change_log (imei_key, subject, op, kind, at) "
        "VALUES ('00000000000000', 'record', 'open', 'block', ?)", (opened,))
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    return time.perf_counter() - started
