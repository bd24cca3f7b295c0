#!/usr/bin/env python3
"""Benchmark: the reference registry with one member hammering it while another member's push
and pull latency is measured (issue 15), on loopback.

A real registry (``imeisync registry serve``, one worker, SQLite, ``[server] member_rate``
default 20/s). Member op-b pushes one change and pulls one feed page every 0.25 s (within its
rate), first alone, then while ``--hammers`` processes send op-a's correctly signed feed
requests as fast as they can, then while they send forged ones (op-a's keyid, another key).
Printed per phase: the hammer's rate and answers (200 until the burst is spent, then 429), and
op-b's push and pull p50/p99 and statuses.

    .venv/bin/python scripts/bench/registry_flood.py [--short] [--hammers 2]

The machine may be shared: the hammers and the registry compete for the same cores, so the
figures are an upper bound of the interference, and vary between runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import requests  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from flood_common import FLOOD_FROM, Flood, percentile  # noqa: E402

from imeisync.adapters.http_signatures import OperatorAuth  # noqa: E402
from imeisync.adapters.keys import load_private_key, load_public_key  # noqa: E402
from imeisync.adapters.registry_client import RegistryClient  # noqa: E402
from imeisync.adapters.registry_retry import RetryPolicy  # noqa: E402
from support.registry_lab import Lab  # noqa: E402


def signed_request(url: str, port: int, key: Ed25519PrivateKey) -> bytes:
    """op-a's feed request, signed once and sent again and again (a signature stays valid
    for five minutes: the registry verifies it each time, as it would a fresh one)."""
    prepared = requests.Request("GET", f"{url}/v1/changes?after=0&limit=100").prepare()
    OperatorAuth(key, "op-a")(prepared)
    head = "".join(f"{k}: {v}\r\n" for k, v in prepared.headers.items())
    return (f"GET /v1/changes?after=0&limit=100 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"{head}\r\n").encode()


def member_rounds(client: RegistryClient, seconds: float, tag: str
                  ) -> tuple[list[float], list[float], dict[str, int]]:
    """op-b: push one change and pull one page every 0.25 s; latencies and outcomes."""
    pushes: list[float] = []
    pulls: list[float] = []
    outcomes: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        change = {"change_id": f"op-b:{tag}-{n}", "action": "insert",
                  "imei": f"8600{len(tag) % 10}{n:09d}",  # 14 digits, distinct per phase
                  "reason": "stolen", "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        for what, call, into in (("push", lambda c=change: client.push([c]), pushes),
                                 ("pull", lambda: client.feed_page(0, 100), pulls)):
            started = time.perf_counter()
            try:
                call()
                outcomes[f"{what} ok"] = outcomes.get(f"{what} ok", 0) + 1
            except Exception as exc:  # counted and printed, not hidden
                outcomes[f"{what} {type(exc).__name__}"] = outcomes.get(
                    f"{what} {type(exc).__name__}", 0) + 1
            into.append(time.perf_counter() - started)
        time.sleep(0.25)
    return pushes, pulls, outcomes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--short", action="store_true", help="5 s phases instead of 15 s")
    parser.add_argument("--hammers", type=int, default=2, help="hammering processes (8 "
                        "keep-alive connections each)")
    parser.add_argument("--nice", type=int, default=0, help="niceness of the hammers")
    args = parser.parse_args()
    seconds = 5.0 if args.short else 15.0
    folder = Path(tempfile.mkdtemp(prefix="bench-registry-flood-"))
    lab = Lab(folder / "lab", [("op-a", "DK"), ("op-b", "SE")])
    try:
        lab.start()
        keys = lab.root / "keys"
        policy = RetryPolicy()
        client = RegistryClient(lab.url, signing_key=load_private_key(keys / "op-b.key"),
                                kid="op-b", registry_key=load_public_key(keys / "registry.pub"),
                                policy=policy)
        member_rounds(client, 1.0, "warm")
        print(f"registry: one worker, member_rate 20/s; op-b pushes 1 change and pulls 1 page "
              f"every 0.25 s; {args.hammers} hammering processes from {FLOOD_FROM} "
              f"(nice {args.nice})")
        for phase, key in (("alone", None), ("signed hammer", load_private_key(keys / "op-a.key")),
                           ("forged hammer", Ed25519PrivateKey.generate())):
            flood = None if key is None else Flood(
                lab.port, signed_request(lab.url, lab.port, key), processes=args.hammers,
                connections=8, seconds=seconds, nice=args.nice).start()
            pushes, pulls, outcomes = member_rounds(client, seconds, phase.replace(" ", ""))
            counts = flood.join() if flood else {}
            load = (f"hammer {sum(counts.values()) / seconds:,.0f} req/s, answers {counts}"
                    if flood else "no hammer")
            print(f"{phase:14}: {load}")
            print(f"{'':14}  op-b push p50={percentile(pushes, .5)*1e3:.1f} ms "
                  f"p99={percentile(pushes, .99)*1e3:.1f} ms; pull "
                  f"p50={percentile(pulls, .5)*1e3:.1f} ms p99={percentile(pulls, .99)*1e3:.1f}"
                  f" ms; {dict(sorted(outcomes.items()))}; op-b waits {len(policy.history)}")
            policy.new_run()
        print("(a shared 2-core machine: hammers and registry share the cores)")
    finally:
        lab.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
