#!/usr/bin/env python3
"""The attach check at ~3× its capacity (not a test; loopback only, bounded, prints figures).

1. capacity: h2load, closed loop, ``--conns`` h2c connections × ``--streams`` streams (in all
   no more than one client's share, so nothing is refused): answered checks per second;
2. overload: h2load open loop (``--rps`` per connection) at ``--factor`` × that capacity for
   ``--duration`` s, every request logged: admitted (200) p50/p99, refused (503) p50/p99 and
   share, what h2load could not even send (it is on the same 2 cores), worker RSS before/after;
3. right after: 2,000 sequential checks on a fresh connection: all 200, p50/p99 as before;
4. the server log has no error.

    .venv/bin/python scripts/bench/attach_overload.py [--short] [--workers 1] [--factor 3]
    .venv/bin/python scripts/bench/attach_overload.py --capacity-only [--src DIR]

``--src DIR`` serves from another source tree (``git archive main | tar -x -C DIR``, then
``--src DIR/src``): capacity with and without admission control on the same machine.
``--short``: 5 s of overload instead of 30. Needs h2load (Debian nghttp2-client).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eir_proc import EIC, Eir, checks, pct


def h2load(url: str, *args: str, log: Path | None = None) -> tuple[str, float]:
    cmd = ["h2load", *args, *(("--log-file", str(log)) if log else ()),
           f"{url}{EIC}?pei=imei-35209900176148&supi=imsi-238010000000001"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", done.stdout)
    return done.stdout, float(rate.group(1)) if rate else 0.0


def capacity(url: str, conns: int, streams: int, seconds: int) -> float:
    out, rate = h2load(url, "-c", str(conns), "-m", str(streams), "-D", str(seconds),
                       "--warm-up-time", "1")
    codes = re.search(r"status codes: (\d+) 2xx, \d+ 3xx, \d+ 4xx, (\d+) 5xx", out)
    if codes and int(codes.group(2)):
        print(f"  note: {codes.group(2)} refused during the capacity run", flush=True)
    return rate


def overload(eir: Eir, rate: float, args: argparse.Namespace, work: Path) -> None:
    conns = args.overload_conns
    per_conn = max(1, int(rate * args.factor / conns))
    log = work / "h2load.log"
    rss_before = eir.rss_mib()
    print(f"overload: {conns} connections × {per_conn} req/s = {conns * per_conn:,} req/s "
          f"offered ({args.factor}× {rate:,.0f}) for {args.duration}s, up to "
          f"{args.overload_streams} streams each", flush=True)
    started = time.monotonic()
    out, _ = h2load(eir.url, "-c", str(conns), "-m", str(args.overload_streams), "--rps",
                    str(per_conn), "-D", str(args.duration), log=log)
    elapsed = time.monotonic() - started
    ok, busy, other = [], [], 0
    for line in log.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        status, micros = int(fields[1]), int(fields[2])
        if status == 200:
            ok.append(micros / 1000)
        elif status == 503:
            busy.append(micros / 1000)
        else:
            other += 1
    total = len(ok) + len(busy) + other
    print(f"  sent {total:,} in {elapsed:.1f}s = {total / max(elapsed, 1e-9):,.0f} req/s "
          "achieved (h2load shares the machine)")
    print(f"  admitted (200): {len(ok):,} = {len(ok) / max(args.duration, 1):,.0f}/s, "
          f"p50 {pct(ok, 50):.2f} ms, p99 {pct(ok, 99):.2f} ms")
    print(f"  refused (503 NF_CONGESTION): {len(busy):,} ({100 * len(busy) / max(total, 1):.0f}%)"
          f", p50 {pct(busy, 50):.2f} ms, p99 {pct(busy, 99):.2f} ms; other statuses: {other}")
    errors = re.search(r"requests: .*", out)
    print(f"  h2load: {errors.group(0) if errors else '?'}")
    print(f"  worker RSS: {rss_before:.1f} MiB before, {eir.rss_mib():.1f} MiB after")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--short", action="store_true", help="5 s of overload, not 30")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--factor", type=float, default=3.0)
    parser.add_argument("--duration", type=int, default=30)
    parser.add_argument("--conns", type=int, default=8, help="capacity run connections")
    parser.add_argument("--streams", type=int, default=8, help="capacity run streams each")
    parser.add_argument("--overload-conns", type=int, default=16)
    parser.add_argument("--overload-streams", type=int, default=32)
    parser.add_argument("--capacity-only", action="store_true")
    parser.add_argument("--src", type=Path, default=None, help="serve from this source tree")
    parser.add_argument("--eir", default="", help="extra [eir] lines, e.g. 'max_inflight = 64'")
    args = parser.parse_args()
    if args.short:
        args.duration = 5
    if shutil.which("h2load") is None:
        raise SystemExit("h2load is missing: apt-get install nghttp2-client")
    print(f"attach check overload, {args.workers} worker(s), loopback; the machine may be "
          "shared: figures are indicative", flush=True)
    with tempfile.TemporaryDirectory(prefix="attach-overload-") as tmp:
        work = Path(tmp)
        eir_lines = args.eir.replace("\\n", "\n") + ("\n" if args.eir else "")
        with Eir(work / "eir", workers=args.workers, eir_lines=eir_lines, src=args.src) as eir:
            base, _ = checks(eir.url, 2000)
            print(f"unloaded: 2,000 sequential checks p50 {pct(base, 50):.3f} ms, "
                  f"p99 {pct(base, 99):.3f} ms; RSS {eir.rss_mib():.1f} MiB", flush=True)
            rate = capacity(eir.url, args.conns, args.streams, min(args.duration, 10))
            print(f"capacity: {rate:,.0f} checks/s (h2load -c {args.conns} -m {args.streams}, "
                  "closed loop)", flush=True)
            if not args.capacity_only:
                overload(eir, rate, args, work)
                after, statuses = checks(eir.url, 2000)
                print(f"right after: 2,000 sequential checks statuses {sorted(statuses)}, "
                      f"p50 {pct(after, 50):.3f} ms, p99 {pct(after, 99):.3f} ms")
            errors = eir.errors()
            print(f"server log: {len(errors)} error line(s)" + (f": {errors[:3]}" if errors
                                                                else ""))


if __name__ == "__main__":
    main()
