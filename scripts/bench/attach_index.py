#!/usr/bin/env python3
"""In-process benchmark of the attach index (not a test).

For each size (default 1M, 10M, 50M TAC-clustered IMEIs over 3,000 TACs):

* writes the persisted index file, then in a *fresh process* loads it and measures load time,
  resident memory added (bytes per entry) and lookups: median and p99 of single lookups
  (``AttachIndex.lookup``, timer overhead subtracted and reported), lookups per second in a
  tight loop, and the same for the full hot-path parse (``key_of_network`` + ``key_to_int``);
* for the store sizes (default 1M and 10M), fills an imeisync SQLite store with the same keys
  and times ``build_from_store`` (one streamed scan of the open records);
* extrapolates memory, load and build time linearly to 170M (the GSMA list).

Run: ``.venv/bin/python scripts/bench/attach_index.py [--sizes 1M,10M,50M] [--store-sizes 1M,10M]``
"""

from __future__ import annotations

import argparse
import array
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent / "src"))

from benchdata import clustered_index, fill_sqlite  # noqa: E402

from imeisync.adapters.attach_index import Anchor, AttachIndex  # noqa: E402

GSMA = 170_000_000
TARGET_MEDIAN_US = 2.0
TARGET_170M_BYTES = 1 << 30


def rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def parse_size(text: str) -> int:
    text = text.strip().upper()
    factor = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * factor)


