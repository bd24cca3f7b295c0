#!/usr/bin/env python3
"""Benchmark (not a test): what recording sightings costs the attach check.

One imeisync attach-check server (``python -m imeisync.entrypoints.eir``, one worker) on
127.0.0.1 over a SQLite store of ``--entries`` TAC-clustered records (5% tracked; ours, so every
check of a tracked device may be a sighting). h2load (h2c, prior knowledge, ``--connections``
connections, one thread) runs, interleaved ``--reps`` times:

* ``none``  -- 20,000 distinct queries, half listed (blocked), half unknown: no sighting;
* ``10%``   -- the same, with 10% of them replaced by checks of tracked devices (500 devices, 4
               subscribers each): the hook, the local dedupe, the queue and the writer at work.

Target: ``10%`` within 5% of ``none`` in throughput and p99 (issue 13). Then two floods of one
tracked device for ``--duration`` seconds each, the queue depth sampled every 0.2 s: with one
subscriber (one sighting, every other check deduplicated in memory) and with a new subscriber on
every check (at most 16 queued per device per minute, the rest dropped and counted): the queue
must never grow past what one device may queue, and the p99 stays that of ``none``.

    .venv/bin/python scripts/bench/sightings.py [--entries 200000] [--duration 10] [--reps 3]

Before the servers, the same query mixes drive the RSGI app in this process (no network, no
load generator): the hot path's own cost per check with the sighting hook vs without it, and
the writer thread's CPU per recorded sighting -- figures the machine's noise hardly moves.

Installs nothing: needs h2load (Debian nghttp2-client; scripts/bench/attach_http.sh installs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))

from attach_http import EIC, Proc, free_port, median_run, run_h2load, wait_answer  # noqa: E402

QUERIES = 20_000
TRACKED_DEVICES, SUBSCRIBERS = 500, 4
TARGET = 0.05


def sightings_of(port: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "tests"))
    from support.sightings_lab import figures_of

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return figures_of(response.read().decode(), "n5g-eir")


def prepare(workdir: Path, entries: int) -> tuple[Path, list[str], list[int]]:
    from benchdata import clustered_index, fill_sqlite

    db = workdir / "store.db"
    data = clustered_index(entries, probes=QUERIES // 2)
    seconds = fill_sqlite(db, data, owner="op-dk")  # our own records: tracked ones sighted
    print(f"store: {entries:,} records in {seconds:.0f}s ({len(data.tracked):,} tracked)")
    rng = random.Random(5)
    listed = [k for k in data.present if k not in data.tracked]
    base = []
    for i, key in enumerate(listed[:QUERIES // 2] + data.absent[:QUERIES // 2]):
        base.append(f"{EIC}?pei=imeisv-{key:014d}{i % 100:02d}"
                    f"&supi=imsi-23801{rng.randrange(10**10):010d}")
    rng.shuffle(base)
    return db, base, list(data.tracked)[:TRACKED_DEVICES + 1]  # the last: the floods'


def uris_file(workdir: Path, name: str, lines: list[str], port: int) -> Path:
    path = workdir / f"{name}.uris"
    path.write_text("\n".join([f"http://127.0.0.1:{port}{lines[0]}", *lines[1:]]) + "\n")
    return path


def mixed_queries(base: list[str], tracked: list[int], network: str) -> list[str]:
    """``base`` with every tenth query a tracked device's, its subscriber on ``network``."""
    mixed = list(base)
    for i in range(0, len(mixed), 10):
        key = tracked[(i // 10) % TRACKED_DEVICES]
        mixed[i] = (f"{EIC}?pei=imeisv-{key:014d}07"
                    f"&supi=imsi-{network}{(i // 10 // TRACKED_DEVICES) % SUBSCRIBERS:08d}")
    return mixed


class _Scope:
    __slots__ = ("client", "method", "path", "proto", "query_string")

    def __init__(self, uri: str):
        self.proto, self.method, self.client = "http", "GET", "127.0.0.1:40000"
        self.path, _, self.query_string = uri.partition("?")


class _Proto:
    def response_bytes(self, status: int, headers: Any, body: bytes) -> None:
        pass


def in_process(config: Path, base: list[str], mixed: list[str], reps: int) -> None:
    """The hook's own cost (ns per check through ``EirApp.__rsgi__``, the writer not running,
    so it cannot compete for the interpreter), then the writer's CPU per recorded sighting
    (draining what the passes queued)."""
    import asyncio

    from imeisync.bootstrap import index_keeper
    from imeisync.config import load_config
    from imeisync.entrypoints.eir import KeeperLookup, create_app
    from imeisync.services.sighting_writer import capture, in_index_ranges

    settings = load_config(config)
    keeper = index_keeper(settings).start(follow=False)
    lookup = KeeperLookup(keeper)
    writer = capture(settings, "n5g-eir", "bench", in_range=in_index_ranges(keeper))
    writer.stop()  # started by capture: stopped at once, drained below by hand
    apps = {"without hook": create_app(lookup), "with hook": create_app(lookup, sightings=writer)}
    scopes = {"none": [_Scope(u) for u in base], "10%": [_Scope(u) for u in mixed]}
    proto = _Proto()

    async def drive(handler: Any, batch: list[_Scope]) -> float:
        # CPU time of this thread: on a shared machine wall time would measure the others.
        started = time.thread_time()
        for scope in batch:
            await handler(scope, proto)
        return time.thread_time() - started

    loop = asyncio.new_event_loop()
    ns: dict[tuple[str, str], list[float]] = {}
    for _ in range(reps):
        for app_name, app in apps.items():
            for mix, batch in scopes.items():
                seconds = loop.run_until_complete(drive(app.__rsgi__, batch))
                ns.setdefault((app_name, mix), []).append(seconds / len(batch) * 1e9)
    loop.close()
    queued = len(writer.queue)
    cpu = time.thread_time()
    while len(writer.queue):
        writer.write_once()
    cpu = time.thread_time() - cpu
    keeper.stop(persist=False)
    snap = writer.figures.snapshot()
    print(f"\nin process, {reps} interleaved passes of {len(base):,} checks each, median CPU "
          "ns per check through EirApp.__rsgi__ (the writer idle):")
    for (app_name, mix), values in ns.items():
        print(f"  {app_name:13} {mix:5} {_median(values):8.0f} ns  "
              f"({', '.join(f'{v:.0f}' for v in values)})")
    base_ns = _median(ns[("without hook", "10%")])
    print(f"  the hook on the 10% mix: x{_median(ns[('with hook', '10%')]) / base_ns:.3f} "
          f"(deduplicated in memory: {snap['deduplicated']:,}, queued: {queued:,})")
    print(f"  the writer: {cpu * 1000:.0f} ms CPU for {snap['recorded']:,} sighting(s) "
          f"recorded, {cpu * 1000 / max(1, snap['recorded']):.3f} ms each")


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def sample_depth(port: int, stop: threading.Event, found: list[float]) -> None:
    while not stop.wait(0.2):
        with contextlib.suppress(OSError):
            found.append(sightings_of(port).get("queue_depth", 0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--paced-rate", type=int, default=5000,
                        help="also compare latency at this fixed total rate (0 to skip)")
    args = parser.parse_args()
    print(f"# {shlex.join([sys.executable, *sys.argv])}")
    print(f"# {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start "
          "(a shared machine: other processes compete for the cores)")
    with tempfile.TemporaryDirectory(prefix="imeisync-bench-sightings-") as folder:
        workdir = Path(folder)
        db, base, tracked = prepare(workdir, args.entries)
        port = free_port()
        config = workdir / "imeisync.toml"
        config.write_text(
            f'[operator]\nid = "op-dk"\ncountry = "DK"\n[database]\nurl = "sqlite:///{db}"\n'
            f'[security]\ndata_key_file = "{workdir / "data.key"}"\n'
            f'[police]\ntrusted_keys = "{workdir}"\n'
            f'[eir]\nlisten = "127.0.0.1:{port}"\nworkers = 1\n'
            f'index_file = "{workdir / "attach-index.bin"}"\n')
        in_process(config, base, mixed_queries(base, tracked, "2380200"), args.reps)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        env.pop("IMEISYNC_CONFIG", None)
        server = Proc("eir", [sys.executable, "-m", "imeisync.entrypoints.eir", "--config",
                              str(config), "--workers", "1"], workdir / "eir.log", env)
        try:
            wait_answer(f"http://127.0.0.1:{port}/healthz", server)
            run(args, workdir, port, base, tracked, db)
        finally:
            server.stop()


def run(args: argparse.Namespace, workdir: Path, port: int, base: list[str],
        tracked: list[int], db: Path) -> None:
    rng = random.Random(9)
    mixed = mixed_queries(base, tracked, "2380100")  # other subscribers than in_process'
    runs: dict[str, list[dict[str, Any]]] = {}
    rates = (0, args.paced_rate) if args.paced_rate else (0,)
    for _ in range(args.reps):  # interleaved: the machine's noise hits both alike
        for rate in rates:
            for name, lines in (("none", base), ("10%", mixed)):
                label = f"{name} @{rate}/s" if rate else name
                runs.setdefault(label, []).append(run_h2load(
                    port, uris_file(workdir, name, lines, port), args, None, workdir,
                    rate=rate))
    print(f"\n{'queries':14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}  (median of "
          f"{args.reps} by req/s; every run's req/s / p99 ms)")
    for label, found in runs.items():
        r = median_run(found)
        every = ", ".join(f"{x['rps']:.0f}/{x['p99_ms']:.2f}" for x in found)
        print(f"{label:14} {r['rps']:8.0f} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} "
              f"{r['errors']:7d}  ({every})")
    for suffix in ("", f" @{args.paced_rate}/s") if args.paced_rate else ("",):
        none, ten = runs["none" + suffix], runs["10%" + suffix]
        ratio = median_run(ten)["rps"] / median_run(none)["rps"]
        p99 = _median([x["p99_ms"] for x in ten]) / max(_median([x["p99_ms"] for x in none]),
                                                        1e-9)
        print(f"10% tracked vs none{suffix}: throughput x{ratio:.3f}, median p99 x{p99:.3f} "
              f"(target within {TARGET:.0%}: "
              f"{'met' if ratio >= 1 - TARGET and p99 <= 1 + TARGET else 'NOT met'})")
    print(f"h2load: {runs['none'][0]['cmd']}")
    print(f"sightings after the mixed runs: {json.dumps(sightings_of(port))}")
    key = tracked[-1]
    for name, make in (
            ("one subscriber", lambda n: f"imsi-238010000{0:06d}"),
            ("a new subscriber each check", lambda n: f"imsi-23802{rng.randrange(10**10):010d}")):
        lines = [f"{EIC}?pei=imeisv-{key:014d}08&supi={make(n)}" for n in range(QUERIES)]
        deadline = time.monotonic() + 30
        while sightings_of(port).get("queue_depth") and time.monotonic() < deadline:
            time.sleep(0.2)  # the runs before written: the flood's figures are its own
        before = sightings_of(port)
        depths: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_depth, args=(port, stop, depths))
        sampler.start()
        flood = run_h2load(port, uris_file(workdir, "flood", lines, port), args, None, workdir)
        stop.set()
        sampler.join()
        time.sleep(1)
        after = sightings_of(port)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if k != "queue_depth"}
        print(f"flood of one tracked device, {name}: {flood['rps']:.0f} req/s, p99 "
              f"{flood['p99_ms']:.3f} ms, queue depth max {max(depths or [0]):.0f} "
              f"({len(depths)} samples); figures: {json.dumps(delta)}")
    conn = sqlite3.connect(db)
    stored = conn.execute("SELECT count(*) FROM sightings").fetchone()[0]
    conn.close()
    print(f"sightings in the store: {stored}")


if __name__ == "__main__":
    main()
