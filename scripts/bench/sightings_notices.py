#!/usr/bin/env python3
"""Benchmark: sighting notices between operators (notices per second), against the changes'
push in the same run.

Operator A accepts N track orders (default 20,000) and pushes them — the reference: changes
per second over the same HTTP path. Operator B pulls them, then holds N pending ``sent``
notices (as the sighting writer leaves them) and ``sync push`` sends them to the real registry
on loopback in batches of 1,000 (signed, verified, each checked against the open track
records); A's ``sync pull`` turns the N ``sighting`` feed entries into received notices, each
with its audit event.

    .venv/bin/python scripts/bench/sightings_notices.py [--notices 20000]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert
from sync_common import Lab, keys, timed

from imeisync.domain.imei import luhn_check_digit
from imeisync.domain.orders import parse_order
from imeisync.services.orders import Actor
from imeisync.store.models import SightingNotice


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--notices", type=int, default=20_000)
    args = parser.parse_args()
    n = args.notices
    folder = Path(tempfile.mkdtemp(prefix="bench-sightings-"))
    try:
        lab = Lab(folder / "lab", [("op-a", "DK"), ("op-b", "SE")])
        a, b = lab.operator("op-a"), lab.operator("op-b")
        now = datetime.now(UTC)
        issued = (now - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        tracked = keys(n, seed=5)
        orders = [parse_order({
            "order_id": f"bench-{i}", "kind": "track", "imei": key + luhn_check_digit(key),
            "case_ref": f"T-{i}", "police_unit": "Bench", "reason": "stolen",
            "issued_at": issued}, now=now, max_age=timedelta(days=1))
            for i, key in enumerate(tracked)]
        for start in range(0, n, 10_000):
            # as if each had come police-signed (the signature's cost is not what is measured)
            a.app.intake().apply(orders[start : start + 10_000], Actor("bench"), kid="bench")
        lab.start()
        try:
            with timed() as changes:
                assert a.app.sync().push().accepted == n
            print(f"reference, A's push of {n:,} track changes: {changes.seconds:.2f} s = "
                  f"{n / changes.seconds:,.0f} changes/s")
            assert b.app.sync().pull().opened == n
            seen = now - timedelta(seconds=30)
            with b.app.db.write() as s:
                s.execute(insert(SightingNotice), [
                    {"notice_id": uuid.uuid4().hex, "direction": "sent", "imei_key": key,
                     "owner_id": "op-a", "reporter_id": "op-b", "reporter_country": "SE",
                     "seen_at": seen, "state": "pending", "attempts": 0} for key in tracked])
            with timed() as push:
                result = b.app.sync().push().sightings
            assert result is not None and result.accepted == n, result
            print(f"B's push of {n:,} sighting notices: {push.seconds:.2f} s = "
                  f"{n / push.seconds:,.0f} notices/s ({changes.seconds / push.seconds:.2f}x "
                  "the changes' rate)")
            with timed() as pull:
                pulled = a.app.sync().pull()
            assert pulled.sightings == n, pulled
            print(f"A's pull of {n:,} sighting entries into received notices: "
                  f"{pull.seconds:.2f} s = {n / pull.seconds:,.0f} notices/s")
        finally:
            lab.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