def human(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 10**6 else f"{n / 1e3:g}k"


# -- child: a fresh process holding only the index ---------------------------------------


def child(index_path: str, probes_path: str) -> None:
    import gc

    from imeisync.domain.imei import key_of_network, key_to_int

    probes = array.array("Q")
    probes.frombytes(Path(probes_path).read_bytes())
    probes_list = probes.tolist()
    peis = [f"imeisv-{k:014d}{i % 100:02d}" for i, k in enumerate(probes_list[:100_000])]
    gc.collect()
    before = rss()
    started = time.perf_counter()
    index, _anchor = AttachIndex.load(Path(index_path))
    load_s = time.perf_counter() - started
    gc.collect()
    after = rss()
    lookup = index.lookup
    for k in probes_list[:20_000]:  # warm up
        lookup(k, None)
    # tight loop
    t0 = time.perf_counter()
    for k in probes_list:
        lookup(k, None)
    tight_s = time.perf_counter() - t0
    # single lookups, timer overhead measured the same way
    pc = time.perf_counter_ns
    samples, empty = [], []
    for k in probes_list[:200_000]:
        a = pc()
        lookup(k, None)
        samples.append(pc() - a)
    for _k in probes_list[:200_000]:
        a = pc()
        empty.append(pc() - a)
    overhead = statistics.median(empty)
    samples.sort()
    # the hot path's parse + lookup
    t0 = time.perf_counter()
    for pei in peis:
        lookup(key_to_int(key_of_network(pei)), None)
    parse_s = time.perf_counter() - t0
    print(json.dumps({
        "load_s": load_s,
        "rss_before": before,
        "rss_after": after,
        "entries": len(index),
        "median_ns": samples[len(samples) // 2] - overhead,
        "p99_ns": samples[int(len(samples) * 0.99)] - overhead,
        "timer_overhead_ns": overhead,
        "lookups_per_s": len(probes_list) / tight_s,
        "parse_lookup_ns": parse_s / len(peis) * 1e9,
    }))


# -- parent ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M,10M,50M")
    parser.add_argument("--store-sizes", default="1M,10M",
                        help="sizes also written to SQLite to time the build from the store")
    parser.add_argument("--tacs", type=int, default=3000)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    parser.add_argument("--child", nargs=2, metavar=("INDEX", "PROBES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    store_sizes = {parse_size(s) for s in args.store_sizes.split(",") if s}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="imeisync-bench-index-"))
    workdir.mkdir(parents=True, exist_ok=True)
    command = shlex.join([sys.executable, *sys.argv])
    print(f"# {command}")
    print(f"# workdir {workdir}; {os.cpu_count()} cores; python {sys.version.split()[0]}")
    results = []
    for n in sizes:
        print(f"\n== {human(n)} entries, {args.tacs} TACs", flush=True)
        data = clustered_index(n, tacs=args.tacs)
        entries = len(data.blocked) + len(data.tracked)
        print(f"generated {entries:,} keys ({len(data.tracked):,} tracked) in {data.seconds:.1f}s")
        index = AttachIndex(data.blocked, data.tracked, {}, seq=1)
        path = workdir / f"index-{human(n)}.bin"
        started = time.perf_counter()
        size = index.save(path, Anchor(1, "00000000000000", "2026-01-01"))
        save_s = time.perf_counter() - started
        probes = data.present[:200_000] + data.absent[:200_000]
        random.Random(2).shuffle(probes)
        probes_path = workdir / f"probes-{human(n)}.bin"
        probes_path.write_bytes(array.array("Q", probes).tobytes())
        row = {"n": entries, "file_bytes": size, "save_s": save_s}
        build = None
        if n in store_sizes:
            db_path = workdir / f"store-{human(n)}.db"
            for leftover in workdir.glob(f"store-{human(n)}.db*"):
                leftover.unlink()
            fill_s = fill_sqlite(db_path, data)
            build = build_from_sqlite(db_path, entries)
            row.update(fill_s=fill_s, build_s=build)
            print(f"store: {entries:,} records written in {fill_s:.1f}s; "
                  f"build_from_store {build:.2f}s ({build / entries * 1e9:.0f} ns/entry)")
            db_path.unlink()
        del data, index
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(path), str(probes_path)],
            capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout)
        row.update(measured)
        row["bytes_per_entry"] = (measured["rss_after"] - measured["rss_before"]) / entries
        results.append(row)
        print(f"file {size / 1e6:.1f} MB ({size / entries:.2f} B/entry), written in "
              f"{save_s:.2f}s; load {measured['load_s']:.2f}s")
        print(f"resident +{(measured['rss_after'] - measured['rss_before']) / 1e6:.1f} MB = "
              f"{row['bytes_per_entry']:.2f} B/entry")
        print(f"lookup median {measured['median_ns'] / 1000:.3f} µs, p99 "
              f"{measured['p99_ns'] / 1000:.3f} µs (timer overhead "
              f"{measured['timer_overhead_ns']} ns subtracted); "
              f"{measured['lookups_per_s'] / 1e6:.2f} M lookups/s in a loop; "
              f"parse+lookup {measured['parse_lookup_ns'] / 1000:.3f} µs")
        path.unlink()
        probes_path.unlink()
    summary(results)


def build_from_sqlite(db_path: Path, expected: int) -> float:
    from sqlalchemy import create_engine

    from imeisync.adapters.attach_index import build_from_store

    engine = create_engine(f"sqlite:///{db_path}")
    try:
        started = time.perf_counter()
        with engine.connect() as conn, conn.begin():
            index, _anchor = build_from_store(conn)
        seconds = time.perf_counter() - started
    finally:
        engine.dispose()
    assert len(index.blocked) + len(index.tracked) == expected, "store and index disagree"
    return seconds


def summary(results: list[dict]) -> None:
    print("\n== summary")
    print(f"{'entries':>10} {'B/entry RSS':>11} {'B/entry file':>12} {'load s':>7} "
          f"{'build s':>8} {'median µs':>10} {'p99 µs':>7} {'M lookups/s':>11}")
    for r in results:
        build = f"{r['build_s']:.2f}" if "build_s" in r else "-"
        print(f"{human(r['n']):>10} {r['bytes_per_entry']:>11.2f} "
              f"{r['file_bytes'] / r['n']:>12.2f} {r['load_s']:>7.2f} {build:>8} "
              f"{r['median_ns'] / 1000:>10.3f} {r['p99_ns'] / 1000:>7.3f} "
              f"{r['lookups_per_s'] / 1e6:>11.2f}")
    largest = results[-1]
    per_entry = max(largest["bytes_per_entry"], largest["file_bytes"] / largest["n"])
    print(f"\nextrapolated to {GSMA / 1e6:.0f}M (from {human(largest['n'])}): "
          f"~{per_entry * GSMA / 2**20:.0f} MiB resident "
          f"(target ≤ {TARGET_170M_BYTES / 2**20:.0f} MiB: "
          f"{'met' if per_entry * GSMA <= TARGET_170M_BYTES else 'MISSED'}), "
          f"load ~{largest['load_s'] * GSMA / largest['n']:.1f}s")
    builds = [r for r in results if "build_s" in r]
    if builds:
        b = builds[-1]
        print(f"build from the store at {GSMA / 1e6:.0f}M ~{b['build_s'] * GSMA / b['n']:.0f}s "
              f"(linear from {human(b['n'])}, SQLite)")
    at = [r for r in results if r["n"] >= 49_000_000] or results[-1:]
    median_us = at[-1]["median_ns"] / 1000
    met = "met" if median_us <= TARGET_MEDIAN_US else "MISSED"
    print(f"lookup median at {human(at[-1]['n'])}: {median_us:.3f} µs "
          f"(target ≤ {TARGET_MEDIAN_US} µs: {met})")


if __name__ == "__main__":
    main()
