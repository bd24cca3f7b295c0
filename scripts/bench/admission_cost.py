#!/usr/bin/env python3
"""What admission control adds to one attach check inside the app (not a test).

Drives the RSGI handler (``EirApp.__rsgi__``) in process, on uvloop, the way Granian calls it:
one coroutine per check, a loop iteration every ``--batch`` checks (so batches stay below a
client's share and the fast path is what is timed). Run it against this tree and against
another (``--src``, e.g. ``git archive main src | tar -x -C /tmp/main``) to compare; the two
run interleaved, ``--reps`` times each, the median reported.

    .venv/bin/python scripts/bench/admission_cost.py [--src /tmp/main/src] [--checks 500000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = r"""
import asyncio, sys, time
import uvloop
from imeisync.domain.verdict import Status
from imeisync.entrypoints.eir import EIC_PATH, create_app

class Lookup:  # the in-memory index's answer shape, without the index
    def lookup(self, key, imsi): return Status.BLACKLISTED
    def health(self): return {"ready": True}
    ready = True
    def stop(self): pass

class Scope:
    path, method, client = EIC_PATH, "GET", "10.0.0.7:40000"
    query_string = "pei=imei-352099001761481&supi=imsi-238010000000001"

class Proto:
    def response_bytes(self, status, headers, body): pass

async def run(checks, batch):
    handle, scope, proto = create_app(Lookup()).__rsgi__, Scope(), Proto()
    started = time.perf_counter()
    for n in range(checks // batch):
        for _ in range(batch):
            await handle(scope, proto)
        await asyncio.sleep(0)
    return (time.perf_counter() - started) / checks * 1e9

print(uvloop.run(run(int(sys.argv[1]), int(sys.argv[2]))))
"""


def once(src: Path, checks: int, batch: int) -> float:
    env = {"PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", PROGRAM, str(checks), str(batch)],
                          capture_output=True, text=True, check=True, env=env)
    return float(done.stdout.strip())


def gate_ops(reps: int) -> float:
    """The fast path's own operations (read, compare, compare, store), timed alone: best of
    ``reps`` timeit runs, minus the same loop without them; ns per check."""
    import timeit

    setup = "gate = [0]; fast = 1 << 60"
    check = "n = gate[0]\nif n < fast:\n    if not n: pass\n    gate[0] = n + 1"
    number = 1_000_000
    with_ops = min(timeit.repeat(check, setup, number=number, repeat=reps))
    without = min(timeit.repeat("pass", setup, number=number, repeat=reps))
    return (with_ops - without) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--src", type=Path, default=None, help="the tree to compare with")
    parser.add_argument("--checks", type=int, default=500_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    trees = {"this tree": ROOT / "src"}
    if args.src:
        trees["--src"] = args.src
    runs: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(args.reps):
        for name, src in trees.items():
            runs[name].append(once(src, args.checks, args.batch))
    print(f"attach check inside the app, {args.checks:,} checks, a loop iteration every "
          f"{args.batch}; machine may be shared")
    print(f"  the admission fast path alone: {gate_ops(args.reps * 3):.0f} ns per check")
    for name, values in runs.items():
        print(f"  {name}: best {min(values):.0f} ns, median {statistics.median(values):.0f} ns "
              "per check "
              f"(runs {', '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
