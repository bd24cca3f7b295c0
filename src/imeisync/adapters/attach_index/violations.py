"""Violations you can see: attach-check answers that said BLACKLISTED for a device whose every
blocking record was closed more than a minute earlier (there should be none: a lift reaches
the index within a second).

The hot path only writes the key of each BLACKLISTED answer into the index's ring
(``AttachIndex.answered``); the follower thread, after each poll, reads the keys answered since
its last look and asks the store which of them have no open blocking record and were last
closed over ``GRACE`` seconds ago. More answers than the ring holds between two polls are
sampled (the count is then a lower bound).
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, func, select

from imeisync.adapters.attach_index.index import ANSWERED_RING, AttachIndex
from imeisync.domain.imei import int_to_key
from imeisync.store.models import Record

log = logging.getLogger("imeisync.adapters.attach_index")

GRACE = 60.0


class ViolationAudit:
    def __init__(self) -> None:
        self.count = 0
        self._index: AttachIndex | None = None
        self._read = 0

    def pending(self, index: AttachIndex) -> bool:
        return index is not self._index or index.answered_n != self._read

    def check(self, conn: Connection, index: AttachIndex, now: datetime | None = None) -> int:
        """Audit the answers given since the last check; the violations found."""
        if index is not self._index:  # rebuilt or reloaded: a new ring
            self._index, self._read = index, 0
        n = index.answered_n
        start = max(self._read, n - ANSWERED_RING)
        self._read = n
        if start >= n:
            return 0
        ring = index.answered
        answered = Counter(ring[i % ANSWERED_RING] for i in range(start, n))
        lifted = lifted_before(conn, [int_to_key(k) for k in answered],
                               (now or datetime.now(UTC)) - timedelta(seconds=GRACE))
        found = sum(answered[int(k)] for k in lifted)
        if found:
            self.count += found
            log.error("attach.violation %d BLACKLISTED answer(s) for device(s) lifted over a "
                      "minute ago: %s", found, ", ".join(sorted(lifted)[:10]))
        return found


def lifted_before(conn: Connection, keys: list[str], before: datetime) -> set[str]:
    """The keys whose blocking records are all closed, the last before ``before``."""
    found: set[str] = set()
    for start in range(0, len(keys), 500):
        found.update(conn.execute(
            select(Record.imei_key).where(Record.imei_key.in_(keys[start:start + 500]),
                                          Record.kind == "block")
            .group_by(Record.imei_key)
            .having(func.count(Record.closed_at) == func.count())
            .having(func.max(Record.closed_at) < before)).scalars())
    return found
