#!/usr/bin/env python3
"""Benchmark: `imeisync order import` of N block orders (default 100,000).

Generates a CSV of TAC-clustered IMEIs with valid check digits, then imports it into a fresh
database through the same service the CLI uses, and prints lines per second. A reference run in
the same process times plain parsing of the file (csv + Luhn) so the ratio shows what the
store costs on top of reading the input.

    .venv/bin/python scripts/bench/import_rate.py [--lines 100000] [--database-url URL]
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
import time
from pathlib import Path

from imeisync.bootstrap import App
from imeisync.config import load_config
from imeisync.domain.imei import luhn_check_digit, parse_typed
from imeisync.services.imports import import_csv
from imeisync.services.orders import Actor


def make_csv(path: Path, lines: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    tacs = [f"{rng.randrange(10**7, 10**8):08d}" for _ in range(2000)]
    seen: set[str] = set()
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["imei", "case_ref", "police_unit", "reason", "note"])
        while len(seen) < lines:
            key = rng.choice(tacs) + f"{rng.randrange(10**6):06d}"
            if key in seen:
                continue
            seen.add(key)
            writer.writerow([key + luhn_check_digit(key), f"CASE-{len(seen)}", "Bench Police",
                             "stolen", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imeisync-bench-"))
    url = args.database_url or f"sqlite:///{work / 'bench.db'}"
    config = work / "imeisync.toml"
    config.write_text(f'[database]\nurl = "{url}"\n[police]\ntrusted_keys = "{work}"\n'
                      f'[security]\ndata_key_file = "{work / "data.key"}"\n')
    file = work / "orders.csv"
    make_csv(file, args.lines)

    started = time.perf_counter()
    with file.open(newline="", encoding="utf-8") as handle:
        for row in list(csv.reader(handle))[1:]:
            parse_typed(row[0])
    parse_only = time.perf_counter() - started

    app = App(load_config(config))
    app.db  # noqa: B018 - create the schema outside the timed part
    started = time.perf_counter()
    report = import_csv(app.intake(), file, Actor("bench", "liaison", "import"))
    elapsed = time.perf_counter() - started
    app.close()

    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"database: {url.split('://')[0]}")
    print(f"imported {report.accepted} orders in {elapsed:.2f} s "
          f"= {report.accepted / elapsed:,.0f} lines/s")
    print(f"reference: csv read + IMEI check alone {parse_only:.2f} s "
          f"({args.lines / parse_only:,.0f} lines/s); import costs {elapsed / parse_only:.1f}x that")


if __name__ == "__main__":
    main()
