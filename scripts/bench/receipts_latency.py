#!/usr/bin/env python3
"""Benchmark: a lift at operator A → "applied everywhere" in A's order progress, on loopback.

The real registry server and three operators (A, B, C) on SQLite. B and C pull every 2 s (each
pull acknowledges the applied position); A runs its pull job every 2 s too (pull, then poll the
receipts of its changes not yet applied everywhere), as the daemon does. A pushes right after
each accepted lift (the daemon's push-on-accept). The latency of each lift is from the moment A
accepted it to the moment A's stored receipt says every recipient applied it. Target (issue
12): median ≤ 5 s.

    .venv/bin/python scripts/bench/receipts_latency.py [--lifts 20] [--pull-interval 2]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import select
from sync_common import Lab

from imeisync.domain.imei import luhn_check_digit
from imeisync.services.orders import Actor
from imeisync.store.models import ChangeReceipt, OutboxChange


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lifts", type=int, default=20)
    parser.add_argument("--pull-interval", type=float, default=2.0)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-receipts-"))
    rng = random.Random(12)
    lab = Lab(folder / "lab", [("op-a", "DK"), ("op-b", "SE"), ("op-c", "NO")])
    lab.start()
    stop = threading.Event()
    try:
        a, b, c = lab.operator("op-a"), lab.operator("op-b"), lab.operator("op-c")
        syncs = {op.id: op.app.sync() for op in (a, b, c)}
        numbers = []
        for i in range(args.lifts):
            key14 = f"35{rng.randrange(10**11, 10**12):012d}"
            numbers.append(key14 + luhn_check_digit(key14))
            a.app.intake().submit_unsigned({"imei": numbers[-1], "case_ref": f"R-{i}",
                                            "police_unit": "Bench", "reason": "stolen"},
                                           Actor("bench"))
        syncs["op-a"].push()
        for op in (b, c):
            syncs[op.id].pull()

        def job(op_id: str) -> None:
            sync = syncs[op_id]
            while not stop.wait(args.pull_interval * rng.uniform(0.9, 1.1)):
                sync.pull()
                if op_id == "op-a":
                    sync.receipts()

        threads = [threading.Thread(target=job, args=(op,), daemon=True)
                   for op in ("op-a", "op-b", "op-c")]
        for thread in threads:
            thread.start()
        latencies = []
        for number in numbers:
            time.sleep(rng.uniform(0.2, 1.0))
            order_id = a.app.intake().submit_signed(lab.police_order("lift", number),
                                                    Actor("bench")).order_id
            accepted = time.perf_counter()
            syncs["op-a"].push()
            while True:
                with a.app.db.read() as s:
                    done = s.execute(select(ChangeReceipt.complete).join(
                        OutboxChange, OutboxChange.change_id == ChangeReceipt.change_id)
                        .where(OutboxChange.order_id == order_id)).scalar_one_or_none()
                if done:
                    latencies.append(time.perf_counter() - accepted)
                    break
                if time.perf_counter() - accepted > 60:
                    raise SystemExit(f"lift {order_id} not applied everywhere within 60 s")
                time.sleep(0.02)
        stop.set()
        latencies.sort()
        print(f"lifts: {len(latencies)}, 3 operators, pull job every {args.pull_interval:g} s")
        print(f"lift accepted at A -> applied everywhere (A's receipt): median "
              f"{statistics.median(latencies):.2f} s, p90 "
              f"{latencies[int(len(latencies) * 0.9) - 1]:.2f} s, max {latencies[-1]:.2f} s "
              f"(target: median <= 5 s)")
    finally:
        stop.set()
        lab.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
