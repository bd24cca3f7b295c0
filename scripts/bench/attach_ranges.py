#!/usr/bin/env python3
"""Ranges in the attach index: lookup time and memory with ranges against singles alone
(not a test).

Builds ``--singles`` TAC-clustered single IMEIs (default 50M, as ``attach_index.py``), saves
them as an index file, then adds ``--ranges`` ranges (default 100,000) of 1..``--max-len``
consecutive serials (default 10,000) inside one TAC each -- half in TACs that hold singles,
half in others -- the way ``build_from_store`` adds a range record (``add_range`` into the
index's range bitmaps; ``--merged`` puts them into the singles' bitmaps instead, the design
without a second probe, to show what it costs in memory). Each index is then loaded in a fresh
process (``attach_index.py --child``) for resident memory and lookups; probes hit singles, range
devices, and absent keys. Prints the figures and their ratios (target: lookup median ≤ 2 µs,
memory ≤ 1.2× singles alone).

Run: ``.venv/bin/python scripts/bench/attach_ranges.py [--singles 50M] [--ranges 100000]``
"""

from __future__ import annotations

import argparse
import array
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent / "src"))

from attach_index import human, parse_size  # noqa: E402
from benchdata import SERIALS, clustered_index  # noqa: E402

from imeisync.adapters.attach_index import Anchor, AttachIndex  # noqa: E402

TARGET_MEDIAN_US = 2.0
TARGET_MEMORY_RATIO = 1.2


def measure(path: Path, probes: Path) -> dict:
    out = subprocess.run(
        [sys.executable, str(HERE / "attach_index.py"), "--child", str(path), str(probes)],
        capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--singles", default="50M")
    parser.add_argument("--ranges", type=int, default=100_000)
    parser.add_argument("--max-len", type=int, default=10_000)
    parser.add_argument("--tacs", type=int, default=3000)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--merged", action="store_true",
                        help="add ranges to the singles' bitmaps (no range bitmaps)")
    args = parser.parse_args()
    n = parse_size(args.singles)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="imeisync-bench-ranges-"))
    print(f"# {shlex.join([sys.executable, *sys.argv])}")
    print(f"# workdir {workdir}; {os.cpu_count()} cores; python {sys.version.split()[0]}")
    data = clustered_index(n, tacs=args.tacs)
    print(f"singles: {len(data.blocked) + len(data.tracked):,} keys over {args.tacs} TACs, "
          f"generated in {data.seconds:.1f}s", flush=True)
    anchor = Anchor(1, "00000000000000", "2026-01-01")
    singles = AttachIndex(data.blocked, data.tracked, {}, seq=1)
    singles_path = workdir / "singles.bin"
    singles_size = singles.save(singles_path, anchor)

    rng = random.Random(3)
    used = set(data.tacs)
    other_tacs = [t for t in rng.sample(range(10_000_000, 99_999_999), args.tacs * 2)
                  if t not in used][: args.tacs]
    from pyroaring import BitMap64

    range_blocked = data.blocked if args.merged else BitMap64()
    started = time.perf_counter()
    devices = 0
    in_range: list[int] = []
    for i in range(args.ranges):
        tac = (data.tacs if i % 2 else other_tacs)[rng.randrange(args.tacs)]
        length = rng.randint(1, args.max_len)
        first = tac * SERIALS + rng.randrange(SERIALS - length)
        range_blocked.add_range(first, first + length)  # what build_from_store does per range
        devices += length
        if len(in_range) < 100_000:
            in_range.append(first + rng.randrange(length))
    range_blocked.run_optimize()
    range_blocked.shrink_to_fit()
    add_s = time.perf_counter() - started
    with_ranges = (AttachIndex(data.blocked, data.tracked, {}, seq=1) if args.merged else
                   AttachIndex(data.blocked, data.tracked, {}, 1, range_blocked))
    ranges_path = workdir / "with-ranges.bin"
    ranges_size = with_ranges.save(ranges_path, anchor)
    where = "merged into the singles' bitmaps" if args.merged else "range bitmaps"
    print(f"ranges: {args.ranges:,} of 1..{args.max_len:,} devices ({devices:,} devices) added "
          f"in {add_s:.2f}s ({where})", flush=True)

    probes_ranges = data.present[:100_000] + data.absent[:100_000] + in_range
    random.Random(2).shuffle(probes_ranges)
    p2 = workdir / "probes.bin"
    p2.write_bytes(array.array("Q", probes_ranges).tobytes())
    del data, singles, with_ranges, range_blocked
    a = measure(singles_path, p2)  # the same probes: singles, absent keys, range devices
    b = measure(ranges_path, p2)
    for label, m, size in (("singles alone", a, singles_size), ("with ranges", b, ranges_size)):
        print(f"{label:>14}: resident +{(m['rss_after'] - m['rss_before']) / 1e6:.1f} MB, "
              f"file {size / 1e6:.1f} MB, lookup median {m['median_ns'] / 1000:.3f} µs, "
              f"p99 {m['p99_ns'] / 1000:.3f} µs, {m['lookups_per_s'] / 1e6:.2f} M lookups/s")
    mem_a = a["rss_after"] - a["rss_before"]
    mem_b = b["rss_after"] - b["rss_before"]
    ratio = mem_b / mem_a if mem_a > 0 else float("nan")
    median = b["median_ns"] / 1000
    print(f"\nmemory with ranges / singles alone: resident {ratio:.3f}, file "
          f"{ranges_size / singles_size:.3f} (target ≤ {TARGET_MEMORY_RATIO}: "
          f"{'met' if ratio <= TARGET_MEMORY_RATIO else 'MISSED'})")
    print(f"lookup median with ranges {median:.3f} µs vs {a['median_ns'] / 1000:.3f} µs "
          f"(target ≤ {TARGET_MEDIAN_US} µs: {'met' if median <= TARGET_MEDIAN_US else 'MISSED'})")
    for path in (singles_path, ranges_path, p2):
        path.unlink()
    print(f"(singles: {human(n)})")


if __name__ == "__main__":
    main()
