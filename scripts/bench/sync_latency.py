#!/usr/bin/env python3
"""Benchmark: a block at operator A → BLACKLISTED at operator B's attach check, on loopback.

Operator A pushes right after each accepted order (as the daemon's push-on-accept does);
operator B pulls every 2 seconds; B's attach check answers from its in-memory index
(``IndexKeeper``, following B's change_log every 200 ms), probed every 10 ms. N blocks are
entered at A at random intervals; the latency of each is from the moment A accepted it to the
moment B's index says BLACKLISTED. Target (issue 4): within 5 seconds.

    .venv/bin/python scripts/bench/sync_latency.py [--orders 30] [--pull-interval 2]
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

from sync_common import Lab

from imeisync.adapters.attach_index import IndexKeeper
from imeisync.domain.imei import key_to_int, luhn_check_digit
from imeisync.domain.verdict import Status
from imeisync.services.orders import Actor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, default=30)
    parser.add_argument("--pull-interval", type=float, default=2.0)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    rng = random.Random(5)
    lab = Lab(folder / "lab", [("op-a", "DK"), ("op-b", "SE")])
    lab.start()
    stop = threading.Event()
    try:
        a, b = lab.operator("op-a"), lab.operator("op-b")
        a_sync, b_sync = a.app.sync(), b.app.sync()
        b.app.db  # noqa: B018 (creates B's schema before the index reads it)
        keeper = IndexKeeper(b.app.config.database_url, None, poll_interval=0.2).start()
        accepted: dict[int, float] = {}
        seen: dict[int, float] = {}
        pulls: list[float] = []

        def puller() -> None:
            while not stop.wait(args.pull_interval):
                started = time.perf_counter()
                b_sync.pull()
                pulls.append(time.perf_counter() - started)

        def watcher() -> None:
            while not stop.is_set():
                index = keeper.index
                for key in list(accepted):
                    if key not in seen and index is not None and \
                            index.lookup(key, None) is Status.BLACKLISTED:
                        seen[key] = time.perf_counter()
                time.sleep(0.01)

        threads = [threading.Thread(target=puller, daemon=True),
                   threading.Thread(target=watcher, daemon=True)]
        for thread in threads:
            thread.start()
        pushes: list[float] = []
        for i in range(args.orders):
            time.sleep(rng.uniform(0.3, 1.5))
            key14 = f"35{rng.randrange(10**11, 10**12):012d}"
            a.app.intake().submit_unsigned({"imei": key14 + luhn_check_digit(key14),
                                            "case_ref": f"LAT-{i}", "police_unit": "Bench",
                                            "reason": "stolen"}, Actor("bench"))
            accepted[key_to_int(key14)] = time.perf_counter()
            started = time.perf_counter()
            a_sync.push()  # push follows each accepted order
            pushes.append(time.perf_counter() - started)
        deadline = time.perf_counter() + 15
        while len(seen) < len(accepted) and time.perf_counter() < deadline:
            time.sleep(0.05)
        stop.set()
        keeper.stop(persist=False)
        latencies = sorted(seen[k] - accepted[k] for k in seen)
        missing = len(accepted) - len(seen)
        print(f"{args.orders} blocks at A; B pulls every {args.pull_interval:g} s; "
              f"B's attach index polls every 0.2 s")
        print(f"push after each order: median {statistics.median(pushes) * 1000:.0f} ms, "
              f"max {max(pushes) * 1000:.0f} ms; B's pulls: median "
              f"{statistics.median(pulls) * 1000:.0f} ms")
        print(f"block at A -> BLACKLISTED at B's attach check: median "
              f"{statistics.median(latencies):.2f} s, p95 "
              f"{latencies[int(len(latencies) * 0.95) - 1]:.2f} s, max {latencies[-1]:.2f} s"
              + (f"; {missing} never seen" if missing else ""))
        print(f"target: within 5 s: {'met' if not missing and latencies[-1] <= 5 else 'MISSED'}")
    finally:
        stop.set()
        lab.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
