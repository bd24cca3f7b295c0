#!/usr/bin/env python3
"""Benchmark: the police API flooded with bad tokens while the attach check and a legitimate
liaison request are measured (issue 15), on loopback.

A real daemon (``imeisync run``: attach-check workers in their own processes, the police API
and console in the daemon) on PostgreSQL (a throwaway cluster; ``--sqlite`` for the embedded
store). First the attach check is measured alone (sequential HTTP/1.1 keep-alive requests,
p50/p99); then ``--flooders`` processes hammer ``GET /api/v1/orders`` with bad tokens as fast as
they can from another loopback address (127.0.0.2: an attacker is not the liaison office),
and the attach check is measured again, with a liaison token's device look-up every 0.2 s.
Printed: the flood's rate and its answers (401 then 429), attach p50/p99 unloaded vs flooded,
the liaison requests' statuses and latency, and (PostgreSQL) the most database connections
the daemon held during the flood.

    .venv/bin/python scripts/bench/police_flood.py [--short] [--sqlite] [--flooders 2]

The machine may be shared: the flooders, the API and the attach check compete for the same
cores, so the figures are an upper bound of the interference, and vary between runs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
from flood_common import FLOOD_FROM, Flood, percentile  # noqa: E402

from imeisync.bootstrap import App  # noqa: E402
from imeisync.config import load_config  # noqa: E402
from imeisync.domain.imei import luhn_check_digit  # noqa: E402
from support.daemon_harness import EIC, Daemon, daemon_config  # noqa: E402
from support.registry_lab import Lab  # noqa: E402


def imei(n: int) -> str:
    key = f"35209900{n:06d}"
    return key + luhn_check_digit(key)


def attach_latencies(base: str, count: int) -> list[float]:
    """Sequential attach checks on one keep-alive connection: seconds each."""
    out = []
    with httpx.Client(base_url=base, timeout=5) as client:
        for n in range(count):
            started = time.perf_counter()
            answer = client.get(EIC, params={"pei": f"imei-{imei(n % 1000)}"})
            out.append(time.perf_counter() - started)
            assert answer.status_code == 200, answer.text
    return out


def liaison_probe(api: str, token: str, device: str, stop: threading.Event,
                  results: list[tuple[int, float]]) -> None:
    with httpx.Client(base_url=api, timeout=10,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        while not stop.wait(0.2):
            started = time.perf_counter()
            status = client.get(f"/api/v1/devices/{device}").status_code
            results.append((status, time.perf_counter() - started))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--short", action="store_true", help="fewer requests, a 5 s flood")
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    parser.add_argument("--flooders", type=int, default=2, help="flooding processes")
    parser.add_argument("--connections", type=int, default=16, help="per flooding process")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness of the flooders (e.g. 19: their CPU is not ours, as an "
                             "attacker's elsewhere would not be)")
    args = parser.parse_args()
    checks = 1000 if args.short else 4000
    folder = Path(tempfile.mkdtemp(prefix="bench-police-flood-"))
    pg = None
    database_url = None
    if not args.sqlite:
        from support.pg_server import ThrowawayPostgres

        pg = ThrowawayPostgres()
        pg.start()
        database_url = pg.create_database("flood")
    lab = Lab(folder / "lab", [("op-a", "DK")])
    daemon = None
    try:
        lab.start()
        config, eir_port, api_port = daemon_config(lab, "op-a", database_url,
                                                   push="1h", pull="1h")
        app = App(load_config(config))
        token = app.tokens.add("liaison-bench", "liaison", created_by="bench")[0]
        app.close()
        daemon = Daemon(config, eir_port, api_port).start()
        device = imei(1)
        answer = httpx.post(daemon.api + "/api/v1/orders", headers={
            "Authorization": f"Bearer {token}"}, json={
            "imei": device, "case_ref": "B-1", "police_unit": "U", "reason": "stolen"})
        assert answer.status_code == 201, answer.text
        attach_latencies(daemon.eir, 200)  # warm up
        quiet = attach_latencies(daemon.eir, checks)
        calm: list[tuple[int, float]] = []
        calm_stop = threading.Event()
        calm_probe = threading.Thread(target=liaison_probe,
                                      args=(daemon.api, token, device, calm_stop, calm))
        calm_probe.start()
        time.sleep(3.1)
        calm_stop.set()
        calm_probe.join()

        seconds = 5.0 if args.short else 15.0
        request = (b"GET /api/v1/orders HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   b"Authorization: Bearer isk_" + b"A" * 43 + b"\r\n\r\n")
        flood = Flood(api_port, request, processes=args.flooders,
                      connections=args.connections, seconds=seconds, nice=args.nice)
        stop = threading.Event()
        liaison: list[tuple[int, float]] = []
        probe = threading.Thread(target=liaison_probe,
                                 args=(daemon.api, token, device, stop, liaison))
        connections: list[int] = []

        def count_connections() -> None:
            import psycopg

            admin = database_url.replace("postgresql+psycopg", "postgresql")  # type: ignore
            with psycopg.connect(admin, autocommit=True) as conn:
                while not stop.wait(0.25):
                    connections.append(conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND pid <> pg_backend_pid()").fetchone()[0])

        watchers = [probe] + ([threading.Thread(target=count_connections)] if pg else [])
        started = time.perf_counter()
        flood.start()
        for thread in watchers:
            thread.start()
        time.sleep(0.5)
        flooded = attach_latencies(daemon.eir, checks)
        counts = flood.join()
        elapsed = time.perf_counter() - started
        stop.set()
        for thread in watchers:
            thread.join()
        health = daemon.health()

        total = sum(counts.values())
        print(f"police API flood: {total} requests in {elapsed:.1f} s = {total / elapsed:,.0f}/s "
              f"from {FLOOD_FROM} ({args.flooders} processes x {args.connections} connections, "
              f"nice {args.nice}); answers {counts}")
        for name, values in (("unloaded", quiet), ("flooded", flooded)):
            print(f"attach check {name:9}: n={len(values)} p50={percentile(values, .5)*1e3:.2f} ms"
                  f" p99={percentile(values, .99)*1e3:.2f} ms")
        ratio = percentile(flooded, .99) / percentile(quiet, .99)
        print(f"attach p99 flooded/unloaded: {ratio:.2f}x (target: within 1.10x)")
        for name, probes in (("unloaded", calm), ("flooded", liaison)):
            statuses: dict[int, int] = {}
            for status, _ in probes:
                statuses[status] = statuses.get(status, 0) + 1
            times = [t for _, t in probes]
            if times:
                print(f"liaison device look-ups {name:9}: {statuses}; "
                      f"p50={statistics.median(times)*1e3:.1f} ms "
                      f"max={max(times)*1e3:.1f} ms")
        if connections:
            print(f"database connections held by the daemon during the flood: "
                  f"max {max(connections)}, mean {statistics.mean(connections):.1f}")
        print(f"API /healthz after the flood: database reachable = "
              f"{health.get('database', {}).get('reachable')}")
        print("(a shared 2-core machine: flooders, API and attach check share the cores)")
    finally:
        if daemon is not None:
            daemon.stop()
        lab.close()
        if pg is not None:
            pg.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
