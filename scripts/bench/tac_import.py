#!/usr/bin/env python3
"""Time ``imeisync tac import`` of a GSMA-shaped TAC file (not a test): ``--tacs`` rows
(default 100,000) with two extra columns, into a fresh SQLite store, then again over it (the
replace path: every row compared and rewritten).

Run: ``.venv/bin/python scripts/bench/tac_import.py [--tacs 100000]``
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tacs", type=int, default=100_000)
    args = parser.parse_args()
    print(f"# {shlex.join([sys.executable, *sys.argv])}")
    work = Path(tempfile.mkdtemp(prefix="imeisync-bench-tacs-"))
    rng = random.Random(5)
    tacs = sorted(rng.sample(range(10_000_000, 99_999_999), args.tacs))
    lines = ["tac,brand,model,marketing_name,bands"]
    lines += [f"{t},Brand{t % 97},Model {t % 9973},Phone {t % 511},LTE;NR" for t in tacs]
    csv = work / "tacs.csv"
    csv.write_text("\n".join(lines) + "\n")
    config = work / "imeisync.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{work / "imeisync.db"}"\n')
    command = [str(Path(sys.executable).with_name("imeisync")), "--config", str(config), "--json",
               "tac", "import", str(csv)]
    for label in ("into an empty table", "replacing the same table"):
        started = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True, check=True,
                             cwd=HERE.parent.parent)
        wall = time.perf_counter() - started
        result = json.loads(out.stdout)
        print(f"{args.tacs:,} TACs {label}: {result['seconds']:.2f} s in the command "
              f"({wall:.2f} s with process start-up); added {result['added']:,}, "
              f"unchanged {result['unchanged']:,}")


if __name__ == "__main__":
    main()
