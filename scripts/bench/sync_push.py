#!/usr/bin/env python3
"""Benchmark: pushing the outbox to the registry (changes per second).

Operator A accepts N block orders (default 100,000) through the order intake; then
``sync push`` sends them to a real registry server on loopback in batches of 1,000 (signed,
verified, per-change results written back). The reference, in the same run, is the registry's
own ``submit`` of the same batches in-process (no HTTP, no signatures, no operator store): what
the central bookkeeping alone costs.

    .venv/bin/python scripts/bench/sync_push.py [--changes 100000]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sync_common import Lab, keys, timed

from imeisync.domain.imei import luhn_check_digit
from imeisync.domain.orders import parse_order
from imeisync.registry.config import load_registry_config
from imeisync.registry.schema import ensure_schema
from imeisync.registry.service import Registry
from imeisync.services.orders import Actor
from imeisync.store.db import Database
from imeisync.store.models import OutboxChange


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=100_000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-push-"))
    try:
        lab = Lab(folder / "lab", [("op-a", "DK"), ("op-b", "SE")])
        a = lab.operator("op-a")
        now = datetime.now(UTC)
        issued = (now - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        orders = [parse_order({
            "order_id": f"bench-{i}", "kind": "block", "imei": key + luhn_check_digit(key),
            "case_ref": f"B-{i}", "police_unit": "Bench", "reason": "stolen",
            "issued_at": issued}, now=now, max_age=timedelta(days=1))
            for i, key in enumerate(keys(args.changes, seed=3))]
        with timed() as t:
            for start in range(0, len(orders), 10_000):
                a.app.intake().apply(orders[start : start + 10_000], Actor("bench"))
        print(f"{args.changes:,} orders accepted at A in {t.seconds:.1f} s")
        lab.start()
        try:
            service = a.app.sync()
            with timed() as push:
                result = service.push()
            assert result.accepted == args.changes, result
            print(f"sync push over HTTP (batches of 1,000, signed both ways): "
                  f"{args.changes:,} changes in {push.seconds:.1f} s = "
                  f"{args.changes / push.seconds:,.0f} changes/s")
            with a.app.db.read() as s:
                states = dict(s.execute(select(OutboxChange.state, func.count())
                                        .group_by(OutboxChange.state)).all())
            print(f"outbox after: {states}")
        finally:
            lab.close()

        # reference: the registry's bookkeeping alone, in-process, fresh database
        config = load_registry_config(lab.registry_config)
        db = Database(f"sqlite:///{folder / 'reference-registry.db'}")
        ensure_schema(db)
        registry = Registry(db, config)
        member = config.members["op-a"]
        at = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        batches = [[{"change_id": f"op-a:{o.order_id}", "action": "insert", "imei": o.imei_key,
                     "kind": "block", "reason": "stolen", "at": at}
                    for o in orders[start : start + 1000]]
                   for start in range(0, len(orders), 1000)]
        with timed() as bare:
            for batch in batches:
                registry.submit(member, {"changes": batch})
        db.dispose()
        print(f"reference: Registry.submit in-process, same batches: {bare.seconds:.1f} s = "
              f"{args.changes / bare.seconds:,.0f} changes/s")
        print(f"ratio push / registry bookkeeping alone: {push.seconds / bare.seconds:.1f}x")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
